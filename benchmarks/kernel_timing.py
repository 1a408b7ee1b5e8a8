"""The attention-statistics kernels timed on a GPU against their bandwidth floor, and launch variants.

    python -m benchmarks.kernel_timing [--quick] [--json FILE]

For each default captured layer (`benchmarks.kernel_cases`), fp16: the fused forward and backward
with the op's own launch plan, the torch reference doing the same work, and the floor (the bytes
that must move at the GPU's HBM bandwidth): % of roofline = floor / time. Then launch variants of
the same kernels (more programs per SM, other position blocks and warp counts) on the layers that
decide the guided step's cost, each checked against the float64 reference before it is timed, so
that the default plan is chosen by measurement. CUDA-event medians (`triton.testing.do_bench`,
which flushes the L2 before every repeat).
"""

import argparse
import importlib
import json
import sys
from pathlib import Path

import torch

from benchmarks.kernel_cases import HBM_BYTES_PER_S, Case, bytes_moved, default_cases, floor_us

VARIANTS = [
    {},
    {"programs_per_sm": 2},
    {"programs_per_sm": 4},
    {"block_n": 16},
    {"num_warps": 8},
    {"num_stages": 1},
    {"num_stages": 3},
]


def ops():
    return importlib.import_module("sgfast.kernels.attention_stats")


def bandwidth(device):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "H100"
    return HBM_BYTES_PER_S["H200"] if "H200" in name else HBM_BYTES_PER_S["H100"]


def inputs(case, dtype, device, seed=0):
    """Q, K as the processors pass them (views of [B, N, heads, d]), token indices, maps' gradient."""
    g = torch.Generator(device=device).manual_seed(seed)
    b, h, n, d, t, s = case.batch, case.heads, case.n, case.head_dim, case.keys, case.selected
    q = torch.randn(b, n, h, d, generator=g, device=device, dtype=dtype).transpose(1, 2)
    k = torch.randn(b, t, h, d, generator=g, device=device, dtype=dtype).transpose(1, 2)
    tokens = torch.randint(0, t, (b, s), generator=g, device=device)
    grad = torch.randn(b, s, n, generator=g, device=device)
    return q, k, tokens, grad


def median_us(fn, graph=True):
    """Median time of `fn` in us. On a GPU: replays of a CUDA graph of it (the kernels' own time,
    free of the CPU's launch overhead; `graph=False`: eager calls, overhead included), CUDA events,
    L2 flushed before each repeat. On the CPU (the dry run): a wall-clock median of a few calls."""
    if not torch.cuda.is_available():
        import statistics
        import time

        samples = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e6)
        return statistics.median(samples)
    import triton.testing

    if graph:
        return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median") * 1e3
    return triton.testing.do_bench(fn, warmup=20, rep=80, return_mode="median") * 1e3


def relative_error(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


def reference(q, k, tokens, grad, case):
    """Float64 maps and dq of the same inputs."""
    q64 = q.detach().double().requires_grad_(True)
    _, maps = ops().attention_stats_reference(q64, k.double(), tokens, case.height, case.width, case.head_dim**-0.5)
    (dq,) = torch.autograd.grad(maps, q64, grad.double())
    return maps.detach(), dq


def time_fused(case, dtype, device, overrides=None, check=True, eager=False):
    """Forward and backward of the fused kernels with `overrides` of the launch plan: medians in us
    (graph replays; `eager`: also eager calls), and (when `check`) relative errors against float64."""
    m = ops()
    q, k, tokens, grad = inputs(case, dtype, device)
    sms = m.device_sm_count(q.device)
    shape = (case.batch, case.heads, case.n, case.head_dim, case.keys, case.selected, dtype, sms)
    fwd_cfg = m.launch_config("forward", *shape, **(overrides or {}))
    bwd_cfg = m.launch_config("backward", *shape, **(overrides or {}))
    scale = case.head_dim**-0.5
    row = {"programs_forward": _programs(fwd_cfg), "programs_backward": _programs(bwd_cfg),
           "block_n": fwd_cfg["meta"]["BLOCK_N"], "num_warps": fwd_cfg["meta"]["num_warps"]}
    if check:
        want_maps, want_dq = reference(q, k, tokens, grad, case)
        row["maps_error"] = relative_error(m.launch_forward(q, k, tokens, scale, fwd_cfg), want_maps)
        row["dq_error"] = relative_error(m.launch_backward(q, k, tokens, grad, scale, bwd_cfg)[0], want_dq)
    forward = lambda: m.launch_forward(q, k, tokens, scale, fwd_cfg)  # noqa: E731
    backward = lambda: m.launch_backward(q, k, tokens, grad, scale, bwd_cfg)  # noqa: E731
    row["forward_us"], row["backward_us"] = median_us(forward), median_us(backward)
    if eager:
        row["forward_eager_us"], row["backward_eager_us"] = median_us(forward, False), median_us(backward, False)
    return row


def _programs(cfg):
    a, b, c = cfg["grid"]
    return a * b * c


def time_reference(case, dtype, device):
    """The torch reference's forward (maps; graph replays and eager) and backward (dq; eager) on the
    same inputs."""
    m = ops()
    q, k, tokens, grad = inputs(case, dtype, device)
    q.requires_grad_(True)
    args = (k, tokens, case.height, case.width, case.head_dim**-0.5)
    forward = lambda: m.attention_stats_reference(q, *args)[1]  # noqa: E731
    maps = forward()
    backward = lambda: torch.autograd.grad(maps, q, grad, retain_graph=True)  # noqa: E731
    # The autograd backward is timed eagerly only: capturing it in a CUDA graph failed on an H200 and
    # left the CUDA RNG in capture state for what ran next.
    eager_backward = median_us(backward, False)
    return {"forward_us": median_us(forward), "backward_us": eager_backward,
            "forward_eager_us": median_us(forward, False), "backward_eager_us": eager_backward}


def layer_rows(device, cases, progress=print):
    """Per case (fp16): fused vs torch, and the roofline."""
    rows = []
    bw = bandwidth(device)
    for case in cases:
        row = {"layer": case.name, "batch": case.batch, "dtype": "fp16"}
        try:
            row["fused"] = fused = time_fused(case, torch.float16, device, eager=True)
            row["torch"] = torch_row = time_reference(case, torch.float16, device)
        except Exception as error:  # reported, and the next layer still runs
            row["error"] = f"{type(error).__name__}: {error}"[:300]
            rows.append(row)
            progress(f"| {case.name} | {case.batch} | failed: {row['error']} |")
            continue
        for kernel in ("forward", "backward"):
            floor = floor_us(bytes_moved(case, 2, kernel), bw)
            row[f"{kernel}_floor_us"] = floor
            row[f"{kernel}_roofline_pct"] = 100 * floor / fused[f"{kernel}_us"]
            row[f"{kernel}_speedup_vs_torch"] = torch_row[f"{kernel}_us"] / fused[f"{kernel}_us"]
        rows.append(row)
        progress(format_layer_row(row))
    return rows


def layer_cases(quick=False):
    return [c for c in default_cases(batches=(1, 8)) if not (quick and c.arch == "sdxl" and c.batch == 8)]


def variant_cases():
    """SD1.5's 32x32 layer at batch 1 and 8 and its 16x16 layer at batch 1: the guided step's."""
    return [c for c in default_cases(batches=(1, 8))
            if c.arch == "sd15" and (c.layer == "up_blocks.2" or c.batch == 1)]


def dry_run_cases():
    """Tiny shapes for running every code path on the CPU through the interpreter."""
    return [Case("tiny", "up_blocks.1", 1, 2, 3, 5, 7, 40, selected=3)]


def variant_rows(device, cases, variants=VARIANTS, progress=print):
    """Launch variants of the kernels on `cases`."""
    rows = []
    for case in cases:
        for overrides in variants:
            try:
                row = time_fused(case, torch.float16, device, overrides)
            except Exception as error:  # a variant that does not compile or run is a result too
                row = {"error": f"{type(error).__name__}: {error}"[:300]}
            row.update(layer=case.name, batch=case.batch, variant=overrides)
            rows.append(row)
            progress(format_variant_row(row))
    return rows


def format_layer_row(r):
    f, t = r["fused"], r["torch"]
    return (f"| {r['layer']} | {r['batch']} | {f['forward_us']:.1f} | {t['forward_us']:.1f} | {r['forward_floor_us']:.2f} "
            f"| {r['forward_roofline_pct']:.0f}% | {f['backward_us']:.1f} | {t['backward_us']:.1f} "
            f"| {r['backward_floor_us']:.2f} | {r['backward_roofline_pct']:.0f}% | {f['maps_error']:.1e} "
            f"| {f['dq_error']:.1e} | {f['forward_eager_us'] + f['backward_eager_us']:.0f} "
            f"({t['forward_eager_us'] + t['backward_eager_us']:.0f}) |")


LAYER_HEADER = ("| layer | batch | fwd us | torch fwd us | fwd floor us | fwd % roofline | bwd us | torch bwd us "
                "| bwd floor us | bwd % roofline | maps rel err | dq rel err | fwd+bwd eager us (torch) |")


def format_variant_row(r):
    if "error" in r:
        return f"| {r['layer']} | {r['batch']} | {r['variant']} | failed: {r['error']} |"
    return (f"| {r['layer']} | {r['batch']} | {r['variant'] or 'default'} | {r['block_n']} | {r['num_warps']} "
            f"| {r['programs_forward']} | {r['forward_us']:.1f} | {r['programs_backward']} | {r['backward_us']:.1f} "
            f"| {r['maps_error']:.1e} | {r['dq_error']:.1e} |")


VARIANT_HEADER = ("| layer | batch | variant | block_n | warps | fwd programs | fwd us | bwd programs | bwd us "
                  "| maps rel err | dq rel err |")


def run(device, cases, variant_cases=None, progress=print):
    """Layer rows for `cases`, then launch variants on `variant_cases` (None: none)."""
    progress(LAYER_HEADER)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {"device": name, "layers": layer_rows(device, cases, progress)}
    if variant_cases:
        progress(VARIANT_HEADER)
        result["variants"] = variant_rows(device, variant_cases, progress=progress)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="skip SDXL at batch 8 and the launch variants")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.kernel_timing needs a CUDA GPU (offline: python -m benchmarks.kernels)")
    device = torch.device("cuda")
    result = run(device, layer_cases(args.quick), None if args.quick else variant_cases())
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
