"""What a guided step costs in UNet passes, counted on a real tiny pipeline: two batch-1 passes (the
unconditional one without gradients, the conditional one with them), as the cost floor in DESIGN
assumes; only a zero-scale edit runs diffusers' batched CFG pass (for bit-identity with the unedited
image) plus a conditional pass that ends at the last captured layer."""

import pytest
import torch

from sgfast import SelfGuidancePipeline, move

STEPS = 3
PROMPT = "a red circle and a blue square"


def unet_calls(sg, **kwargs):
    """(batch size, gradients on) of every UNet forward during one call."""
    calls = []
    hook = sg.pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs_: calls.append((args[0].shape[0], torch.is_grad_enabled())), with_kwargs=True
    )
    try:
        sg(PROMPT, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="latent", **kwargs)
    finally:
        hook.remove()
    return calls


@pytest.mark.parametrize("mode", ["reference", "fast"])
def test_guided_step_is_two_batch_one_passes(tiny_pipe, mode):
    sg = SelfGuidancePipeline.from_pipe(tiny_pipe, mode=mode)
    reference = sg(PROMPT, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0)).trace
    calls = unet_calls(sg, edits=[move("circle", dx=0.2)], trace=reference, guidance_schedule=[True] * STEPS)
    assert calls == [(1, False), (1, True)] * STEPS


def test_zero_scale_step_runs_the_batched_pass(tiny_pipe):
    sg = SelfGuidancePipeline.from_pipe(tiny_pipe)
    reference = sg(PROMPT, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0)).trace
    calls = unet_calls(sg, edits=[move("circle", dx=0.2)], trace=reference, guidance_schedule=[True] * STEPS,
                       self_guidance_scale=0.0)
    assert calls == [(2, False), (1, False)] * STEPS
