"""SD3 and FLUX: a call with `trace=` takes, for every argument it leaves out, the value the trace was
recorded with (tests/test_trace_call.py for SD and SDXL): the bare edit is the edit with every recorded
argument given, bit for bit; a given argument that contradicts the trace is refused by name."""

import pytest
import torch

from sgfast import SelfGuidancePipeline, move
from sgfast.testing import tiny_flux_pipeline, tiny_sd3_pipeline

PROMPT = "a red circle and a blue square"
EDIT = dict(edits=[move("circle", dx=0.25)], self_guidance_scale=50.0, output_type="latent")


@pytest.fixture(scope="module")
def pipes():
    return {"sd3": tiny_sd3_pipeline(), "flux": tiny_flux_pipeline()}


# Every value differs from diffusers' default (SD3: 28 steps, guidance 7, 256 T5 tokens, the model's
# size; FLUX: 28 steps, guidance 3.5, 512 T5 tokens, 1024 px).
RECORDED = {
    "sd3 steps, size, guidance, negative prompts, T5 length": ("sd3", dict(
        num_inference_steps=4, height=48, width=80, guidance_scale=3.0, negative_prompt="a dog",
        negative_prompt_3="a green cat", max_sequence_length=12)),
    "sd3 sigmas": ("sd3", dict(sigmas=[1.0, 0.6, 0.3], guidance_scale=2.0)),
    "sd3 skip-layer guidance": ("sd3", dict(num_inference_steps=3, skip_guidance_layers=[1], skip_layer_guidance_start=0.0,
                                            skip_layer_guidance_stop=1.0, skip_layer_guidance_scale=2.0)),
    "flux steps, size, guidance, true CFG, T5 length": ("flux", dict(
        num_inference_steps=4, height=48, width=80, guidance_scale=2.0, negative_prompt="a dog", true_cfg_scale=2.0,
        max_sequence_length=16)),
    "flux sigmas": ("flux", dict(sigmas=[1.0, 0.6, 0.3], height=64, width=64)),
}


@pytest.mark.parametrize("name", RECORDED)
def test_a_bare_edit_takes_the_traces_arguments(pipes, name):
    family, recorded = RECORDED[name]
    sg = SelfGuidancePipeline.from_pipe(pipes[family])
    original = sg(PROMPT, generator=torch.Generator().manual_seed(0), output_type="latent", **recorded)
    bare = sg(PROMPT, trace=original.trace, **EDIT)
    given = sg(PROMPT, trace=original.trace, **EDIT, **recorded)
    assert bare.energies and [s for s, _ in bare.energies] == [s for s, _ in given.energies]
    assert torch.equal(bare.images, given.images)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_an_unedited_call_with_the_trace_repeats_its_generation(pipes, family):
    sg = SelfGuidancePipeline.from_pipe(pipes[family])
    recorded = dict(num_inference_steps=3, height=48, width=64, guidance_scale=2.0, negative_prompt="a dog")
    original = sg(PROMPT, generator=torch.Generator().manual_seed(0), output_type="latent", **recorded)
    again = sg(PROMPT, trace=original.trace, output_type="latent")
    assert torch.equal(again.images, original.images)


@pytest.mark.parametrize(
    "family, given, named",
    [
        ("sd3", dict(num_inference_steps=5), "num_inference_steps: 4 there, 5 here"),
        ("sd3", dict(guidance_scale=3.0), "guidance_scale: 2.0 there, 3.0 here"),
        ("sd3", dict(height=64, width=64), r"height, width: \(48, 48\) there, \(64, 64\) here"),
        ("sd3", dict(negative_prompt="a cat"), "negative_prompt: 'a dog' there, 'a cat' here"),
        ("sd3", dict(max_sequence_length=20), "max_sequence_length: 12 there, 20 here"),
        ("flux", dict(guidance_scale=3.0), "guidance_scale: 2.0 there, 3.0 here"),
        ("flux", dict(true_cfg_scale=1.5), "true_cfg_scale: 2.0 there, 1.5 here"),
        ("flux", dict(sigmas=[1.0, 0.5, 0.2, 0.1]), r"sigmas: None there, \(1.0, 0.5, 0.2, 0.1\) here"),
    ],
)
def test_a_given_argument_that_contradicts_the_trace_is_refused_by_name(pipes, family, given, named):
    sg = SelfGuidancePipeline.from_pipe(pipes[family])
    recorded = dict(num_inference_steps=4, height=48, width=48, guidance_scale=2.0, negative_prompt="a dog",
                    max_sequence_length=12)
    if family == "flux":
        recorded["true_cfg_scale"] = 2.0
    original = sg(PROMPT, generator=torch.Generator().manual_seed(0), output_type="latent", **recorded)
    with pytest.raises(ValueError, match="other settings than this call: (.*; )?" + named):
        sg(PROMPT, trace=original.trace, **EDIT, **given)
