"""Drop-in parity with diffusers' StableDiffusionPipeline: every scheduler, layout, size and argument
gives the wrapped pipeline's image without edits; a zero-scale edit gives the unedited image; a move
lowers its energy; what cannot be supported is refused with a clear error."""

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)
from diffusers.callbacks import SDCFGCutoffCallback
from diffusers.models.attention_processor import AttnProcessor2_0
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from sgfast import SelfGuidancePipeline, copy_layout, keep_appearance, keep_shape, move
from sgfast.sampler import guidance_term, noise_level
from sgfast.testing import refusals, tiny_components, tiny_pipeline

PROMPT = "a red circle and a blue square"
STEPS = 3

# name -> (scheduler class, extra config); the SD1.5 checkpoints' PNDM is configured as theirs.
SCHEDULERS = {
    "ddim": (DDIMScheduler, {}),
    "ddim_eta": (DDIMScheduler, {}),  # called with eta=1: step noise from the generator
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
    "ddpm": (DDPMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "unipc": (UniPCMultistepScheduler, {}),
    "deis": (DEISMultistepScheduler, {}),
    "kdpm2": (KDPM2DiscreteScheduler, {}),
    "kdpm2_a": (KDPM2AncestralDiscreteScheduler, {}),
    "lcm": (LCMScheduler, {}),
}


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def with_scheduler(pipe, name):
    cls, extra = SCHEDULERS[name]
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **extra)
    return pipe


def call_kwargs(name, **kwargs):
    return dict(num_inference_steps=STEPS, generator=seeded(), output_type="latent", eta=1.0 if name == "ddim_eta" else 0.0, **kwargs)


@pytest.fixture(scope="module")
def pipes():
    """One tiny pipeline per scheduler (schedulers keep state between calls), at 32px for speed."""
    return {name: with_scheduler(tiny_pipeline(image_size=32), name) for name in SCHEDULERS}


# ---- no edits: bit-identical to the wrapped pipeline -------------------------------------------------


@pytest.mark.parametrize("name", SCHEDULERS)
def test_no_edits_is_bit_identical_under_every_scheduler(pipes, name):
    pipe = pipes[name]
    expected = pipe(PROMPT, **call_kwargs(name)).images
    out = SelfGuidancePipeline.from_pipe(pipe)(PROMPT, **call_kwargs(name))
    assert torch.equal(out.images, expected)
    # Every UNet call is recorded, also the repeated timesteps of PNDM and the second-order schedulers.
    assert len(out.trace.calls) == len(pipe.scheduler.timesteps)


@pytest.mark.parametrize(
    "layout, scheduler, size",
    [
        ("sd15", DDIMScheduler, (72, 56)),  # odd grids: latents 18x14 -> 9x7 -> 5x4 -> 3x2
        ("sd15", EulerDiscreteScheduler, (40, 40)),
        ("sd2", DDIMScheduler, (64, 64)),
        ("zero_snr", DDIMScheduler, (64, 64)),
        ("zero_snr", EulerDiscreteScheduler, (64, 64)),
        ("lcm", LCMScheduler, (64, 64)),
    ],
)
def test_no_edits_is_bit_identical_on_every_layout(layout, scheduler, size):
    pipe = tiny_pipeline(layout=layout)
    pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    kwargs = dict(height=size[0], width=size[1], num_inference_steps=STEPS, guidance_scale=3.0, output_type="np")
    expected = pipe(PROMPT, generator=seeded(), **kwargs).images
    out = SelfGuidancePipeline.from_pipe(pipe)(PROMPT, generator=seeded(), **kwargs)
    np.testing.assert_array_equal(out.images, expected)
    assert out.images.shape[1:3] == size


def embeds_of(pipe, prompt, negative=None):
    return pipe.encode_prompt(prompt, "cpu", 1, True, negative)


def scale_latents(pipe, i, t, tensors):
    return {"latents": tensors["latents"] * 0.9}


def interrupt_after_the_first_step(pipe, i, t, tensors):
    pipe._interrupt = True  # diffusers' loop skips every step after this one
    return {}


ARGUMENTS = {
    "string_negative_prompt": lambda pipe: dict(negative_prompt="blurry"),
    "num_images_per_prompt": lambda pipe: dict(num_images_per_prompt=2),
    "batch_and_images_per_prompt": lambda pipe: dict(prompt=[PROMPT, "a cat"], num_images_per_prompt=2, negative_prompt=["blue", "red"]),
    "prompt_embeds": lambda pipe: dict(
        prompt=None, prompt_embeds=embeds_of(pipe, PROMPT, "blurry")[0], negative_prompt_embeds=embeds_of(pipe, PROMPT, "blurry")[1]
    ),
    "callback_on_step_end": lambda pipe: dict(callback_on_step_end=scale_latents),
    "interrupt": lambda pipe: dict(callback_on_step_end=interrupt_after_the_first_step),
    "cfg_cutoff_callback": lambda pipe: dict(
        callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.4), callback_on_step_end_tensor_inputs=["prompt_embeds"]
    ),
    "guidance_rescale": lambda pipe: dict(guidance_rescale=0.7),
    "clip_skip": lambda pipe: dict(clip_skip=1),
    "cross_attention_kwargs": lambda pipe: dict(cross_attention_kwargs={"scale": 0.5}),
    "timesteps": lambda pipe: dict(timesteps=[999, 600, 200]),
    "sigmas": lambda pipe: dict(sigmas=[14.0, 3.0, 0.5]),
    # diffusers takes the default size for both sides when either is missing.
    "height_alone": lambda pipe: dict(height=40),
    "width_alone": lambda pipe: dict(width=40),
}


def outcome(call):
    """The latents a call returns, or the type of the error it raises."""
    try:
        return call().images
    except Exception as error:  # noqa: BLE001 - the wrapped pipeline's own failure is the expectation
        return type(error)


@pytest.mark.parametrize("argument", ARGUMENTS)
def test_each_pipeline_argument_as_diffusers(argument):
    # Euler takes custom timesteps and sigmas; the rest do not depend on the scheduler.
    pipe = with_scheduler(tiny_pipeline(), "euler")
    kwargs = {"prompt": PROMPT, "num_inference_steps": STEPS, "output_type": "latent", **ARGUMENTS[argument](pipe)}
    expected = outcome(lambda: pipe(generator=seeded(), **kwargs))
    out = outcome(lambda: SelfGuidancePipeline.from_pipe(pipe)(generator=seeded(), **kwargs))
    if isinstance(expected, type):
        # clip_skip and a LoRA scale fail inside diffusers' encode_prompt with this transformers
        # (CLIPTextModel has no `text_model`): the same failure, not another.
        assert out is expected
    else:
        assert torch.equal(out, expected)


@pytest.mark.parametrize("output_type", ["np", "pt"])
def test_a_batch_of_four_images_decodes_as_in_diffusers(output_type):
    pipe = tiny_pipeline(image_size=32)
    kwargs = dict(prompt=[PROMPT, "a cat"], num_images_per_prompt=2, num_inference_steps=2, output_type=output_type)
    expected = pipe(generator=seeded(), **kwargs).images
    out = SelfGuidancePipeline.from_pipe(pipe)(generator=seeded(), **kwargs).images
    assert len(out) == 4 and type(out) is type(expected)
    assert (out == expected).all()


def test_a_non_square_unet_sample_size_is_the_default_size_as_in_diffusers():
    components = tiny_components()
    components["unet"].register_to_config(sample_size=(10, 14))  # latents 10x14: 40x56 images
    pipe = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    kwargs = dict(num_inference_steps=2, output_type="np")
    expected = pipe(PROMPT, generator=seeded(), **kwargs).images
    out = SelfGuidancePipeline.from_pipe(pipe)(PROMPT, generator=seeded(), **kwargs)
    assert expected.shape[1:3] == (40, 56)
    np.testing.assert_array_equal(out.images, expected)
    assert out.trace is not None


def test_a_prompt_with_embeddings_takes_its_words_from_the_prompt_and_its_image_from_the_embeddings(tiny_pipe):
    # diffusers takes one or the other; the wrapper takes the words from `prompt` (for edits and
    # traces) and conditions on `prompt_embeds`, here those of another prompt.
    embeds = embeds_of(tiny_pipe, "a cat")[0]
    kwargs = dict(num_inference_steps=2, output_type="latent")
    expected = tiny_pipe(prompt_embeds=embeds, generator=seeded(), **kwargs).images
    assert not torch.equal(expected, tiny_pipe(PROMPT, generator=seeded(), **kwargs).images)
    out = SelfGuidancePipeline.from_pipe(tiny_pipe)(PROMPT, prompt_embeds=embeds, generator=seeded(), **kwargs)
    assert torch.equal(out.images, expected)
    assert out.trace.prompt == PROMPT and "circle" in out.trace.words


class GainProcessor(AttnProcessor2_0):
    """A user's processor on a layer self-guidance does not capture, reading its own keyword from
    `cross_attention_kwargs`, as diffusers hands them to every processor."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, gain=1.0):
        return gain * super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def test_cross_attention_kwargs_reach_the_attention_processors_as_in_diffusers():
    pipe = tiny_pipeline(image_size=32)
    sg = SelfGuidancePipeline.from_pipe(pipe)
    own = [name for name in pipe.unet.attn_processors if name.startswith("down_blocks.0") and ".attn1." in name]
    assert own and not any(name.removesuffix(".processor") in sg.layers for name in own)
    pipe.unet.set_attn_processor({name: GainProcessor() if name in own else p for name, p in pipe.unet.attn_processors.items()})
    kwargs = dict(num_inference_steps=STEPS, output_type="latent", cross_attention_kwargs={"gain": 1.7})
    expected = pipe(PROMPT, generator=seeded(), **kwargs).images
    assert not torch.equal(expected, pipe(PROMPT, generator=seeded(), **{**kwargs, "cross_attention_kwargs": None}).images)
    assert torch.equal(sg(PROMPT, generator=seeded(), **kwargs).images, expected)
    zero_scale = sg(PROMPT, generator=seeded(), edits=[move("circle", dx=0.2)], self_guidance_scale=0.0, **kwargs)
    assert torch.equal(zero_scale.images, expected)


@pytest.mark.parametrize("schedule", [dict(timesteps=[999, 600, 200]), dict(sigmas=[14.0, 3.0, 0.5]), {}],
                         ids=["timesteps", "sigmas", "steps"])
def test_an_edit_runs_both_passes_on_the_schedule_asked_for(schedule):
    """A zero-scale edit without a trace runs the unedited pass and then the edited one, both on the
    custom timesteps or sigmas asked for (the scheduler set again between them): diffusers' image."""
    pipe = with_scheduler(tiny_pipeline(), "euler")
    kwargs = dict(num_inference_steps=STEPS, output_type="latent", **schedule)
    expected = pipe(PROMPT, generator=seeded(), **kwargs).images
    sg = SelfGuidancePipeline.from_pipe(pipe)
    out = sg(PROMPT, generator=seeded(), edits=[move("circle", dx=0.2)], self_guidance_scale=0.0, **kwargs)
    assert torch.equal(out.images, expected)
    assert [t for t, _ in out.trace.calls] == [int(t) for t in pipe.scheduler.timesteps]


def test_a_trace_of_one_prompt_of_a_batch_keeps_its_own_negative_prompt(tiny_pipe):
    sg = SelfGuidancePipeline.from_pipe(tiny_pipe)
    common = dict(num_inference_steps=STEPS, output_type="latent")
    batch = sg([PROMPT, "a red cat"], negative_prompt=["blurry", "dark"], generator=seeded(), **common)
    first, second = batch.trace
    sg(PROMPT, edits=[move("circle", dx=0.2)], trace=first, negative_prompt="blurry", **common)
    sg("a red cat", edits=[move("cat", dx=0.2)], trace=second, negative_prompt="dark", **common)
    with pytest.raises(ValueError, match="negative_prompt: 'dark' there, 'blurry' here"):
        sg("a red cat", edits=[move("cat", dx=0.2)], trace=second, negative_prompt="blurry", **common)


def test_a_callback_sees_and_replaces_what_diffusers_hands_it():
    # Every call's (i, t, tensors) as diffusers' own loop hands them over; the negative embedding
    # replaced at the first step is what the later steps see (and the latents replaced at the second).
    def recorder(calls):
        def callback(pipe, i, t, tensors):
            calls.append((i, t, {name: value.clone() for name, value in tensors.items()}))
            if i == 0:
                return {"negative_prompt_embeds": tensors["negative_prompt_embeds"] * 0.5}
            return {"latents": tensors["latents"] * 0.9} if i == 1 else {}
        return callback

    pipe = tiny_pipeline(image_size=32)
    names = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    expected, got = [], []
    kwargs = dict(num_inference_steps=STEPS, output_type="latent", callback_on_step_end_tensor_inputs=names)
    want = pipe(PROMPT, generator=seeded(), callback_on_step_end=recorder(expected), **kwargs).images
    out = SelfGuidancePipeline.from_pipe(pipe)(PROMPT, generator=seeded(), callback_on_step_end=recorder(got), **kwargs)
    assert torch.equal(out.images, want)
    assert [(i, int(t)) for i, t, _ in got] == [(i, int(t)) for i, t, _ in expected] == [
        (i, int(t)) for i, t in enumerate(pipe.scheduler.timesteps)]
    assert all(torch.is_tensor(t) for _, t, _ in got)
    for (_, _, mine), (_, _, theirs) in zip(got, expected):
        assert set(mine) == set(names)
        for name in names:
            assert torch.equal(mine[name], theirs[name]), name
    assert not torch.equal(expected[1][2]["negative_prompt_embeds"], expected[0][2]["negative_prompt_embeds"])


def test_return_dict_false_and_the_safety_checker_output():
    pipe = tiny_pipeline()
    expected = pipe(PROMPT, num_inference_steps=2, generator=seeded(), output_type="np", return_dict=False)
    images, nsfw = SelfGuidancePipeline.from_pipe(pipe)(PROMPT, num_inference_steps=2, generator=seeded(), output_type="np", return_dict=False)
    np.testing.assert_array_equal(images, expected[0])
    assert nsfw == expected[1]


def test_the_safety_checker_runs_as_in_diffusers():
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    pipe = tiny_pipeline(image_size=32)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, image_size=32, patch_size=8)
    config = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4), vision_config=vision, projection_dim=16)
    torch.manual_seed(0)
    checker = StableDiffusionSafetyChecker(config).eval()
    # Lower the concepts' thresholds so that the check flags images: the flags and blacked-out images are compared.
    checker.concept_embeds_weights.fill_(-1.0)
    pipe.register_modules(safety_checker=checker, feature_extractor=CLIPImageProcessor(crop_size=32, size=32))
    kwargs = lambda: dict(num_inference_steps=2, num_images_per_prompt=2, output_type="np")  # noqa: E731
    expected = pipe(PROMPT, generator=seeded(), **kwargs())
    out = SelfGuidancePipeline.from_pipe(pipe)(PROMPT, generator=seeded(), **kwargs())
    np.testing.assert_array_equal(out.images, expected.images)
    assert out.nsfw_content_detected == expected.nsfw_content_detected
    assert any(expected.nsfw_content_detected)


def test_a_zero_scale_edit_on_a_guidance_embedded_unet():
    pipe = tiny_pipeline(image_size=32, layout="lcm")
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    sg = SelfGuidancePipeline.from_pipe(pipe)
    kwargs = lambda: dict(num_inference_steps=STEPS, guidance_scale=3.0, generator=seeded(), output_type="latent")  # noqa: E731
    expected = pipe(PROMPT, **kwargs()).images
    out = sg(PROMPT, edits=[move("circle", dx=0.3)], self_guidance_scale=0.0, **kwargs())
    assert out.energies and torch.equal(out.images, expected)


def test_a_guided_step_on_a_guidance_embedded_unet_passes_its_guidance_embedding():
    # The UNet's inputs at every call, as diffusers passes them: the guided (conditional) pass too
    # gets the guidance-scale embedding.
    pipe = tiny_pipeline(image_size=32, layout="lcm")
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    seen = []
    hook = pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("timestep_cond")), with_kwargs=True)
    try:
        kwargs = lambda: dict(num_inference_steps=STEPS, guidance_scale=3.0, generator=seeded(), output_type="latent")  # noqa: E731
        pipe(PROMPT, **kwargs())
        expected, seen[:] = list(seen), []
        out = SelfGuidancePipeline.from_pipe(pipe)(PROMPT, edits=[move("circle", dx=0.3)], guidance_schedule=[True] * STEPS,
                                                  **kwargs())
    finally:
        hook.remove()
    # The edited call runs the unedited one first (for the edit's reference trace), then the guided one.
    assert len(out.energies) == STEPS and len(expected) == STEPS and len(seen) == 2 * STEPS
    for got, want in zip(seen, expected + expected):
        assert want is not None and got is not None and torch.equal(got, want)


# ---- a zero-scale edit reproduces the unedited image, under every scheduler ---------------------------


MOVE = dict(edits=[move("circle", dx=0.3, keep_others=False)], normalize_gradient=True, guidance_schedule=[True] * STEPS)


@pytest.fixture(scope="module")
def edited(pipes):
    """Per scheduler, computed once: the unedited generation, and a move at v = 0 (run inside the call,
    and from the trace without a generator) and at v = 3."""
    runs = {}

    def run(name):
        if name not in runs:
            sg = SelfGuidancePipeline.from_pipe(pipes[name])
            plain = sg(PROMPT, **call_kwargs(name))
            no_generator = call_kwargs(name)
            no_generator.pop("generator")
            runs[name] = dict(
                plain=plain,
                inside=sg(PROMPT, self_guidance_scale=0.0, **MOVE, **call_kwargs(name)),
                reused=sg(PROMPT, self_guidance_scale=0.0, trace=plain.trace, **MOVE, **no_generator),
                moved=sg(PROMPT, self_guidance_scale=3.0, **MOVE, **call_kwargs(name)),
            )
        return runs[name]

    return run


@pytest.mark.parametrize("name", SCHEDULERS)
def test_zero_scale_edit_reproduces_the_unedited_image(edited, name):
    runs = edited(name)
    # Without a trace the unedited pass runs inside the call: the step noise must not be consumed by it.
    # With a trace (and no generator) the step noise is replayed from the trace.
    assert runs["inside"].energies and runs["reused"].energies
    assert torch.equal(runs["inside"].images, runs["plain"].images)
    assert torch.equal(runs["reused"].images, runs["plain"].images)
    # The unedited image: at every UNet call the maps are the reference's at that call (also where a
    # timestep repeats: PNDM, Heun, KDPM2), so the move's energy is the same at every call.
    for run in ("inside", "reused"):
        energies = [e for _, e in runs[run].energies]
        assert max(energies) - min(energies) <= 1e-5 * max(energies), (run, energies)


def test_zero_scale_edits_on_a_batch_with_images_per_prompt(pipes):
    sg = SelfGuidancePipeline.from_pipe(pipes["ddim_eta"])
    prompts = [PROMPT, "a red cat"]
    edits = [[move("circle", dx=0.3)], [keep_shape(["cat"])]]
    kwargs = lambda: dict(num_images_per_prompt=2, negative_prompt="blurry", **call_kwargs("ddim_eta"))  # noqa: E731
    plain = sg(prompts, **kwargs())
    inside = sg(prompts, edits=edits, self_guidance_scale=0.0, **kwargs())
    no_generator = kwargs()
    no_generator.pop("generator")
    reused = sg(prompts, edits=edits, self_guidance_scale=0.0, trace=plain.trace, **no_generator)
    assert len(plain.trace) == 4 and [t.prompt for t in plain.trace] == [PROMPT, PROMPT, "a red cat", "a red cat"]
    assert torch.equal(inside.images, plain.images) and torch.equal(reused.images, plain.images)


def progress_seen(pipe, run):
    """Run `run()` with a recording progress bar on `pipe`: the bar's count before each UNet call
    (the step the call belongs to), its updates, and the totals it was opened with."""

    class Bar:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n=1):
            updates[0] += n

    updates, steps, totals = [0], [], []
    hook = pipe.unet.register_forward_pre_hook(lambda *a: steps.append(updates[0]))
    pipe.progress_bar = lambda iterable=None, total=None: totals.append(total) or Bar()
    try:
        run()
    finally:
        hook.remove()
        del pipe.progress_bar
    return steps, updates[0], totals


def diffusers_call_steps(pipe, name):
    """The step each UNet call belongs to in diffusers' own loop, and the bar's count of updates."""
    steps, updates, _ = progress_seen(pipe, lambda: pipe(PROMPT, **call_kwargs(name)))
    return steps, updates


@pytest.mark.parametrize("name", ["pndm", "heun", "ddim"])
def test_the_progress_bar_counts_steps_as_diffusers_does(pipes, name):
    """The same bar as diffusers': opened for the step count, one update per inference step, at the
    same UNet calls. With edits and no trace, the unedited generation and then the edited one (whose
    guided steps make more UNet calls), each with such a bar."""
    pipe = pipes[name]
    sg = SelfGuidancePipeline.from_pipe(pipe)
    want = progress_seen(pipe, lambda: pipe(PROMPT, **call_kwargs(name)))
    assert want[1:] == (STEPS, [STEPS])
    assert progress_seen(pipe, lambda: sg(PROMPT, **call_kwargs(name))) == want
    _, updates, totals = progress_seen(pipe, lambda: sg(PROMPT, self_guidance_scale=1e-30, **MOVE, **call_kwargs(name)))
    assert (updates, totals) == (2 * STEPS, [STEPS, STEPS])


def test_each_unet_call_belongs_to_the_step_of_diffusers_progress_bar(pipes):
    from sgfast.sampler import call_steps

    for name in ("pndm", "heun", "ddim"):
        steps, updates = diffusers_call_steps(pipes[name], name)
        order = pipes[name].scheduler.order
        assert updates == STEPS and len(steps) > (STEPS if name != "ddim" else STEPS - 1)
        assert call_steps(len(steps), STEPS, order) == steps, name
        if order == 1:
            assert call_steps(len(steps), STEPS) == steps, name
    assert call_steps(4) == [0, 1, 2, 3]  # without a step count, every call its own step


@pytest.mark.parametrize("name", ["pndm", "heun", "kdpm2_a", "ddim"])
@pytest.mark.parametrize("guided", [0, 1, 2])
def test_a_scheduled_step_guides_every_unet_call_of_that_step(pipes, name, guided):
    """guidance_schedule counts inference steps as diffusers' progress bar does: a schedule of one
    step guides exactly the UNet calls diffusers' loop makes in that step (PNDM's extra first call,
    both calls of a second-order step), each recorded with its step."""
    steps, _ = diffusers_call_steps(pipes[name], name)
    sg = SelfGuidancePipeline.from_pipe(pipes[name])
    out = sg(PROMPT, self_guidance_scale=1e-30, **{**MOVE, "guidance_schedule": [guided]}, **call_kwargs(name))
    assert [step for step, _ in out.energies] == [s for s in steps if s == guided]
    assert len(out.energies) == steps.count(guided) >= 1


@pytest.mark.parametrize("name", ["pndm", "heun"])
def test_a_guided_step_reads_the_reference_of_its_own_call(pipes, name):
    # A vanishing scale leaves the image unedited: at every call (also the second of a repeated
    # timestep) the maps are the reference's at that call, and the move's energy the same.
    sg = SelfGuidancePipeline.from_pipe(pipes[name])
    out = sg(PROMPT, self_guidance_scale=1e-30, **MOVE, **call_kwargs(name))
    energies = [e for _, e in out.energies]
    assert len(energies) == len(pipes[name].scheduler.timesteps) > STEPS
    assert max(energies) - min(energies) <= 1e-5 * max(energies), energies


def test_a_zero_scale_edit_with_guidance_rescale_is_diffusers_image(pipes):
    pipe = pipes["ddim"]
    expected = pipe(PROMPT, guidance_rescale=0.7, **call_kwargs("ddim")).images
    assert not torch.equal(expected, pipe(PROMPT, **call_kwargs("ddim")).images)
    sg = SelfGuidancePipeline.from_pipe(pipe)
    out = sg(PROMPT, guidance_rescale=0.7, self_guidance_scale=0.0, **MOVE, **call_kwargs("ddim"))
    assert len(out.energies) == STEPS and torch.equal(out.images, expected)
    # A vanishing scale: the guided steps' own (batch-1) passes, rescaled as diffusers rescales.
    out = sg(PROMPT, guidance_rescale=0.7, self_guidance_scale=1e-30, **MOVE, **call_kwargs("ddim"))
    assert len(out.energies) == STEPS
    torch.testing.assert_close(out.images, expected, rtol=1e-4, atol=1e-4)
    # Steps the schedule leaves unguided are rescaled too, and so is the unedited pass that records
    # the reference: a vanishing scale on step 1 alone is diffusers' image within the guided step's rounding.
    out = sg(PROMPT, guidance_rescale=0.7, self_guidance_scale=1e-30, **{**MOVE, "guidance_schedule": [1]},
             **call_kwargs("ddim"))
    assert [step for step, _ in out.energies] == [1]
    torch.testing.assert_close(out.images, expected, rtol=1e-4, atol=1e-4)


# ---- a move lowers its energy, under every scheduler -------------------------------------------------


@pytest.mark.parametrize("name", SCHEDULERS)
def test_a_move_lowers_its_energy(edited, name):
    runs = edited(name)
    moved, unmoved = runs["moved"].energies, runs["inside"].energies
    assert torch.isfinite(runs["moved"].images).all()
    assert [s for s, _ in moved] == [s for s, _ in unmoved]
    assert moved[-1][1] < unmoved[-1][1] and moved[-1][1] < moved[0][1]


@pytest.mark.parametrize("layout", ["sd2", "zero_snr"])
@pytest.mark.parametrize("scheduler", [DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler])
def test_a_move_on_a_v_prediction_model(layout, scheduler):
    pipe = tiny_pipeline(image_size=32, layout=layout)
    pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    sg = SelfGuidancePipeline.from_pipe(pipe)
    runs = {
        v: sg(PROMPT, edits=[move("circle", dx=0.3, keep_others=False)], num_inference_steps=STEPS, generator=seeded(),
              output_type="latent", guidance_schedule=[True] * STEPS, self_guidance_scale=v, normalize_gradient=True)
        for v in (0.0, 1.0)
    }
    assert torch.isfinite(runs[1.0].images).all()
    assert runs[1.0].energies[-1][1] < runs[0.0].energies[-1][1]
    # Zero SNR at the first step (alpha_bar 0, or diffusers' 2**-24 stand-in): no model output can carry
    # the term there, so that step is not guided.
    assert [step for step, _ in runs[1.0].energies] == ([1, 2] if layout == "zero_snr" else [0, 1, 2])


# ---- the guidance term is the same push under every scheduler -----------------------------------------


def applied_sigma(scheduler, t):
    """The sigma the scheduler applies, read off its own arithmetic: the input scale of a sigma-space
    scheduler (1 / sqrt(sigma^2 + 1)), the x0 a VP solver predicts from eps = 1 at z = 0 (-sigma),
    else alphas_cumprod at the timestep (DEIS converts back to eps: its table is the timesteps' own)."""
    if float(scheduler.init_noise_sigma) != 1.0:
        scale = float(scheduler.scale_model_input(torch.ones((), dtype=torch.float64), t))
        return (1.0 / scale**2 - 1.0) ** 0.5
    if hasattr(scheduler, "convert_model_output") and not isinstance(scheduler, DEISMultistepScheduler):
        x0 = scheduler.convert_model_output(torch.ones(1, 1), sample=torch.zeros(1, 1))
        return -float(x0)
    alpha_bar = float(scheduler.alphas_cumprod[int(t)])
    return ((1 - alpha_bar) / alpha_bar) ** 0.5


@pytest.mark.parametrize("name", [n for n in SCHEDULERS if n != "ddim_eta"])
def test_noise_level_is_the_sigma_the_scheduler_applies(pipes, name):
    scheduler = type(pipes[name].scheduler).from_config(pipes[name].scheduler.config)
    scheduler.set_timesteps(4)
    z = torch.zeros(1, 4, 2, 2)
    for t in scheduler.timesteps:
        scheduler.scale_model_input(z, t)
        sigma, alpha_bar = noise_level(scheduler, t)
        sigma_space = sigma if float(scheduler.init_noise_sigma) != 1.0 else sigma / alpha_bar**0.5
        assert sigma_space == pytest.approx(applied_sigma(scheduler, t), rel=1e-4)
        scheduler.step(torch.zeros_like(z), t, z)


def test_only_the_zero_snr_stand_in_is_left_unguided():
    # A zero-terminal-SNR schedule ends at alpha_bar = 0 (DDIM), or at diffusers' 2**-24 stand-in for
    # it (Euler, as sigma 4096); any larger alpha_bar, even twice that, is a finite SNR and is guided.
    from sgfast.sampler import can_guide

    config = tiny_pipeline().scheduler.config
    for cls, last in ((DDIMScheduler, 0.0), (EulerDiscreteScheduler, 2.0**-24)):
        scheduler = cls.from_config(config, rescale_betas_zero_snr=True, timestep_spacing="trailing")
        scheduler.set_timesteps(4)
        assert float(scheduler.alphas_cumprod[999]) == last
        guided = []
        for t in scheduler.timesteps:
            guided.append(can_guide(scheduler, t))
            scheduler.step(torch.zeros(1, 1, 1, 1), t, torch.zeros(1, 1, 1, 1))
        assert [int(t) for t in scheduler.timesteps][0] == 999 and guided == [False, True, True, True], cls
    scheduler = DDIMScheduler.from_config(config, rescale_betas_zero_snr=True, timestep_spacing="trailing")
    scheduler.alphas_cumprod[999] = 2 * 2.0**-24
    assert can_guide(scheduler, torch.tensor(999))


def test_a_normalised_gradient_pushes_the_same_on_sigma_and_vp_schedulers():
    pipe = tiny_pipeline()
    unit = torch.ones(1, 4, 2, 2)
    terms = []
    for cls in (DDIMScheduler, EulerDiscreteScheduler, LMSDiscreteScheduler):
        scheduler = cls.from_config(pipe.scheduler.config, timestep_spacing="leading")
        scheduler.set_timesteps(10)
        t = scheduler.timesteps[0]
        scheduler.scale_model_input(unit, t)
        terms.append(guidance_term(scheduler, 0, t, unit, 1.0, normalized=True))
        assert float(terms[-1][0, 0, 0, 0]) == pytest.approx((1 - float(scheduler.alphas_cumprod[int(t)])) ** 0.5, rel=1e-4)
    torch.testing.assert_close(terms[1], terms[0], rtol=1e-4, atol=0)
    torch.testing.assert_close(terms[2], terms[0], rtol=1e-4, atol=0)


# ---- PNDM: N + 1 UNet calls for N steps ---------------------------------------------------------------


def test_pndm_takes_a_schedule_of_its_steps_and_records_every_call(pipes):
    sg = SelfGuidancePipeline.from_pipe(pipes["pndm"])
    out = sg(PROMPT, edits=[move("circle", dx=0.2)], guidance_schedule=[True, False, True], **call_kwargs("pndm"))
    # Calls 0 and 1 make step 0 (PNDM's first step calls twice); call 3 is step 2.
    assert [step for step, _ in out.energies] == [0, 0, 2]
    assert [t for t, _ in out.trace.calls] == [int(t) for t in sg.pipe.scheduler.timesteps]
    assert len(out.trace.calls) == STEPS + 1


# ---- sizes --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(72, 72), (40, 56)])
def test_sizes_not_multiples_of_32_edit_and_trace(size):
    pipe = tiny_pipeline(layout="sd15")
    sg = SelfGuidancePipeline.from_pipe(pipe)
    kwargs = dict(height=size[0], width=size[1], num_inference_steps=2, generator=seeded(), output_type="latent")
    out = sg(PROMPT, edits=[move("circle", dx=0.2)], **kwargs)
    assert torch.isfinite(out.images).all() and out.trace.image_size == size
    photo = np.random.default_rng(0).random((*size, 3)).astype(np.float32)
    assert sg.trace_image(photo, PROMPT, num_inference_steps=2, generator=seeded()).image_size == size


def test_a_source_at_another_resolution_is_resampled():
    sg = SelfGuidancePipeline.from_pipe(tiny_pipeline())
    photo = np.random.default_rng(0).random((96, 96, 3)).astype(np.float32)
    source = sg.trace_image(photo, PROMPT, num_inference_steps=2, generator=seeded())
    out = sg(PROMPT, edits=[copy_layout(source)], num_inference_steps=2, generator=seeded(), output_type="latent")
    assert torch.isfinite(out.images).all() and out.energies


# ---- refused clearly ----------------------------------------------------------------------------------


class OwnProcessor(AttnProcessor2_0):
    """A user's processor that does more than plain attention (IP-Adapter, prompt-to-prompt...)."""


def processors(pipe):
    return {name: type(p).__name__ for name, p in pipe.unet.attn_processors.items()}


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda sg: sg(PROMPT, edits=[keep_shape([])], num_inference_steps=2), "KeepShape names no word"),
        (lambda sg: sg("a and the", edits=[keep_appearance()], num_inference_steps=2), "KeepAppearance names no word"),
        (lambda sg: sg(PROMPT, edits=[move("circle")], guidance_schedule=[], num_inference_steps=3), "guides none of the 3"),
    ],
)
def test_unsupported_calls_are_refused_clearly(tiny_pipe, call, message):
    sg = SelfGuidancePipeline.from_pipe(tiny_pipe)
    before, state = processors(tiny_pipe), torch.random.get_rng_state()
    with pytest.raises(ValueError, match=message):
        call(sg)
    assert processors(tiny_pipe) == before
    assert torch.equal(torch.random.get_rng_state(), state)


# Calls diffusers' own check_inputs refuses, each through one of the arguments the wrapper hands it.
REFUSED_AS_DIFFUSERS = {
    "a prompt that is not text": lambda pipe: dict(prompt=3),
    "a size not divisible by 8": lambda pipe: dict(height=60, width=64),
    "negative_prompt with its embeddings": lambda pipe: dict(
        prompt=None, prompt_embeds=embeds_of(pipe, PROMPT)[0], negative_prompt_embeds=embeds_of(pipe, PROMPT)[1],
        negative_prompt="red"),
    "embeddings of other shapes": lambda pipe: dict(
        prompt=None, prompt_embeds=embeds_of(pipe, PROMPT)[0], negative_prompt_embeds=torch.zeros(1, 7, 32)),
    "an IP-Adapter image and its embeddings": lambda pipe: dict(
        ip_adapter_image=torch.zeros(1, 3, 32, 32), ip_adapter_image_embeds=[torch.zeros(2, 1, 16)]),
    "a callback tensor input diffusers does not hand out": lambda pipe: dict(
        callback_on_step_end=scale_latents, callback_on_step_end_tensor_inputs=["noise_pred"]),
}


@pytest.mark.parametrize("name", REFUSED_AS_DIFFUSERS)
def test_a_call_diffusers_refuses_is_refused_with_its_message(tiny_pipe, name):
    kwargs = dict(dict(prompt=PROMPT, num_inference_steps=2, output_type="latent"), **REFUSED_AS_DIFFUSERS[name](tiny_pipe))
    expected, got, unet_calls = refusals(tiny_pipe, SelfGuidancePipeline.from_pipe(tiny_pipe), **kwargs)
    assert expected is not None and got == expected and unet_calls == 0


@pytest.mark.parametrize(
    "change, named",
    [
        (dict(height=72, width=72), "height, width"),
        (dict(num_inference_steps=4), "num_inference_steps"),
        (dict(guidance_scale=3.0), "guidance_scale"),
        (dict(negative_prompt="blurry"), "negative_prompt"),
        (dict(guidance_rescale=0.7), "guidance_rescale"),
        (dict(eta=0.5), "eta"),
    ],
)
def test_a_trace_from_other_settings_is_refused(tiny_pipe, change, named):
    sg = SelfGuidancePipeline.from_pipe(tiny_pipe)
    trace = sg(PROMPT, num_inference_steps=STEPS, generator=seeded(), output_type="latent").trace
    kwargs = {"num_inference_steps": STEPS, "output_type": "latent", **change}
    with pytest.raises(ValueError, match=f"other settings than this call: {named}: [^;]* there, [^;]* here. Leave them out"):
        sg(PROMPT, edits=[move("circle", dx=0.2)], trace=trace, **kwargs)


def test_a_trace_from_another_scheduler_is_refused(pipes):
    trace = SelfGuidancePipeline.from_pipe(pipes["ddim"])(PROMPT, **call_kwargs("ddim")).trace
    with pytest.raises(ValueError, match="scheduler: 'DDIMScheduler' there, 'EulerDiscreteScheduler' here"):
        SelfGuidancePipeline.from_pipe(pipes["euler"])(PROMPT, edits=[move("circle", dx=0.2)], trace=trace, **call_kwargs("euler"))


def test_own_processors_are_left_alone_without_edits_and_refused_with_them():
    pipe = tiny_pipeline()
    sg = SelfGuidancePipeline.from_pipe(pipe)
    own = {name: OwnProcessor() for name in pipe.unet.attn_processors}
    pipe.unet.set_attn_processor(own)
    seen = []
    OwnProcessor.__call__ = lambda self, *a, **k: seen.append(1) or AttnProcessor2_0.__call__(self, *a, **k)
    try:
        expected = pipe(PROMPT, num_inference_steps=2, generator=seeded(), output_type="latent").images
        count = len(seen)
        out = sg(PROMPT, num_inference_steps=2, generator=seeded(), output_type="latent")
        assert torch.equal(out.images, expected) and len(seen) == 2 * count and out.trace is None
        with pytest.raises(ValueError, match="have their own: up_blocks.0.attentions.0.transformer_blocks.0.attn2 \\(OwnProcessor\\)"):
            sg(PROMPT, edits=[move("circle", dx=0.2)], num_inference_steps=2)
    finally:
        del OwnProcessor.__call__


# ---- the built-in model: the tuned move lands on target under every scheduler ---------------------------

MOVE_SEEDS = 6
MOVE_STEPS = 20


def move_errors(pipe, seeds=MOVE_SEEDS, steps=MOVE_STEPS, guidance_scale=5.0):
    """|measured - asked| horizontal displacement (image widths) of the tuned move of the first object
    of held-out captions on a built-in model, read by the scene reader; None where the unedited image
    does not show the caption (as the quality benchmark counts them), inf where the moved object is
    not found."""
    from benchmarks.quality import captions
    from sgfast.shapes.scenes import by_colour, matches_caption, parse_caption, read_change, read_scene

    pipe.set_progress_bar_config(disable=True)
    sg = SelfGuidancePipeline.from_pipe(pipe, mode="fast")
    errors = []
    for k, caption in enumerate(captions(seeds)):
        common = dict(num_inference_steps=steps, guidance_scale=guidance_scale, output_type="np")
        base = sg(caption, generator=seeded(k), **common)
        before = (base.images[0] * 255).round().astype(np.uint8)
        objects = read_scene(before)
        if not matches_caption(objects, caption):
            errors.append(None)
            continue
        (colour, shape), _ = parse_caption(caption)
        dx = 0.25 if by_colour(objects, colour).centroid[0] < 0.5 else -0.25
        # A bare call: the model's own settings (its self_guidance.json) are the defaults.
        moved = sg(caption, edits=[move(shape, dx=dx)], trace=base.trace, **common)
        after = (moved.images[0] * 255).round().astype(np.uint8)
        change = read_change(caption, shape, before, after)
        errors.append(float("inf") if change is None else abs(change[0][0] - dx))
    return errors


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ddim", "euler", "euler_a", "dpmpp_2m", "unipc"])
def test_the_tuned_move_lands_on_target_under_every_scheduler(name):
    from sgfast.shapes import load_default_pipeline

    errors = [e for e in move_errors(with_scheduler(load_default_pipeline(), name)) if e is not None]
    print(f"{name}: |measured - asked| dx per image {[round(e, 3) for e in errors]}, median {np.median(errors):.3f}")
    assert len(errors) >= MOVE_SEEDS // 2, "too few unedited images show their caption"
    assert float(np.median(errors)) < 0.05, errors


@pytest.mark.slow
def test_a_bare_move_lands_on_target_on_the_built_in_mmdit_model():
    # Its own settings: the UNet model's edits on the maps of its last two blocks (self_guidance.json).
    from sgfast.shapes.mmdit import GUIDANCE_SCALE, load_mmdit_pipeline

    errors = [e for e in move_errors(load_mmdit_pipeline(), steps=25, guidance_scale=GUIDANCE_SCALE) if e is not None]
    print(f"MMDiT: |measured - asked| dx per image {[round(e, 3) for e in errors]}, median {np.median(errors):.3f}")
    assert len(errors) >= MOVE_SEEDS // 2, "too few unedited images show their caption"
    assert float(np.median(errors)) < 0.05, errors


@pytest.mark.parametrize("mode", ["reference", "fast"])
def test_stopping_the_energy_pass_early_gives_the_same_gradient(mode):
    from sgfast.sampler import edit_selection, guided_energy
    from sgfast.trace import PromptWords

    pipe = tiny_pipeline(image_size=32)
    sg = SelfGuidancePipeline.from_pipe(pipe, mode=mode, layers=["up_blocks.0"])  # the finest up block is left out
    reference = sg(PROMPT, num_inference_steps=2, generator=seeded(), output_type="latent").trace
    edits = [[move("circle", dx=0.2)]]
    words = [PromptWords.from_tokenizer(pipe.tokenizer, PROMPT)]
    chosen, tokens = edit_selection(edits, words, "cpu")
    embeds = pipe.encode_prompt(PROMPT, "cpu", 1, False)[0]
    pipe.scheduler.set_timesteps(2)
    t = pipe.scheduler.timesteps[1]
    z = torch.randn(1, 4, 8, 8, generator=seeded(3))
    grads, outputs = [], []
    for stop in (False, True):
        with sg.capture() as capture, torch.enable_grad():
            zz = z.clone().requires_grad_(True)
            cond, energy = guided_energy(pipe, capture, zz, t, embeds, list(zip(edits, [reference])), words, chosen, tokens, stop=stop)
            grads.append(torch.autograd.grad(energy, zz)[0])
            outputs.append(cond)
    assert outputs[0] is not None and outputs[1] is None  # the stopped pass never reached the output
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def test_a_zero_scale_edit_ends_its_energy_pass_at_the_last_captured_layer():
    # At v = 0 the noise comes from the batched CFG pass; the energy's own pass stops inside the UNet,
    # so the UNet's output layer runs once per step, as in the unedited call.
    pipe = tiny_pipeline(image_size=32)
    sg = SelfGuidancePipeline.from_pipe(pipe)
    plain = sg(PROMPT, **call_kwargs("ddim"))
    kwargs = call_kwargs("ddim")
    kwargs.pop("generator")
    calls = []
    hook = pipe.unet.conv_out.register_forward_hook(lambda *a: calls.append(1))
    try:
        out = sg(PROMPT, self_guidance_scale=0.0, trace=plain.trace, **MOVE, **kwargs)
    finally:
        hook.remove()
    assert len(out.energies) == STEPS and len(calls) == STEPS
    assert torch.equal(out.images, plain.images)


def test_a_zero_scale_step_under_a_lora_scale_runs_its_energy_pass_to_the_end():
    # The step itself (a full call with a LoRA scale fails in diffusers' encode_prompt here): under a
    # LoRA scale the energy's pass runs through the UNet's output layer, without one it stops inside.
    from sgfast.guided import GuidedCall
    from sgfast.sampler import edit_selection, guided_step
    from sgfast.trace import PromptWords

    pipe = tiny_pipeline(image_size=32)
    sg = SelfGuidancePipeline.from_pipe(pipe)
    reference = sg(PROMPT, num_inference_steps=2, generator=seeded(), output_type="latent").trace
    edits = [[move("circle", dx=0.2)]]
    words = [PromptWords.from_tokenizer(pipe.tokenizer, PROMPT)]
    chosen, tokens = edit_selection(edits, words, "cpu")
    cond, uncond = pipe.encode_prompt(PROMPT, "cpu", 1, True)
    pipe.scheduler.set_timesteps(2)
    t = pipe.scheduler.timesteps[1]
    z = torch.randn(1, 4, 8, 8, generator=seeded(3))
    for scale, outputs in ((None, 1), (1.0, 1), (0.5, 2)):
        unet_kwargs = {} if scale is None else {"cross_attention_kwargs": {"scale": scale}}
        calls = []
        hook = pipe.unet.conv_out.register_forward_hook(lambda *a: calls.append(1))
        try:
            with sg.capture() as capture:
                embeds = torch.cat([uncond, cond])
                call = GuidedCall(pipe, capture, edits, [reference], words, chosen, tokens, pipe.scheduler.timesteps,
                                  [1], z, embeds)
                guided_step(call, z, 1, t, embeds, 7.5, True, unet_kwargs=unet_kwargs, guidance_rescale=0.0,
                            self_guidance_scale=0.0, normalize_gradient=False, level=None)
        finally:
            hook.remove()
        assert len(calls) == outputs, scale


def test_the_energy_pass_does_not_stop_early_under_a_lora_scale_or_a_compiled_unet():
    # diffusers scales a PEFT UNet's LoRA layers at the start of its forward and undoes it at the
    # end: a pass that stopped inside would leave them scaled. (A full call with a LoRA scale fails
    # in diffusers' encode_prompt with this transformers, so the rule is checked as it is read.)
    from types import SimpleNamespace

    from sgfast.sampler import can_stop_early

    capture = SimpleNamespace(can_stop_early=True)
    assert can_stop_early(capture, None) and can_stop_early(capture, {})
    assert can_stop_early(capture, {"cross_attention_kwargs": None, "timestep_cond": None})
    assert can_stop_early(capture, {"cross_attention_kwargs": {"scale": 1.0}})
    assert not can_stop_early(capture, {"cross_attention_kwargs": {"scale": 0.5}})
    assert not can_stop_early(capture, {"cross_attention_kwargs": {"scale": 0.0}, "timestep_cond": None})
    assert not can_stop_early(SimpleNamespace(can_stop_early=False), None)


def with_ip_adapter(pipe, embed_dim=16):
    """Load a seeded IP-Adapter (image projection and per-layer to_k_ip / to_v_ip) through diffusers'
    own loader: its IPAdapterAttnProcessor2_0 replaces every cross-attention processor."""
    unet, dim = pipe.unet, pipe.unet.config.cross_attention_dim
    g = torch.Generator().manual_seed(1)
    image_proj = {
        "proj.weight": torch.randn(4 * dim, embed_dim, generator=g) * 0.1, "proj.bias": torch.zeros(4 * dim),
        "norm.weight": torch.ones(dim), "norm.bias": torch.zeros(dim),
    }
    layers, key_id = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):  # diffusers numbers cross-attention layers 1, 3, 5, ...
            hidden = unet.get_submodule(name[: -len(".processor")]).to_q.out_features
            layers[f"{key_id}.to_k_ip.weight"] = torch.randn(hidden, dim, generator=g) * 0.1
            layers[f"{key_id}.to_v_ip.weight"] = torch.randn(hidden, dim, generator=g) * 0.1
            key_id += 2
    unet._load_ip_adapter_weights([{"image_proj": image_proj, "ip_adapter": layers}])
    return pipe


def test_ip_adapter_image_embeds_as_diffusers_and_edits_refused():
    pipe = with_ip_adapter(tiny_pipeline(image_size=32))
    embeds = [torch.randn(2, 1, 16, generator=seeded(5))]  # [negative; positive] image embeddings
    kwargs = lambda: dict(num_inference_steps=2, generator=seeded(), output_type="latent", ip_adapter_image_embeds=embeds)  # noqa: E731
    expected = pipe(PROMPT, **kwargs()).images
    sg = SelfGuidancePipeline.from_pipe(pipe)
    out = sg(PROMPT, **kwargs())
    assert torch.equal(out.images, expected) and out.trace is None  # no trace: its processors were left alone
    # Two images per prompt: the embeddings repeated within each CFG half, as diffusers repeats them.
    two = dict(kwargs(), num_images_per_prompt=2)
    expected_two = pipe(PROMPT, **two).images
    assert not torch.equal(expected_two[0], expected_two[1])
    assert torch.equal(sg(PROMPT, **dict(kwargs(), num_images_per_prompt=2)).images, expected_two)
    before = processors(pipe)
    with pytest.raises(ValueError, match=r"have their own: up_blocks.0.attentions.0.transformer_blocks.0.attn2 \(IPAdapterAttnProcessor2_0\)"):
        sg(PROMPT, edits=[move("circle", dx=0.2)], **kwargs())
    assert processors(pipe) == before


def test_an_ip_adapter_image_is_encoded_as_diffusers_encodes_it():
    pipe = with_ip_adapter(tiny_pipeline(image_size=32))
    # A tiny CLIP image encoder whose projection gives the adapter's 16-wide image embedding; a tensor
    # image goes to it as it is (no feature extractor).
    torch.manual_seed(2)
    config = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=16)
    pipe.register_modules(image_encoder=CLIPVisionModelWithProjection(config).eval())
    image = torch.rand(1, 3, 32, 32, generator=seeded(6))
    kwargs = lambda: dict(num_inference_steps=2, generator=seeded(), output_type="latent", ip_adapter_image=image)  # noqa: E731
    expected = pipe(PROMPT, **kwargs()).images
    without = pipe(PROMPT, **dict(kwargs(), ip_adapter_image_embeds=[torch.zeros(2, 1, 16)], ip_adapter_image=None)).images
    assert not torch.equal(expected, without)  # the image changes the result
    assert torch.equal(SelfGuidancePipeline.from_pipe(pipe)(PROMPT, **kwargs()).images, expected)
