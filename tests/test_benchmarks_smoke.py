"""Smoke test of the benchmark machinery (benchmarks/), and exact FLOP counts.

No timing assertions: only that a row runs end to end and that the counted FLOPs equal closed forms
derived independently from the modules' shapes.
"""

import pytest
import torch
from torch import nn

from benchmarks.flops import floor_step, plain_step
from benchmarks.measure import CountFlops, SavedForBackward, math_attention
from benchmarks.models import PROMPT, default_arch_dir


pytestmark = pytest.mark.usefixtures("one_thread")


def test_one_row_end_to_end(tmp_path):
    from benchmarks.chart import bar_chart
    from benchmarks.speed_row import run_row
    from benchmarks.speed_tables import cost_table, time_table

    from benchmarks.speed import parse_args, settings
    from sgfast.sampler import default_schedule

    # The CPU defaults time calls of fewer steps than an image has (8 of 20): so does this row (2 of 3),
    # so that every step count the row uses needs its own reference trace.
    defaults = settings(parse_args([]), cuda=False)
    assert defaults["step_call"] < defaults["steps"]
    spec = dict(
        model="tiny", device="cpu", dtype="float32", steps=3, step_call=2, batch=2, repeats=1, image_repeats=1,
        batch_repeats=1, warmup=0, threads=1, row=dict(kind="sgfast", mode="reference", edit="move_keep"),
    )
    result = run_row(spec)
    assert result["guided_step_s"]["n"] == 1 and result["image_s"]["n"] == 1 and result["step_call"] == 2
    # One image of 3 steps with the paper's schedule; no unedited pass (the trace is reused).
    guided = sum(default_schedule(3))
    assert result["counts"]["guided_steps"] == guided and result["counts"]["backward"] == guided
    assert result["guided_step_flops"] > result["unguided_step_flops"] > 0
    assert result["floor_flops"] <= result["guided_step_flops"]
    assert result["saved_bytes"] > 0 and result["attention_bytes"] > 0
    report = dict(info=dict(steps=3, dtype="float32", cpu="cpu"), models={"tiny": dict(image_size=64, rows=[result])})
    assert result["name"] in time_table([result], 3) and result["name"] in cost_table([result], False)
    assert bar_chart(report, tmp_path / "chart.png").exists()


def closed_form(unet, latents, timestep, cond, layers):
    """(forward, backward) FLOPs of the conditional pass from the modules' shapes alone: 2*m*n*k per
    matmul. The backward to the latents of a floor step runs through every module up to the last
    captured layer's query projection whose input depends on the latents, computing input gradients
    only: a linear or convolution costs its forward again; self-attention's four matmuls need all four
    gradients (twice its forward); cross-attention's keys and values come from the text, so only the
    probabilities' and queries' gradients (once its forward)."""
    calls = []  # (name, forward flops) in execution order
    contexts = {}  # attention module -> key length of its current call

    def hook(name):
        def record(module, inputs, output):
            if isinstance(module, nn.Linear):
                flops = 2 * output.numel() * module.in_features
            elif isinstance(module, nn.Conv2d):
                kh, kw = module.kernel_size
                flops = 2 * output.numel() * (module.in_channels // module.groups) * kh * kw
            else:  # attention core: Q K^T and P V, 2*B*S*L*inner each
                hidden = inputs[0]
                flops = 4 * hidden.shape[0] * hidden.shape[1] * contexts[module] * module.inner_dim
            calls.append((name, flops))

        return record

    from diffusers.models.attention_processor import Attention

    handles = []
    for name, module in unet.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            handles.append(module.register_forward_hook(hook(name)))
        elif isinstance(module, Attention):

            def pre(module, args, kwargs):
                context = kwargs.get("encoder_hidden_states")
                contexts[module] = args[0].shape[1] if context is None else context.shape[1]

            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(module.register_forward_hook(hook(name + ".core")))
    try:
        with torch.no_grad():
            unet(latents, timestep, encoder_hidden_states=cond)
    finally:
        for handle in handles:
            handle.remove()
    forward = sum(flops for _, flops in calls)
    cutoff = max(i for i, (name, _) in enumerate(calls) if name == layers[-1] + ".to_q")
    backward = 0
    for name, flops in calls[: cutoff + 1]:
        parts = name.split(".")
        if "time_embedding" in parts or parts[-1] == "time_emb_proj" or ("attn2" in parts and parts[-1] in ("to_k", "to_v")):
            continue  # inputs from the timestep or the text: not on the latents' path
        if parts[-1] == "core":
            backward += flops * (1 if "attn2" in parts else 2)
        else:
            backward += flops
    return forward, backward


def test_flops_match_closed_forms_exactly():
    from sgfast.capture import resolve_layers
    from sgfast.testing import tiny_pipeline

    pipe = tiny_pipeline()
    unet = pipe.unet
    cond, uncond = pipe.encode_prompt(PROMPT, "cpu", 1, True)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    pipe.scheduler.set_timesteps(10)
    timestep = pipe.scheduler.timesteps[2]
    with math_attention("cpu"):  # the CPU's fused SDPA kernel is not in the counter's registry
        for layers in (resolve_layers(unet, ["up_blocks.0"]), resolve_layers(unet, None)):
            forward, backward = closed_form(unet, latents, timestep, cond, layers)
            with CountFlops() as plain:
                plain_step(unet, latents, timestep, cond, uncond)
            with CountFlops() as floor:
                floor_step(unet, layers, latents, timestep, cond, uncond)
            assert plain.total == 2 * forward  # one forward at batch 2
            assert floor.total == 2 * forward + backward  # uncond + cond forward + input-only backward
            assert backward > 0


def test_saved_for_backward_stops_at_the_last_captured_layer():
    from sgfast.capture import resolve_layers
    from sgfast.testing import tiny_pipeline

    pipe = tiny_pipeline()
    cond, uncond = pipe.encode_prompt(PROMPT, "cpu", 1, True)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    saved = []
    for layers in (resolve_layers(pipe.unet, ["up_blocks.0"]), resolve_layers(pipe.unet, None)):
        with SavedForBackward(pipe.unet) as keeper:
            floor_step(pipe.unet, layers, latents, 500, cond, uncond)
        saved.append(keeper.nbytes)
    assert 0 < saved[0] < saved[1]


def test_sd15_flops_on_meta_match_the_design_table():
    """SD1.5 at 512px, counted on the meta device: the plain CFG step and the floor for the default
    layers (16x16 + 32x32 up blocks) are 1.607 and 2.225 TFLOP, exactly as counted (the design's cost table)."""
    if not (default_arch_dir() / "sd15_unet.json").exists():
        pytest.skip("the shared architecture configs are not next to the repository")
    from benchmarks.models import random_pipeline
    from sgfast.capture import default_layers

    pipe = random_pipeline("sd15", default_arch_dir(), device="meta", dtype=torch.float16)
    unet = pipe.unet
    latents = torch.zeros(1, 4, 64, 64, device="meta", dtype=torch.float16)
    cond = torch.zeros(1, 77, 768, device="meta", dtype=torch.float16)
    with CountFlops() as plain:
        plain_step(unet, latents, 500, cond, cond)
    with CountFlops() as floor:
        floor_step(unet, default_layers(unet), latents, 500, cond, cond)
    assert plain.total == 1_606_546_882_560
    assert floor.total == 2_225_306_664_960


@pytest.mark.slow
def test_sdxl_flops_count_the_real_sdxl_pipeline():
    """`benchmarks.flops --arch sdxl` builds diffusers' StableDiffusionXLPipeline from the public configs
    (both text encoders at their published sizes) and sgfast's default guided step on it costs the
    floor of its layers (the coarsest decoder level) to within 0.2%."""
    if not (default_arch_dir() / "sdxl_unet.json").exists():
        pytest.skip("the shared architecture configs are not next to the repository")
    from benchmarks.flops import flop_table

    info, rows = flop_table("sdxl", attend_excite=False)
    assert info["pipeline"] == "StableDiffusionXLPipeline"
    assert [round(n / 1e6, 2) for n in info["text_encoder_params"]] == [123.06, 694.66]
    guided = [row for row in rows if row["name"] == "sgfast fast: move + keep shape + keep appearance"][0]
    assert all(name.startswith("up_blocks.0.") for name in guided["layers"])
    assert 1.0 <= guided["x_floor"] < 1.002
