"""A call with `trace=` takes, for every argument it leaves out, the value the trace was recorded with:
the edit left bare is the edit with every recorded argument given, bit for bit; a given argument that
contradicts the trace is refused by name; a bare photo edit is the call `edit_arguments` splats."""

import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler

from sgfast import SelfGuidancePipeline, move, resize
from sgfast.invert import edit_arguments
from sgfast.testing import tiny_pipeline, tiny_sdxl_pipeline

PROMPT = "a red circle and a blue square"
EDIT = dict(edits=[move("circle", dx=0.2)], self_guidance_scale=50.0, output_type="latent")


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def pipes():
    """A tiny pipeline per scheduler: DDIM, and Euler for custom timesteps and sigmas (DDIM takes neither)."""
    ddim = tiny_pipeline(image_size=32)
    euler = tiny_pipeline(image_size=32)
    euler.scheduler = EulerDiscreteScheduler.from_config(euler.scheduler.config)
    return {"ddim": ddim, "euler": euler}


RECORDED = {
    "steps": ("ddim", dict(num_inference_steps=4)),
    "size": ("ddim", dict(num_inference_steps=3, height=40, width=48)),
    "guidance": ("ddim", dict(num_inference_steps=3, guidance_scale=3.0, guidance_rescale=0.5)),
    "eta": ("ddim", dict(num_inference_steps=3, eta=1.0)),
    "negative prompt": ("ddim", dict(num_inference_steps=3, negative_prompt="a green triangle")),
    "timesteps": ("euler", dict(timesteps=[999, 600, 200])),
    "sigmas": ("euler", dict(sigmas=[14.0, 3.0, 0.5])),
    "everything": ("ddim", dict(num_inference_steps=4, height=40, width=40, guidance_scale=2.0, guidance_rescale=0.3, eta=0.5,
                                negative_prompt="blurry")),
}


@pytest.mark.parametrize("name", RECORDED)
def test_a_bare_edit_takes_the_traces_arguments(pipes, name):
    # Every recorded value differs from diffusers' default: the bare call was refused before.
    scheduler, recorded = RECORDED[name]
    sg = SelfGuidancePipeline.from_pipe(pipes[scheduler])
    original = sg(PROMPT, generator=seeded(), output_type="latent", **recorded)
    bare = sg(PROMPT, trace=original.trace, **EDIT)
    given = sg(PROMPT, trace=original.trace, **EDIT, **recorded)
    assert torch.equal(bare.images, given.images)
    assert [s for s, _ in bare.energies] == [s for s, _ in given.energies]


def test_an_unedited_call_with_the_trace_repeats_its_generation(pipes):
    sg = SelfGuidancePipeline.from_pipe(pipes["ddim"])
    recorded = dict(num_inference_steps=4, guidance_scale=3.0, negative_prompt="blurry", height=40, width=40)
    original = sg(PROMPT, generator=seeded(), output_type="latent", **recorded)
    again = sg(PROMPT, trace=original.trace, output_type="latent")
    assert torch.equal(again.images, original.images)


@pytest.mark.parametrize(
    "given, named",
    [
        (dict(num_inference_steps=5), "num_inference_steps: 4 there, 5 here"),
        (dict(guidance_scale=3.0), "guidance_scale: 2.0 there, 3.0 here"),
        (dict(height=48, width=48), "height, width: (40, 40) there, (48, 48) here"),
        (dict(eta=0.5), "eta: 0.0 there, 0.5 here"),
    ],
)
def test_a_given_argument_that_contradicts_the_trace_is_refused_by_name(pipes, given, named):
    sg = SelfGuidancePipeline.from_pipe(pipes["ddim"])
    original = sg(PROMPT, generator=seeded(), output_type="latent", num_inference_steps=4, guidance_scale=2.0, height=40,
                  width=40, negative_prompt="blurry")
    with pytest.raises(ValueError, match="other settings than this call: " + named.replace("(", r"\(").replace(")", r"\)")):
        sg(PROMPT, trace=original.trace, **EDIT, **given)


def test_a_given_negative_prompt_none_is_not_taken_as_left_out(pipes):
    # None is what "left out" means for negative_prompt: a call that wants no negative prompt with a
    # trace recorded with one cannot say so, and takes the trace's; negative_prompt="" is the way to differ.
    sg = SelfGuidancePipeline.from_pipe(pipes["ddim"])
    original = sg(PROMPT, generator=seeded(), output_type="latent", num_inference_steps=3, negative_prompt="blurry")
    with pytest.raises(ValueError, match="negative_prompt: 'blurry' there, '' here"):
        sg(PROMPT, trace=original.trace, negative_prompt="", **EDIT)


def test_each_trace_of_a_batch_keeps_its_own_negative_prompt(pipes):
    sg = SelfGuidancePipeline.from_pipe(pipes["ddim"])
    common = dict(num_inference_steps=3, output_type="latent")
    batch = sg([PROMPT, "a red cat"], negative_prompt=["blurry", "dark"], generator=seeded(), **common)
    edits = [[move("circle", dx=0.2)], [move("cat", dx=0.2)]]
    bare = sg([PROMPT, "a red cat"], edits=edits, trace=batch.trace, self_guidance_scale=50.0, output_type="latent")
    given = sg([PROMPT, "a red cat"], edits=edits, trace=batch.trace, self_guidance_scale=50.0, negative_prompt=["blurry", "dark"], **common)
    assert torch.equal(bare.images, given.images)


def test_a_real_images_trace_supplies_nothing_and_is_refused_as_before(pipes):
    sg = SelfGuidancePipeline.from_pipe(pipes["ddim"])
    image = PIL.Image.new("RGB", (32, 32), (200, 40, 40))
    traced = sg.trace_image(image, PROMPT, num_inference_steps=3, generator=seeded())
    with pytest.raises(ValueError, match="is not the unedited generation of"):
        sg(PROMPT, trace=traced, **EDIT)


def test_sdxl_takes_its_own_recorded_arguments():
    sg = SelfGuidancePipeline.from_pipe(tiny_sdxl_pipeline(image_size=32))
    recorded = dict(num_inference_steps=3, original_size=(48, 48), target_size=(32, 32), guidance_scale=3.0)
    original = sg(PROMPT, generator=seeded(), output_type="latent", **recorded)
    bare = sg(PROMPT, trace=original.trace, **EDIT)
    given = sg(PROMPT, trace=original.trace, **EDIT, **recorded)
    assert torch.equal(bare.images, given.images)
    with pytest.raises(ValueError, match=r"original_size: \(48, 48\) there, \(64, 64\) here"):
        sg(PROMPT, trace=original.trace, **EDIT, original_size=(64, 64))


def test_a_bare_photo_edit_is_the_splatted_call():
    """`sg(prompt, edits=..., trace=inverted)` runs (it was refused: the inversion's steps, guidance
    scale and negative prompt are not the defaults) and gives the image of the call that splats
    `edit_arguments(inverted, edits=edits)`, strength schedule included."""
    pipe = tiny_pipeline(image_size=32)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    settings = {"format": 1, "photo": {"strength": 0.5, "edits": {"move": {"self_guidance_scale": 50.0}}}}
    sg = SelfGuidancePipeline.from_pipe(pipe, settings=settings)
    photo = PIL.Image.new("RGB", (32, 32), (240, 240, 240))
    photo.paste((220, 30, 30), (4, 8, 16, 20))
    inverted = sg.invert(photo, PROMPT, num_inference_steps=6, guidance_scale=3.0)
    for edits in ([move("circle", dx=0.2)], [resize("circle", 2.0)]):
        splatted = sg(PROMPT, edits=edits, trace=inverted, output_type="latent", **edit_arguments(inverted, edits=edits))
        bare = sg(PROMPT, edits=edits, trace=inverted, output_type="latent")
        assert torch.equal(bare.images, splatted.images)
        # The strength schedule: the first half of the steps unguided.
        assert [s for s, _ in bare.energies] == [s for s, _ in splatted.energies] and min(s for s, _ in bare.energies) >= 3
    # A schedule given by the call is its own (not cut by the strength).
    every = sg(PROMPT, edits=[move("circle", dx=0.2)], trace=inverted, output_type="latent", guidance_schedule=[True] * 6)
    assert [s for s, _ in every.energies] == list(range(6))
