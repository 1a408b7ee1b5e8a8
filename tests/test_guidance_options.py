"""Options reach the sampling they are for, checked against diffusers and float64 references."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler

from sgfast import SelfGuidancePipeline, move, resize
from sgfast import guided, sampler  # noqa: F401
from sgfast.sampler import edit_selection, guidance_term, guided_energy
from sgfast.testing import tiny_pipeline
from sgfast.trace import PromptWords, Trace

PROMPT = "a red circle and a blue square"
STEPS = 4


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


# ---- v-prediction -------------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler_class", [DDIMScheduler, EulerDiscreteScheduler])
def test_v_prediction_term_moves_the_step_as_the_epsilon_term_does(scheduler_class):
    # diffusers' own schedulers turn the model output into x0 and the next latents: the term added
    # to a v-prediction must move them exactly as the term added to an eps-prediction does.
    config = tiny_pipeline().scheduler.config
    schedulers = {kind: scheduler_class.from_config(config, prediction_type=kind) for kind in ("epsilon", "v_prediction")}
    for s in schedulers.values():
        s.set_timesteps(10)
    step = 4
    t = schedulers["epsilon"].timesteps[step]
    g = seeded(1)
    z = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64) * float(schedulers["epsilon"].init_noise_sigma)
    output = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
    grad = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)

    def moved(kind, output):
        s = schedulers[kind]
        term = guidance_term(s, step, t, grad, 3.0)
        results = []
        for model_output in (output + term, output):
            s._step_index = None  # Euler counts its steps: each call is at `step`
            results.append(s.step(model_output, t, z))
        guided, plain = results
        return guided.pred_original_sample - plain.pred_original_sample, guided.prev_sample - plain.prev_sample

    # Both steps are affine in the model output: the difference is the term's effect alone.
    (dx0_eps, dprev_eps), (dx0_v, dprev_v) = moved("epsilon", output), moved("v_prediction", output)
    assert dx0_eps.abs().max() > 1e-3
    torch.testing.assert_close(dx0_v, dx0_eps, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(dprev_v, dprev_eps, rtol=1e-6, atol=1e-9)  # the schedules are float32


def test_prediction_types():
    # A scheduler whose config names no prediction type predicts eps (diffusers' default); one that
    # predicts x0 is refused with the kinds that are supported.
    ddim = tiny_pipeline().scheduler
    ddim.set_timesteps(10)
    t = ddim.timesteps[3]
    grad = torch.ones(1, 4, 2, 2, dtype=torch.float64)
    bare = SimpleNamespace(config={}, init_noise_sigma=1.0, alphas_cumprod=ddim.alphas_cumprod)
    torch.testing.assert_close(guidance_term(bare, 3, t, grad, 2.0), guidance_term(ddim, 3, t, grad, 2.0))
    sample = DDIMScheduler.from_config(ddim.config, prediction_type="sample")
    with pytest.raises(ValueError, match="^self-guidance supports epsilon and v_prediction models, not 'sample'$"):
        guidance_term(sample, 3, t, grad, 2.0)


# ---- fp16: the loss-scaled gradient ---------------------------------------------------------------


@pytest.mark.parametrize("weight", [None, 1e-4])
def test_fp16_gradient_matches_float64_finite_differences(monkeypatch, weight):
    # The fp16 path scales the energy before the backward and the gradient back after it: the
    # gradient the step uses is the energy's, as float64 finite differences measure it; also for
    # weights small enough that fp16's backward would underflow without the scale.
    half = SelfGuidancePipeline.from_pipe(tiny_pipeline().to(torch.float16), mode="fast")
    # The trace is recorded with the edited call's settings (a trace from other settings is refused).
    reference = half(PROMPT, num_inference_steps=STEPS, guidance_scale=1.0, generator=seeded(), output_type="latent").trace
    used = []
    real_term = guided.guidance_term
    monkeypatch.setattr(guided, "guidance_term", lambda grad, scale: used.append(grad) or real_term(grad, scale))
    w = {} if weight is None else dict(weight=weight)
    edits = [[move("circle", dx=0.2, keep_others=False, **w), resize("square", 1.5, keep_others=False, **w)]]
    half(PROMPT, edits=edits[0], num_inference_steps=STEPS, trace=reference, guidance_scale=1.0, output_type="latent")
    grad = used[0]  # the first step's
    t = half.pipe.scheduler.timesteps[0]

    exact = tiny_pipeline().to(torch.float64)
    sg = SelfGuidancePipeline.from_pipe(exact)
    words = [PromptWords.from_tokenizer(exact.tokenizer, PROMPT)]
    chosen, tokens = edit_selection(edits, words, "cpu")
    embeds = exact.encode_prompt(PROMPT, "cpu", 1, False)[0]
    z = reference.latents.double()  # what the fp16 run started from

    def energy(latents):
        with sg.capture() as capture:
            return guided_energy(exact, capture, latents, t, embeds, list(zip(edits, [reference])), words, chosen, tokens)[1]

    direction = grad.double() / grad.double().norm()
    h = 1e-4
    numeric = ((energy(z + h * direction) - energy(z - h * direction)) / (2 * h)).item()
    assert numeric > 0
    assert (grad.double() * direction).sum().item() == pytest.approx(numeric, rel=0.05)


def test_a_normalised_gradient_takes_the_variance_preserving_noise_level_in_the_step(monkeypatch):
    # On a sigma-space scheduler the unit-RMS gradient is scaled by sqrt(1 - alpha_bar) =
    # sigma / sqrt(sigma^2 + 1) of the sigma the scheduler holds, not by sigma.
    pipe = tiny_pipeline()
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    sg = SelfGuidancePipeline.from_pipe(pipe)
    seen = []
    real_term = guided.guidance_term

    def spy(grad, scale):
        term = real_term(grad, scale)
        scheduler = pipe.scheduler
        seen.append((grad.clone(), term.clone(), float(scheduler.sigmas[scheduler.step_index]), 2.0))
        return term

    monkeypatch.setattr(guided, "guidance_term", spy)
    sg(PROMPT, edits=[move("circle", dx=0.3)], num_inference_steps=STEPS, normalize_gradient=True,
       self_guidance_scale=2.0, guidance_schedule=[0, 2], generator=seeded(), output_type="latent")
    assert len(seen) == 2
    for grad, term, sigma, weight in seen:
        assert weight == 2.0 and sigma > 0.5
        assert grad.double().pow(2).mean().sqrt().item() == pytest.approx(1.0, rel=1e-5)
        vp = sigma / math.sqrt(sigma * sigma + 1.0)
        torch.testing.assert_close(term.double(), 2.0 * vp * grad.double(), rtol=1e-5, atol=1e-7)


def test_a_gradient_that_is_not_finite_is_refused_naming_its_call():
    from sgfast.edits import Edit

    class NotFinite(Edit):
        def needed_words(self, prompt_words):
            return ["circle"]

        def energy(self, current, reference, timestep):
            return current.centroid("circle").sum() * float("nan")

    sg = SelfGuidancePipeline.from_pipe(tiny_pipeline())
    with pytest.raises(FloatingPointError) as error:
        sg(PROMPT, edits=[NotFinite()], num_inference_steps=STEPS, guidance_schedule=[1], generator=seeded(),
           output_type="latent")
    assert str(error.value) == "the self-guidance gradient is not finite at UNet call 1; lower the edit weights"


# ---- arguments passed through to diffusers -------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return tiny_pipeline()


def test_negative_prompt_and_eta_as_diffusers_uses_them(tiny):
    kwargs = dict(num_inference_steps=STEPS, negative_prompt=["green triangle"], eta=1.0, output_type="np")
    expected = tiny([PROMPT], generator=seeded(), **kwargs).images
    plain = tiny([PROMPT], generator=seeded(), num_inference_steps=STEPS, output_type="np").images
    assert np.abs(expected - plain).max() > 1e-3  # the options change the image
    out = SelfGuidancePipeline.from_pipe(tiny)([PROMPT], generator=seeded(), **kwargs).images
    np.testing.assert_array_equal(out, expected)


def test_negative_prompt_reaches_the_guided_steps(tiny):
    # With v = 0 a guided step is diffusers' step computed in two UNet calls.
    kwargs = dict(num_inference_steps=STEPS, negative_prompt=["green triangle"], output_type="np")
    expected = tiny([PROMPT], generator=seeded(), **kwargs).images
    sg = SelfGuidancePipeline.from_pipe(tiny)
    out = sg([PROMPT], edits=[move("circle", dx=0.2)], self_guidance_scale=0.0, generator=seeded(), **kwargs).images
    np.testing.assert_allclose(out, expected, atol=1e-4)


def test_a_single_negative_prompt_string(tiny):
    kwargs = dict(num_inference_steps=STEPS, negative_prompt="green triangle", output_type="np")
    expected = tiny(PROMPT, generator=seeded(), **kwargs).images
    np.testing.assert_array_equal(SelfGuidancePipeline.from_pipe(tiny)(PROMPT, generator=seeded(), **kwargs).images, expected)


def test_eta_noise_of_a_guided_run_is_the_seeds(tiny):
    # The unedited reference pass run inside the call must not consume the seed's step noise.
    kwargs = dict(num_inference_steps=STEPS, eta=1.0, output_type="np")
    expected = tiny(PROMPT, generator=seeded(), **kwargs).images
    sg = SelfGuidancePipeline.from_pipe(tiny)
    out = sg(PROMPT, edits=[move("circle", dx=0.2)], self_guidance_scale=0.0, generator=seeded(), **kwargs).images
    np.testing.assert_array_equal(out, expected)


def test_a_batch_of_three_at_low_guidance_is_diffusers(tiny):
    # Three prompts (odd CFG halves), guidance 1.5 (CFG on), with and without guided steps at v = 0.
    prompts = [PROMPT, "a green triangle", "a red circle"]
    kwargs = dict(num_inference_steps=STEPS, guidance_scale=1.5, output_type="np")
    expected = tiny(prompts, generator=seeded(), **kwargs).images
    assert np.abs(expected - tiny(prompts, generator=seeded(), **dict(kwargs, guidance_scale=1.0)).images).max() > 1e-3
    sg = SelfGuidancePipeline.from_pipe(tiny)
    np.testing.assert_array_equal(sg(prompts, generator=seeded(), **kwargs).images, expected)
    edits = [[move("circle", dx=0.1)], [move("triangle", dy=0.1)], [resize("circle", 1.5)]]
    guided = sg(prompts, edits=edits, self_guidance_scale=0.0, generator=seeded(), **kwargs).images
    np.testing.assert_allclose(guided, expected, atol=1e-4)


# ---- traces ---------------------------------------------------------------------------------------


def test_trace_view_is_the_nearest_recorded_step():
    trace = Trace("a red circle", ["a", "red", "circle"])
    for t in (901, 501, 101):
        trace.add(t, {"layer": torch.full((3, 2, 2), float(t))}, torch.full((3, 4), float(t)))
    for asked, nearest in [(990, 901), (905, 901), (560, 501), (480, 501), (250, 101), (0, 101)]:
        view = trace.view(asked)
        assert view.maps["layer"][0, 0, 0].item() == nearest
        assert view.appearance("circle")[0].item() == nearest


def test_trace_nbytes_counts_maps_and_appearance():
    trace = Trace("a red circle", ["a", "red", "circle"])
    trace.add(901, {"x": torch.zeros(3, 4, 4), "y": torch.zeros(3, 2, 2, dtype=torch.float64)}, torch.zeros(3, 5))
    trace.add(501, {"x": torch.zeros(3, 4, 4), "y": torch.zeros(3, 2, 2, dtype=torch.float64)}, None)
    assert trace.nbytes() == 2 * (3 * 16 * 4 + 3 * 4 * 8) + 3 * 5 * 4


def test_trace_image_noises_the_image_to_each_timestep(tiny):
    # The UNet must see diffusers' own add_noise(clean, noise, t) at every timestep.
    sg = SelfGuidancePipeline.from_pipe(tiny)
    image = np.zeros((64, 64, 3), dtype=np.float32)
    image[16:40, 8:32] = [1.0, 0.0, 0.0]
    noise = torch.randn(1, 4, 16, 16, generator=seeded(5))
    seen = []
    hook = tiny.unet.register_forward_pre_hook(lambda module, args: seen.append((args[0].clone(), int(args[1]))))
    try:
        sg.trace_image(image, "a red square", num_inference_steps=STEPS, noise=noise)
    finally:
        hook.remove()
    pixels = tiny.image_processor.preprocess(image)
    clean = tiny.vae.encode(pixels).latent_dist.mode() * tiny.vae.config.scaling_factor
    assert [t for _, t in seen] == tiny.scheduler.timesteps.tolist()
    for sample, t in seen:
        torch.testing.assert_close(sample, tiny.scheduler.add_noise(clean, noise, torch.tensor([t])), rtol=1e-5, atol=1e-5)


# ---- batches --------------------------------------------------------------------------------------


def test_every_batch_item_is_guided_as_it_would_be_alone(tiny):
    sg = SelfGuidancePipeline.from_pipe(tiny)
    # Three items: CFG halves of an odd size.
    prompts = [PROMPT, "a green triangle and a red circle", "a red circle"]
    edits = [[move("circle", dx=0.3, keep_others=False)], [resize("triangle", 2.0, keep_others=False)],
             [move("circle", dy=-0.3, keep_others=False)]]
    settings = dict(num_inference_steps=STEPS, output_type="latent", normalize_gradient=True, self_guidance_scale=1.0)
    unedited = sg(prompts, num_inference_steps=STEPS, generator=seeded(), output_type="latent")
    batch = sg(prompts, edits=edits, trace=unedited.trace, **settings).images
    for b, prompt in enumerate(prompts):
        alone = sg(prompt, edits=edits[b], trace=unedited.trace[b], **settings).images
        assert (alone - unedited.images[b : b + 1]).abs().max() > 1e-2  # the edit changes the item
        torch.testing.assert_close(batch[b : b + 1], alone, rtol=1e-4, atol=1e-4)


# ---- fast mode ------------------------------------------------------------------------------------


def saved_for_backward(sg, reference):
    """Bytes autograd saves in one guided step of `sg` (a move: maps only)."""
    pipe = sg.pipe
    edits = [[move("circle", dx=0.2, keep_others=False)]]
    words = [PromptWords.from_tokenizer(pipe.tokenizer, PROMPT)]
    chosen, tokens = edit_selection(edits, words, "cpu")
    embeds = pipe.encode_prompt(PROMPT, "cpu", 1, False)[0]
    pipe.scheduler.set_timesteps(STEPS)
    t = pipe.scheduler.timesteps[1]
    z = torch.randn(1, 4, 16, 16, generator=seeded(3)).requires_grad_(True)
    saved = []
    pack = lambda x: saved.append(x.numel() * x.element_size()) or x  # noqa: E731
    with torch.enable_grad(), sg.capture() as capture, torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        guided_energy(pipe, capture, z, t, embeds, list(zip(edits, [reference])), words, chosen, tokens)
    return sum(saved)


def test_the_energy_pass_records_features_only_for_edits_that_read_appearance():
    sg = SelfGuidancePipeline.from_pipe(tiny_pipeline())
    pipe = sg.pipe
    reference = sg(PROMPT, num_inference_steps=STEPS, generator=seeded(), output_type="latent").trace
    words = [PromptWords.from_tokenizer(pipe.tokenizer, PROMPT)]
    embeds = pipe.encode_prompt(PROMPT, "cpu", 1, False)[0]
    pipe.scheduler.set_timesteps(STEPS)
    z = torch.randn(1, 4, 16, 16, generator=seeded(3))
    for edit, reads in ((move("circle", dx=0.2, keep_others=False), False), (move("circle", dx=0.2), True)):
        assert edit.needs_features is reads
        chosen, tokens = edit_selection([[edit]], words, "cpu")
        with sg.capture() as capture:
            guided_energy(pipe, capture, z, pipe.scheduler.timesteps[1], embeds, [([edit], reference)], words, chosen,
                          tokens)
            assert (capture.features is not None) is reads


def test_fast_mode_saves_nothing_after_the_last_captured_layer():
    # Maps from the first decoder block only: the fast pipeline's graph stops there, the
    # reference one's runs through the last decoder block.
    reference = SelfGuidancePipeline.from_pipe(tiny_pipeline(), layers=["up_blocks.0"])
    fast = SelfGuidancePipeline.from_pipe(tiny_pipeline(), layers=["up_blocks.0"], mode="fast")
    trace = reference(PROMPT, num_inference_steps=STEPS, generator=seeded(), output_type="latent").trace
    assert 0 < saved_for_backward(fast, trace) < 0.75 * saved_for_backward(reference, trace)
