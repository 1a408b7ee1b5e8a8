"""Self-guidance under flow matching (sgfast.flow): the term in velocity units lowers the energy on the
blob scenes of test_edit_targets through the step the MMDiT wrapper takes, and moves the predicted
clean image as far as the same weight does on a DDIM (eps-prediction) model at the same noise level."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from sgfast import move, resize
from sgfast.flow import can_guide_flow, flow_alpha_bar, flow_guidance_term
from sgfast.mmdit_pipeline import _Run
from sgfast.sampler import edit_selection, energy_of, guidance_term, unit_rms
from test_edit_targets import LAYERS, T, two_objects


def latent_scene(edit):
    """Latents that are the scene's maps: one channel per word the edit reads, on the coarse grid
    (the fine layer's maps are them resampled), so the energy is a function of the latents."""
    scene = two_objects()
    references = scene.traces()
    words, _ = edit_selection([[edit]], scene.words, "cpu")
    with torch.no_grad():
        x = torch.stack([scene.map(0, w, LAYERS["coarse"]) for w in words[0]])[None].float()

    def energy(latents):
        maps = {"coarse": latents, "fine": F.interpolate(latents, size=LAYERS["fine"], mode="bilinear", align_corners=False)}
        capture = SimpleNamespace(maps=maps, features=scene.features.detach().float())
        return energy_of([[edit]], capture, scene.words, words, references, T)

    return x, energy, words[0]


def centroid_x(m):
    xs = (torch.arange(m.shape[-1], dtype=m.dtype) + 0.5) / m.shape[-1]
    return float((m.sum(0) * xs).sum() / m.sum())


def guided_step(x, energy, sign=1.0, step_index=4, normalized=False):
    """One FlowMatchEuler step of a zero velocity plus the guidance term, taken by the MMDiT wrapper's
    own step hook (the code path of a guided step). The weight (of `sign`) makes the largest change
    of a latent 1e-4 (a first-order step: maps stay positive; the size is the DDIM test's)."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    scheduler._step_index = step_index
    z = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(energy(z), z)
    s, s_next = float(scheduler.sigmas[step_index]), float(scheduler.sigmas[step_index + 1])
    unit_step = (s - s_next) * flow_guidance_term(s, unit_rms(grad) if normalized else grad, 1.0, normalized).abs().max()
    weight = sign * 1e-4 / float(unit_step)
    run = _Run.__new__(_Run)
    run.pipe = SimpleNamespace(scheduler=scheduler)
    run.grad, run.scale, run.normalize, run.step = (unit_rms(grad) if normalized else grad), weight, normalized, 0
    run.restepped = None  # no repeated step pending
    t = scheduler.timesteps[step_index]
    return run._step(scheduler.step, torch.zeros_like(x), t, x, return_dict=False)[0]


@pytest.mark.parametrize("normalized", [False, True])
@pytest.mark.parametrize("dx", [0.15, -0.15])
def test_a_guided_flow_step_lowers_a_moves_energy_and_moves_the_object_the_asked_way(dx, normalized):
    edit = move("circle", dx=dx)
    x, energy, words = latent_scene(edit)
    stepped = guided_step(x, energy, normalized=normalized)
    assert float(energy(stepped)) < float(energy(x))
    circle = words.index("circle")
    shift = centroid_x(stepped[0, circle]) - centroid_x(x[0, circle])
    assert shift * dx > 0  # the sign: toward the target


def test_a_guided_flow_step_lowers_a_resizes_energy():
    x, energy, _ = latent_scene(resize("square", 2.0))
    assert float(energy(guided_step(x, energy))) < float(energy(x))


def test_a_negative_weight_raises_the_energy():
    """The sign is the term's, not the test's: the opposite weight goes uphill."""
    x, energy, _ = latent_scene(move("circle", dx=0.15))
    assert float(energy(guided_step(x, energy, sign=-1.0))) > float(energy(x))


@pytest.mark.parametrize("normalized", [False, True])
@pytest.mark.parametrize("timestep", [101, 401, 801])
def test_the_same_weight_moves_the_clean_prediction_as_far_as_on_ddim(timestep, normalized):
    """DDIM (eps-prediction): z = sqrt(ab) x0 + sqrt(1 - ab) eps, x0_hat = (z - sqrt(1 - ab) eps_hat) / sqrt(ab).
    Flow: x = (1 - s) x0 + s eps, x0_hat = x - s v_hat. At the same noise level x = n z, so one energy of
    the clean image has grad_z = n grad_x; each term, through its own x0_hat, moves x0_hat alike."""
    ddim = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    alpha_bar = float(ddim.alphas_cumprod[timestep])
    s = 1.0 / (1.0 + math.sqrt(alpha_bar / (1.0 - alpha_bar)))  # (1 - s) / s = sqrt(ab / (1 - ab))
    assert flow_alpha_bar(s) == pytest.approx(alpha_bar, rel=1e-9)
    n = math.sqrt((1 - s) ** 2 + s**2)
    torch.manual_seed(0)
    grad_x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    grad_z = n * grad_x
    weight = 3.0
    if normalized:
        grad_x, grad_z = unit_rms(grad_x), unit_rms(grad_z)
    deps = guidance_term(ddim, 0, torch.tensor(timestep), grad_z, weight, normalized=normalized)
    ddim_shift = -math.sqrt(1 - alpha_bar) / math.sqrt(alpha_bar) * deps
    flow_shift = -s * flow_guidance_term(s, grad_x, weight, normalized=normalized)
    torch.testing.assert_close(flow_shift, ddim_shift, rtol=1e-9, atol=0)


def test_the_first_step_of_a_flow_schedule_cannot_be_guided():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    assert float(scheduler.sigmas[0]) == 1.0
    assert not can_guide_flow(float(scheduler.sigmas[0]))
    assert all(can_guide_flow(float(s)) for s in scheduler.sigmas[1:-1])

