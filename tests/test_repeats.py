"""Repeated guided steps (sgfast.repeats): the re-noising lands on the scheduler's own noising of the
step's level, a trial step leaves every scheduler as it was, a repeat of 1 (or v = 0) changes
nothing, and bad values are refused before anything runs."""

import functools
import inspect
import math

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, SASolverScheduler, UniPCMultistepScheduler

from sgfast import SelfGuidancePipeline, move, resize
from sgfast.guided import HostSchedule
from sgfast.repeats import SchedulerState, forget_corrector, renoise, repeats_per_call, resolve_repeats
from sgfast.settings import GuidanceSettings
from sgfast.shapes import guidance_settings
from sgfast.testing import tiny_pipeline, tiny_sd3_pipeline

from test_dropin import PROMPT, SCHEDULERS, seeded, with_scheduler

STEPS = 6


def scheduler_named(name, steps=STEPS):
    cls, extra = SCHEDULERS[name]
    scheduler = cls.from_config(tiny_pipeline(image_size=32).scheduler.config, **extra)
    scheduler.set_timesteps(steps)
    return scheduler


def step_kwargs(scheduler, name, generator):
    accepted = set(inspect.signature(scheduler.step).parameters)
    kwargs = {"generator": generator} if "generator" in accepted else {}
    if name == "ddim_eta":
        kwargs["eta"] = 1.0
    return kwargs


@pytest.mark.parametrize("name", SCHEDULERS)
def test_a_trial_step_leaves_the_scheduler_as_it_was(name):
    """Two schedulers run the same steps; one also takes a trial step (other model output, same
    generator) at each call, put back with SchedulerState. Every real step then agrees bit for bit,
    step noise, multistep history and step index included."""
    plain, tried = scheduler_named(name), scheduler_named(name)
    torch.manual_seed(0)
    latents = torch.randn(1, 4, 5, 3)
    outputs = [torch.randn_like(latents) for _ in plain.timesteps]
    z_plain, z_tried = latents.clone(), latents.clone()
    g_plain, g_tried = seeded(7), seeded(7)
    for i, t in enumerate(plain.timesteps):
        saved = SchedulerState(tried, [g_tried])
        tried.step(torch.randn_like(latents), t, z_tried, **step_kwargs(tried, name, g_tried), return_dict=False)
        saved.restore()
        z_plain = plain.step(outputs[i], t, z_plain, **step_kwargs(plain, name, g_plain), return_dict=False)[0]
        z_tried = tried.step(outputs[i], t, z_tried, **step_kwargs(tried, name, g_tried), return_dict=False)[0]
        assert torch.equal(z_tried, z_plain), f"call {i}"
    assert getattr(tried, "step_index", None) == getattr(plain, "step_index", None)


@pytest.mark.parametrize("cls", [UniPCMultistepScheduler, SASolverScheduler])
def test_a_predictor_corrector_step_starts_from_the_latents_a_repeat_gives_it(cls):
    """UniPC and SA-Solver rebuild the sample they are given from their previous one (a repeat's
    re-noised latents would be replaced by it). After forget_corrector the step goes on from the
    sample it is given, and keeps it for the next step's correction."""
    scheduler = cls.from_config(tiny_pipeline(image_size=32).scheduler.config)
    scheduler.set_timesteps(STEPS)
    torch.manual_seed(0)
    z = torch.randn(1, 4, 5, 3)
    for t in scheduler.timesteps[:2]:
        z = scheduler.step(torch.randn_like(z), t, z, return_dict=False)[0]
    t, output = scheduler.timesteps[2], torch.randn_like(z)
    saved = SchedulerState(scheduler)

    def step_from(sample, forget):
        saved.restore()
        if forget:
            forget_corrector(scheduler)
        return scheduler.step(output, t, sample, return_dict=False)[0]

    step_from(z, forget=False)
    assert not torch.allclose(scheduler.last_sample, z)  # the step went on from a sample rebuilt from the last one
    step_from(z, forget=True)
    assert torch.equal(scheduler.last_sample, z)  # from z itself, which the next step corrects from


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_a_repeated_unipc_step_runs_from_its_renoised_latents(family):
    """Through the pipeline: at a repeated step every run after the first steps without UniPC's
    corrector (it would rebuild the sample from the previous step's), the trial of the first run and
    every other step with it. SD3 runs UniPC on flow sigmas."""
    if family == "sd":
        pipe = with_scheduler(tiny_pipeline(image_size=32), "unipc")
    else:
        pipe = tiny_sd3_pipeline()
        pipe.scheduler = UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)
    sg = SelfGuidancePipeline.from_pipe(pipe)
    corrected = []
    step = pipe.scheduler.step

    @functools.wraps(step)
    def recorded(*args, **kwargs):
        corrected.append(pipe.scheduler.last_sample is not None)
        return step(*args, **kwargs)

    pipe.scheduler.step = recorded
    edited(sg, guidance_schedule=[2], guidance_repeats=[1, 1, 3] + [1] * (STEPS - 3))
    # the unedited run the edit starts from, then the edited one: steps 0 and 1; step 2: the trial of
    # run 1, the trial of run 2, the real step; then steps 3-5
    assert corrected == [False] + [True] * (STEPS - 1) + [False, True, True, False, False] + [True] * (STEPS - 3)


def level_at(scheduler, index):
    """(sigma_t, alpha_bar) of UNet call `index` as the guided loop reads it."""
    scheduler._step_index = index
    t = scheduler.timesteps[index]
    return HostSchedule(scheduler, scheduler.timesteps).level(index, t)[:2], t


@pytest.mark.parametrize(
    "cls, extra",
    [(DDIMScheduler, {}), (EulerDiscreteScheduler, {}), (DPMSolverMultistepScheduler, {}),
     (DPMSolverMultistepScheduler, {"use_karras_sigmas": True})],
    ids=["ddim", "euler", "dpmpp_2m", "dpmpp_2m_karras"],
)
@pytest.mark.parametrize("index", [1, 3])
def test_renoising_is_the_schedulers_own_noising_at_the_steps_level(cls, extra, index):
    """z_s = add_noise(x0, e1, t_s) taken back to t gives add_noise(x0, e, t_t) with the noise both
    draws make together: e = (a e1 + b e2) / sigma_t-as-noised, in float64 on odd shapes."""
    scheduler = cls.from_config(tiny_pipeline(image_size=32).scheduler.config, **extra)
    scheduler.set_timesteps(STEPS)
    generator = torch.Generator().manual_seed(index)
    x0, e1, e2 = (torch.randn(2, 3, 7, 5, generator=generator, dtype=torch.float64) for _ in range(3))
    own, t = level_at(scheduler, index)
    ended, s = level_at(scheduler, index + 1)
    sigma_space = float(scheduler.init_noise_sigma) != 1.0
    z_s = scheduler.add_noise(x0, e1, s.reshape(1))
    z_t = renoise(z_s, ended, own, sigma_space, e2)
    if sigma_space:  # z = x0 + sigma e
        a, b, total = ended[0], math.sqrt(own[0] ** 2 - ended[0] ** 2), own[0]
    else:  # z = sqrt(ab) x0 + sqrt(1 - ab) e
        ratio = own[1] / ended[1]
        a, b, total = math.sqrt(ratio * (1 - ended[1])), math.sqrt(1 - ratio), math.sqrt(1 - own[1])
    expected = scheduler.add_noise(x0, (a * e1 + b * e2) / total, t.reshape(1))
    torch.testing.assert_close(z_t, expected, rtol=1e-6, atol=1e-6)
    assert math.isclose(a * a + b * b, total * total, rel_tol=1e-12)  # the combined noise is standard normal


def test_repeats_run_on_the_first_call_of_a_step_and_never_on_the_last():
    # Heun: one call for the first step, then two per step.
    steps = [0, 1, 1, 2, 2]
    assert repeats_per_call([3, 3, 2], steps) == [3, 3, 1, 2, 1]
    assert repeats_per_call([2, 2], [0, 1]) == [2, 1]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "3", [1, 2], [1] * (STEPS - 1) + [0], {"times": 2}])
def test_bad_repeats_are_refused_before_anything_runs(bad):
    pipe = tiny_pipeline(image_size=32)
    sg = SelfGuidancePipeline.from_pipe(pipe)
    calls = []
    hook = pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match="guidance_repeats must be"):
        sg(PROMPT, edits=[move("circle", dx=0.2)], guidance_repeats=bad, num_inference_steps=STEPS, output_type="latent")
    hook.remove()
    assert calls == []
    with pytest.raises(ValueError, match="guidance_repeats must be"):
        resolve_repeats(bad, STEPS) if not isinstance(bad, dict) else GuidanceSettings().repeats([[]], STEPS, bad)


@pytest.mark.parametrize("bad", [0, {"times": 0, "to_share": 0.5}, {"times": 2, "to_share": 1.5}, {"times": 2}, [2, 2]])
def test_a_settings_file_with_bad_repeats_is_refused(bad):
    with pytest.raises(ValueError, match="edits.move: guidance_repeats must be"):
        GuidanceSettings.from_dict({"format": 1, "edits": {"move": {"guidance_repeats": bad}}})


def edited(sg, **kwargs):
    return sg(PROMPT, edits=[move("circle", dx=0.3)], num_inference_steps=STEPS, generator=seeded(3),
              output_type="latent", **kwargs)


def test_a_repeat_of_one_is_no_repeat_and_v_zero_repeats_nothing():
    sg = SelfGuidancePipeline.from_pipe(tiny_pipeline(image_size=32))
    once = edited(sg).images
    assert torch.equal(edited(sg, guidance_repeats=1).images, once)
    assert torch.equal(edited(sg, guidance_repeats=[1] * STEPS).images, once)
    unedited = sg(PROMPT, num_inference_steps=STEPS, generator=seeded(3), output_type="latent").images
    assert torch.equal(edited(sg, guidance_repeats=3, self_guidance_scale=0.0).images, unedited)


@pytest.mark.parametrize("name", ["ddim", "euler_a", "heun", "dpmpp_2m", "pndm", "lcm"])
def test_repeated_steps_run_again_from_their_own_level_and_are_seeded(name):
    """Each repeat is one more conditional pass with gradients and one trial scheduler step; the
    result is reproducible from the call's generator and differs from the unrepeated call."""
    pipe = with_scheduler(tiny_pipeline(image_size=32), name)
    sg = SelfGuidancePipeline.from_pipe(pipe)
    steps_taken = []
    step = pipe.scheduler.step

    @functools.wraps(step)  # diffusers reads the step's signature to pass it the generator
    def counted(*args, **kwargs):
        steps_taken.append(1)
        return step(*args, **kwargs)

    pipe.scheduler.step = counted
    once = edited(sg, guidance_schedule=[1, 2]).images
    single = len(steps_taken)
    steps_taken.clear()
    twice = edited(sg, guidance_schedule=[1, 2], guidance_repeats=[1, 3, 2] + [1] * (STEPS - 3)).images
    assert len(steps_taken) == single + 2 + 1  # step 1 twice more, step 2 once more
    again = edited(sg, guidance_schedule=[1, 2], guidance_repeats=[1, 3, 2] + [1] * (STEPS - 3)).images
    assert torch.equal(twice, again)
    assert torch.isfinite(twice).all() and not torch.equal(twice, once)


def test_the_built_in_models_moves_repeat_their_early_steps():
    settings = guidance_settings()
    assert settings.repeats([[move("circle", dx=0.2)]], 25) == [3] * 8 + [1] * 17
    assert settings.repeats([[move("circle", dx=0.2)]], 25, guidance_repeats=1) == [1] * 25
    assert settings.repeats([[resize("circle", 2.0)]], 25) == [3] * 11 + [1] * 14  # guided from step 5: 5-10
    assert settings.for_photo().repeats([[move("circle", dx=0.2)]], 25) == [1] * 25  # photo edits: measured without
    assert settings.for_photo().repeats([[resize("circle", 2.0)]], 25) == [1] * 25
    assert settings.for_photo().fill(resize("circle", 2.0)).keep_own_centroid_weight == 8.0
    # The generated image's move holds its own log size (with the repeats); a photo move, which repeats
    # nothing, keeps the settings it was measured with.
    assert settings.fill(move("circle", dx=0.2)).keep_own_size_weight == 0.5
    assert settings.for_photo().fill(move("circle", dx=0.2)).keep_own_size_weight == 0.0


@pytest.mark.parametrize("index", [0, 2, 4])
def test_flow_renoising_is_the_schedulers_own_noising_at_the_steps_level(index):
    """x_s = scale_noise(x0, s, e1) taken back to t is scale_noise(x0, t, e) with the noise of both
    draws, in float64 (FlowMatchEulerDiscreteScheduler, SD3's and FLUX's)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from sgfast.flow import renoise_flow

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(STEPS)
    generator = torch.Generator().manual_seed(index)
    x0, e1, e2 = (torch.randn(2, 11, 5, generator=generator, dtype=torch.float64) for _ in range(3))
    t, s = (float(scheduler.sigmas[k]) for k in (index, index + 1))
    x_s = scheduler.scale_noise(x0, scheduler.timesteps[index + 1].reshape(1), e1)
    x_t = renoise_flow(x_s, s, t, e2)
    scale = (1 - t) / (1 - s)
    a, b = scale * s, math.sqrt(t * t - (scale * s) ** 2)
    expected = scheduler.scale_noise(x0, scheduler.timesteps[index].reshape(1), (a * e1 + b * e2) / t)
    torch.testing.assert_close(x_t, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_mmdit_repeats_run_the_step_again_and_are_seeded(family):
    from sgfast.testing import tiny_flux_pipeline

    pipe = tiny_sd3_pipeline() if family == "sd3" else tiny_flux_pipeline()
    sg = SelfGuidancePipeline.from_pipe(pipe)
    calls = []  # passes through the transformer's first block: every forward runs it once
    hook = pipe.transformer.transformer_blocks[0].register_forward_hook(lambda *a: calls.append(1))
    kwargs = dict(edits=[move("circle", dx=0.2)], num_inference_steps=4, generator=seeded(2), output_type="latent",
                  guidance_schedule=[1, 2])
    passes = 2 if family == "sd3" else 1  # a guided step's passes: SD3 under CFG runs its negative rows apart
    once = sg(PROMPT, **kwargs)
    single = len(calls)
    calls.clear()
    twice = sg(PROMPT, guidance_repeats=[1, 3, 1, 1], **dict(kwargs, generator=seeded(2)))
    hook.remove()
    assert len(calls) == single + 2 * passes  # step 1 twice more, inside the step's transformer call
    assert [s for s, _ in twice.energies] == [s for s, _ in once.energies]  # one energy per guided step
    again = sg(PROMPT, guidance_repeats=[1, 3, 1, 1], **dict(kwargs, generator=seeded(2)))
    assert torch.equal(twice.images, again.images) and not torch.equal(twice.images, once.images)
    assert torch.equal(sg(PROMPT, guidance_repeats=1, **dict(kwargs, generator=seeded(2))).images, once.images)


def test_mmdit_repeats_are_refused_where_the_step_is_more_than_one_call():
    sg = SelfGuidancePipeline.from_pipe(tiny_sd3_pipeline())
    with pytest.raises(ValueError, match="guidance_repeats cannot run with skip_guidance_layers"):
        sg(PROMPT, edits=[move("circle", dx=0.2)], guidance_repeats=2, num_inference_steps=2, output_type="latent",
           skip_guidance_layers=[1])


def test_an_edit_of_a_trace_without_a_generator_is_the_same_image_every_time():
    sg = SelfGuidancePipeline.from_pipe(tiny_pipeline(image_size=32))
    original = sg(PROMPT, num_inference_steps=STEPS, generator=seeded(4), output_type="latent")
    edit = dict(edits=[move("circle", dx=0.3)], trace=original.trace, guidance_repeats=2, output_type="latent")
    first, second = sg(PROMPT, **edit).images, sg(PROMPT, **edit).images
    assert torch.equal(first, second)
    assert not torch.equal(first, sg(PROMPT, **dict(edit, guidance_repeats=1)).images)


def test_sdxl_repeats_its_guided_steps():
    from sgfast.testing import tiny_sdxl_pipeline

    sg = SelfGuidancePipeline.from_pipe(tiny_sdxl_pipeline())
    once, twice = (edited(sg, guidance_repeats=n).images for n in (1, 2))
    assert torch.isfinite(twice).all() and not torch.equal(twice, once)
