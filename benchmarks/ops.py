"""Ops dispatched per step: `python -m benchmarks.ops` (= `make bench-ops`).

On a launch-bound GPU every non-view aten op of an eager step is at least one kernel launch, so the
op count of a step is its time where launches dominate. Counted with a `TorchDispatchMode` through
the public API (diffusers' pipeline for the plain step, `SelfGuidancePipeline` for guided steps, every
step guided), per step = (4-step call - 2-step call) / 2, so that what a call does once (encoding,
decoding, the guidance plan) cancels. Views (ops that alias their input) are not counted; host
synchronisations (`_local_scalar_dense` and the other ops whose result size or value the host must
read) are counted apart.

The models: the SD1.5 and SDXL UNet architectures (sgfast's architecture configs) narrowed to a few
channels, in a tiny pipeline (16x16 latents): every block, layer and attention of the real
architecture is there, so the op counts are those of the real model (they do not depend on widths
or resolution), at a cost the CPU can pay. The FLOP floor beside them is the real architecture's
at its native resolution (`benchmarks.flops`, on the meta device).
"""

import argparse
import json
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.models import EDITED_WORD, PROMPT, default_arch_dir, load_config

# Ops whose result the host must read (their value or their output's size): each one waits for the
# device. `item()`, `float(t)`, `int(t)`, `bool(t)` all reach `_local_scalar_dense`.
SYNC_OPS = frozenset({
    "_local_scalar_dense", "nonzero", "is_nonzero", "equal", "masked_select", "_unique2", "unique_dim",
    "unique_consecutive", "bincount",
})


# Reshapes of a fresh tensor that the schema does not mark as views but that launch nothing.
ALIASING = frozenset({"_unsafe_view"})


class CountOps(TorchDispatchMode):
    """Non-view aten ops and host synchronisations dispatched while active (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.ops, self.syncs = Counter(), Counter()

    @property
    def total(self):
        return sum(self.ops.values())

    @property
    def sync_total(self):
        return sum(self.syncs.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._overloadpacket.__name__
        if name in SYNC_OPS:
            self.syncs[name] += 1
        if not func.is_view and name not in ALIASING:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def counted(fn):
    with CountOps() as counter:
        fn()
    return counter


def per_step(call):
    """(ops, syncs) per step of `call(n)`: (4 steps - 2 steps) / 2."""
    two, four = counted(lambda: call(2)), counted(lambda: call(4))
    return (four.total - two.total) / 2, (four.sync_total - two.sync_total) / 2


# ---------------------------------------------------------------------------------------------------
# The architectures, narrowed
# ---------------------------------------------------------------------------------------------------

NARROW = {
    # channels (multiples of the heads, of 8 norm groups, and in the real ratios), text width
    "sd15": dict(block_out_channels=[32, 64, 128, 128], cross_attention_dim=32, norm_num_groups=8),
    "sdxl": dict(block_out_channels=[40, 80, 160], cross_attention_dim=64, norm_num_groups=8,
                 addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 16),
}


def narrowed_unet(arch, arch_dir=None, sample_size=16):
    """The real architecture's UNet2DConditionModel with narrow channels: same blocks, layers, heads."""
    from diffusers import UNet2DConditionModel

    config = load_config(arch_dir or default_arch_dir(), f"{arch}_unet.json")
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    config.update(NARROW[arch], sample_size=sample_size)
    torch.manual_seed(0)
    return UNet2DConditionModel(**config).eval().requires_grad_(False)


def op_pipeline(arch, arch_dir=None):
    """A tiny diffusers pipeline (SD: StableDiffusionPipeline, SDXL: StableDiffusionXLPipeline) with
    the narrowed architecture's UNet."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from sgfast.testing import tiny_components, tiny_sdxl_components

    if arch == "sd15":
        parts = tiny_components()
        parts["unet"] = narrowed_unet("sd15", arch_dir)
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    else:
        parts = tiny_sdxl_components()
        parts["unet"] = narrowed_unet("sdxl", arch_dir)
        pipe = StableDiffusionXLPipeline(**parts, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------------
# The rows
# ---------------------------------------------------------------------------------------------------

def edits_of(kind):
    from sgfast import move

    return [move(EDITED_WORD, dx=0.25, keep_others=False)] if kind == "move" else [move(EDITED_WORD, dx=0.25)]


# Four prompts with four different edits (a batch of four, the paper's keep terms where they apply).
BATCH_PROMPTS = ["a red circle and a blue square", "a blue square and a red circle", "a green circle", "a red square"]


def batch_edits():
    from sgfast import move, place, resize

    return [[move("circle", dx=0.25)], [resize("square", scale=1.5)], [place("circle", x=0.3, y=0.6)],
            [move("square", dy=-0.2, keep_others=False)]]


def call_kwargs():
    return dict(generator=torch.Generator().manual_seed(0), output_type="latent")


class GuidedCalls:
    """`call(n)`: an n-step call of `sg` with every step guided by `edits`, the unedited trace reused."""

    def __init__(self, sg, prompt, edits, steps=(2, 4)):
        self.sg, self.prompt, self.edits = sg, prompt, edits
        self.traces = {n: sg(prompt, num_inference_steps=n, **call_kwargs()).trace for n in steps}

    def __call__(self, n):
        return self.sg(self.prompt, edits=self.edits, trace=self.traces[n], num_inference_steps=n,
                       guidance_schedule=[True] * n, **call_kwargs())


def energy_probe(sg, prompt, edits):
    """(inputs, energy function) of the first guided step of a one-step call of `sg`: the captured
    layers' flat maps and the features as recorded, and the call's EnergyPlan on them (the stack of
    the maps included: it is the step's)."""
    from sgfast import guided

    seen = {}
    real = guided.GuidedCall.energy

    def spy(self, targets, weights, call=None):
        if not seen:
            capture = self.capture
            seen.update(plan=self.plan, targets=targets, weights=weights,
                        maps=[capture.maps[name].detach() for name in capture.layers],
                        features=None if capture.features is None else capture.features.detach())
        return real(self, targets, weights, call)

    guided.GuidedCall.energy = spy
    try:
        sg(prompt, edits=edits, num_inference_steps=1, guidance_schedule=[True], **call_kwargs())
    finally:
        guided.GuidedCall.energy = real
    plan, layers = seen["plan"], len(seen["maps"])

    def energy(*inputs):
        features = inputs[layers] if len(inputs) > layers else None
        return plan.energy(torch.stack(inputs[:layers]), features, seen["targets"], seen["weights"])

    return seen["maps"] + ([seen["features"]] if seen["features"] is not None else []), energy


def energy_ops(sg, prompt, edits):
    """Ops of the energies alone, forward and backward, at one guided step: the recorded maps and
    features of the conditional pass as leaves, the call's energy plan, the gradient to them."""
    inputs, energy = energy_probe(sg, prompt, edits)
    leaves = [x.detach().requires_grad_(True) for x in inputs]
    counter = CountOps()
    with counter:
        value = energy(*leaves)
        torch.autograd.grad(value, leaves, allow_unused=True)
    return counter.total


def rows_for(arch, forms=("split", "batched"), arch_dir=None):
    from sgfast import SelfGuidancePipeline

    pipe = op_pipeline(arch, arch_dir)
    plain_ops, plain_syncs = per_step(lambda n: pipe(PROMPT, num_inference_steps=n, **call_kwargs()))
    rows = [dict(arch=arch, row="diffusers plain CFG step", ops=plain_ops, syncs=plain_syncs, x_plain=1.0)]
    for form in forms:
        sg = SelfGuidancePipeline.from_pipe(pipe, mode="fast", settings="paper", guided_step=form)
        for kind, label in (("move", "move"), ("move_keep", "move + keep terms")):
            calls = GuidedCalls(sg, PROMPT, edits_of(kind))
            ops, syncs = per_step(calls)
            energy = energy_ops(sg, PROMPT, edits_of(kind))
            rows.append(dict(arch=arch, row=f"sgfast guided ({form}), {label}", ops=ops, syncs=syncs,
                             x_plain=ops / plain_ops, energy_ops=energy, energy_x_plain=energy / plain_ops))
        if form == forms[0]:
            energy = energy_ops(sg, BATCH_PROMPTS, batch_edits())
            rows.append(dict(arch=arch, row="energies alone: batch of four prompts, four edits", ops=None, syncs=None,
                             x_plain=None, energy_ops=energy, energy_x_plain=energy / plain_ops))
    rows.append(dict(arch=arch, row="layers captured", layers=len(sg.layers), names=list(sg.layers)))
    return rows


def flop_floor(arch, layers, arch_dir=None):
    """(plain, floor) TFLOP of the real architecture at its native resolution, fp16, on the meta
    device, the floor for `layers` (the narrowed model's captured layers: the same names)."""
    from benchmarks.flops import floor_step, plain_step
    from benchmarks.measure import CountFlops
    from benchmarks.models import random_pipeline

    pipe = random_pipeline(arch, arch_dir or default_arch_dir(), device="meta", dtype=torch.float16)
    unet = pipe.unet
    size = unet.config.sample_size
    latents = torch.zeros(1, 4, size, size, device="meta", dtype=torch.float16)
    cond = torch.zeros(1, 77, unet.config.cross_attention_dim, device="meta", dtype=torch.float16)
    with CountFlops() as plain:
        plain_step(unet, latents, 500, cond, cond)
    with CountFlops() as floor:
        floor_step(unet, layers, latents, 500, cond, cond)
    return plain.total / 1e12, floor.total / 1e12


def format_table(rows, floors):
    lines = ["| model | step | non-view aten ops / step | x plain | host syncs / step | energies (fwd+bwd) ops | energies x plain |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "layers" in r:
            continue
        cell = lambda v, f: "" if v is None else f.format(v)  # noqa: E731
        lines.append(f"| {r['arch']} | {r['row']} | {cell(r['ops'], '{:,.0f}')} | {cell(r['x_plain'], '{:.2f}')} | "
                     f"{cell(r['syncs'], '{:.0f}')} | {cell(r.get('energy_ops'), '{:,}')} | {cell(r.get('energy_x_plain'), '{:.3f}')} |")
    lines.append("")
    lines.append("| model | captured layers | plain CFG step TFLOP | floor TFLOP (default layers) | floor x plain |")
    lines.append("|---|---|---|---|---|")
    for arch, (plain, floor) in floors.items():
        layers = next(r["layers"] for r in rows if r["arch"] == arch and "layers" in r)
        lines.append(f"| {arch} | {layers} | {plain:.3f} | {floor:.3f} | {floor / plain:.3f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=("sd15", "sdxl", "both"), default="both")
    parser.add_argument("--arch-dir", default=None)
    parser.add_argument("--json", default=None, help="write the rows here too")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    archs = ("sd15", "sdxl") if args.arch == "both" else (args.arch,)
    rows, floors = [], {}
    for arch in archs:
        rows += rows_for(arch, arch_dir=args.arch_dir)
        floors[arch] = flop_floor(arch, rows[-1]["names"], args.arch_dir)
    print(format_table(rows, floors))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(rows=rows, floors=floors), indent=1))
    return rows, floors


if __name__ == "__main__":
    main()
