"""What the GPU will run, without a GPU: the attention-statistics kernels compiled for sm_80 and sm_90.

    python -m benchmarks.kernels                  # table; also writes the "Kernels" section of RESULTS.md
    python -m benchmarks.kernels --json FILE      # one record per (kernel, layer, batch, dtype, target)

Each default captured layer of SD1.5 at 512px and SDXL at 1024px (`benchmarks.kernel_cases`), batch 1
and 8, fp16 and bf16, forward and backward, is compiled with exactly the launch the op makes
(`attention_stats.launch_config`: grid, block sizes, warps, stages; the argument dtypes, strides and
their divisibility as Triton's launcher specialises them, for Q the strided view attention
processors pass). So are the MMDiT joint-attention op's five launches
(`joint_attention_stats.launch_config`) at SD3-medium's and FLUX.1-dev's 1024px shapes, batch 1, Q and
the keys the slices of the joint [B, L, heads, d] tensors their processors hold, the row logsumexp
the image rows of SDPA's. Triton compiles for any NVIDIA target on a CPU-only machine; its bundled
`cuobjdump` reads registers, spills and shared memory off the cubin, and the PTX shows whether the
dots became tensor-core instructions (`mma` / `wgmma`). Must run without TRITON_INTERPRET.
"""

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.kernel_cases import (
    HBM_BYTES_PER_S,
    JOINT_KERNELS,
    SMS,
    TENSOR_PEAK,
    bytes_moved,
    default_cases,
    floor_us,
    joint_cases,
    joint_cost,
    joint_floor_us,
)

# Triton 3.9 warns when this is unset; the value is its default (and the JIT's at run time).
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

TARGETS = {"sm_80": 80, "sm_90": 90}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
RESULTS = Path(__file__).with_name("RESULTS.md")
# The floor's bandwidth per target: A100 SXM 80GB (2.04 TB/s), H100 SXM.
BANDWIDTH = {"sm_80": 2.04e12, "sm_90": HBM_BYTES_PER_S["H100"]}


def _ops(module="attention_stats"):
    import importlib

    ops = importlib.import_module(f"sgfast.kernels.{module}")  # (registers the ops)
    if ops.INTERPRET:
        raise SystemExit("benchmarks.kernels compiles for the GPU: run it without TRITON_INTERPRET=1")
    return ops


class _Recorder:
    """Stands in for the op's launcher: records (kernel, grid, args, meta) instead of launching."""

    def __init__(self, calls):
        self.calls = calls

    def __call__(self, kernel):
        return _Launch(kernel, self.calls)


class _Launch:
    def __init__(self, kernel, calls):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        return lambda *args, **meta: self.calls.append((self.kernel, grid, args, meta))


def launch_arguments(ops, kernel, case, dtype, target_name):
    """(jit function, positional args, launch config) of one launch, as the op itself builds them
    (its launch function runs on meta tensors with the launcher recording), with Q and K laid out
    as attention processors pass them: views of [B, N, heads, d] (diffusers' head split)."""
    b, h, n, d, t, s = case.batch, case.heads, case.n, case.head_dim, case.keys, case.selected
    meta = torch.device("meta")
    q = torch.empty(b, n, h, d, dtype=dtype, device=meta).transpose(1, 2)
    k = torch.empty(b, t, h, d, dtype=dtype, device=meta).transpose(1, 2)
    tokens = torch.empty(b, s, dtype=torch.long, device=meta)
    cfg = ops.launch_config(kernel, b, h, n, d, t, s, dtype, SMS[target_name], interpret=False)
    calls, launcher = [], ops._launcher
    ops._launcher = _Recorder(calls)
    try:
        if kernel == "forward":
            ops.launch_forward(q, k, tokens, d**-0.5, cfg)
        else:
            ops.launch_backward(q, k, tokens, torch.empty(b, s, n, device=meta), d**-0.5, cfg)
    finally:
        ops._launcher = launcher
    (fn, grid, args, launch_meta), = calls
    assert tuple(grid) == tuple(cfg["grid"]) and cfg["meta"].items() <= launch_meta.items()
    return fn, args, dict(cfg, meta=launch_meta)  # the backward adds WRITE_DK to the plan's meta


def compile_launch(fn, args, cfg, arch):
    """triton.compile of `fn` specialised on `args` as its launcher would, for `arch` (80 or 90)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **cfg["meta"])
    options, signature, constexprs, attrs = fn._pack_args(backend, options, bound_args, specialization, options)
    return compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def resource_usage(cubin):
    """(registers, spill bytes, shared bytes) from cuobjdump --dump-resource-usage."""
    import tempfile

    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    field = lambda name: int(re.search(rf"\b{name}:(\d+)", text).group(1))  # noqa: E731
    return field("REG"), field("STACK") + field("LOCAL"), field("SHARED"), text


def tensor_core_ops(ptx):
    """mma / wgmma instructions in the PTX (lines, not loop trips)."""
    return len(re.findall(r"^\s*(?:@%p\d+\s+)?(?:wgmma\.mma_async|mma\.sync)\S*", ptx, flags=re.M))


def record(kernel, case, dtype_name, target_name):
    ops = _ops()
    fn, args, cfg = launch_arguments(ops, kernel, case, DTYPES[dtype_name], target_name)
    compiled = compile_launch(fn, args, cfg, TARGETS[target_name])
    registers, spill, shared, _ = resource_usage(compiled.asm["cubin"])
    grid = cfg["grid"]
    programs = grid[0] * grid[1] * grid[2]
    nbytes = bytes_moved(case, DTYPES[dtype_name].itemsize, kernel)
    meta = cfg["meta"]
    return {
        "kernel": kernel, "layer": case.name, "batch": case.batch, "dtype": dtype_name, "target": target_name,
        "registers": registers, "spill_bytes": spill, "shared_bytes": max(shared, compiled.metadata.shared),
        "tensor_core_ops": tensor_core_ops(compiled.asm["ptx"]), "programs": programs, "sms": SMS[target_name],
        "bytes_moved": nbytes, "floor_us": round(floor_us(nbytes, BANDWIDTH[target_name]), 3),
        "grid": list(grid), "block_n": meta["BLOCK_N"], "block_d": meta["BLOCK_D"],
        "keys_padded": meta["BLOCK_T"] + (meta["BLOCK_T2"] if meta["HAS_TAIL"] else 0),
        "num_warps": meta["num_warps"], "num_stages": meta["num_stages"],
    }


def joint_launch_arguments(ops, kernel, case, dtype, target_name):
    """(jit function, positional args, launch config) of one launch of the joint op (`kernel` one of
    JOINT_KERNELS), built by the op's own launch functions on meta tensors with the launcher
    recording. Q and the keys are slices of joint [B, L, heads, d] tensors transposed to
    [B, heads, L, d] (SD3: image tokens first; FLUX: text first), the lse the image rows of SDPA's
    [B, heads, L] logsumexp."""
    b, h, n, d, t, s = case.batch, case.heads, case.n, case.head_dim, case.text, case.selected
    meta = torch.device("meta")
    joint_q = torch.empty(b, n + t, h, d, dtype=dtype, device=meta).transpose(1, 2)
    joint_k = torch.empty(b, n + t, h, d, dtype=dtype, device=meta).transpose(1, 2)
    image, text = (slice(t, None), slice(0, t)) if case.arch.startswith("flux") else (slice(0, n), slice(n, None))
    q, k_img, k_txt = joint_q[:, :, image], joint_k[:, :, image], joint_k[:, :, text]
    lse = torch.empty(b, h, n + t, device=meta)[:, :, image]
    tokens = torch.empty(b, s, dtype=torch.long, device=meta)
    plan = {"forward_lse_given": "forward", "forward_lse_computed": "forward"}.get(kernel, kernel)
    cfg = ops.launch_config(plan, b, h, n, d, k_img.shape[2], t, s, dtype, SMS[target_name],
                            has_lse=kernel == "forward_lse_given", interpret=False)
    calls, launcher = [], ops._launcher
    ops._launcher = _Recorder(calls)
    try:
        if kernel == "forward_lse_given":
            ops.launch_forward(q, k_img, k_txt, tokens, lse, d**-0.5, cfg, lse)
        elif kernel == "forward_lse_computed":
            ops.launch_forward(q, k_img, k_txt, tokens, None, d**-0.5, cfg, torch.empty(b, h, n, device=meta))
        elif kernel == "backward_dq":
            ops.launch_backward_dq(q, k_img, k_txt, tokens, lse, torch.empty(b, s, n, device=meta), d**-0.5, cfg,
                                   with_dk=True)
        else:
            keys = k_img if kernel == "backward_dk_image" else k_txt
            ops.launch_backward_dk(q, keys, lse, torch.empty(b, h, n, device=meta), d**-0.5, cfg)
    finally:
        ops._launcher = launcher
    (fn, grid, args, launch_meta), = calls
    assert tuple(grid) == tuple(cfg["grid"]) and cfg["meta"].items() <= launch_meta.items()
    return fn, args, dict(cfg, meta=launch_meta)


def record_joint(kernel, case, dtype_name, target_name):
    ops = _ops("joint_attention_stats")
    dtype = DTYPES[dtype_name]
    fn, args, cfg = joint_launch_arguments(ops, kernel, case, dtype, target_name)
    compiled = compile_launch(fn, args, cfg, TARGETS[target_name])
    registers, spill, shared, _ = resource_usage(compiled.asm["cubin"])
    grid = cfg["grid"]
    nbytes, fp16_flops, tf32_flops = joint_cost(case, dtype.itemsize, kernel)
    meta = cfg["meta"]
    return {
        "kernel": kernel, "layer": case.name, "batch": case.batch, "dtype": dtype_name, "target": target_name,
        "registers": registers, "spill_bytes": spill, "shared_bytes": max(shared, compiled.metadata.shared),
        "tensor_core_ops": tensor_core_ops(compiled.asm["ptx"]), "programs": grid[0] * grid[1] * grid[2],
        "sms": SMS[target_name], "bytes_moved": nbytes, "gflop": round((fp16_flops + tf32_flops) / 1e9, 2),
        "floor_us": round(joint_floor_us(case, dtype.itemsize, kernel, BANDWIDTH[target_name],
                                         TENSOR_PEAK[target_name]), 2),
        "grid": list(grid), "block_d": meta["BLOCK_D"], "heads_per_program": cfg["heads_per_program"],
        "num_warps": meta["num_warps"], "num_stages": meta["num_stages"],
    }


def all_joint_records(targets=TARGETS, dtypes=DTYPES, kernels=JOINT_KERNELS, progress=print):
    out = []
    for target in targets:
        for case in joint_cases():
            for dtype in dtypes:
                for kernel in kernels:
                    out.append(record_joint(kernel, case, dtype, target))
                    progress(format_joint_row(out[-1]))
    return out


JOINT_HEADER = ("| kernel | layer | batch | dtype | target | regs | spill B | smem KB | mma ops | programs / SMs "
                "| bytes | GFLOP | floor us |")


def format_joint_row(r):
    return (f"| {r['kernel']} | {r['layer']} | {r['batch']} | {r['dtype']} | {r['target']} | {r['registers']} "
            f"| {r['spill_bytes']} | {r['shared_bytes'] / 1024:.1f} | {r['tensor_core_ops']} "
            f"| {r['programs']} / {r['sms']} | {r['bytes_moved']} | {r['gflop']} | {r['floor_us']} |")


def all_records(targets=TARGETS, dtypes=DTYPES, batches=(1, 8), kernels=("forward", "backward"), progress=print):
    out = []
    for target in targets:
        for case in default_cases(batches):
            for dtype in dtypes:
                for kernel in kernels:
                    out.append(record(kernel, case, dtype, target))
                    progress(format_row(out[-1]))
    return out


HEADER = ("| kernel | layer | batch | dtype | target | regs | spill B | smem KB | mma ops | programs / SMs "
          "| keys padded | bytes | floor us |")


def format_row(r):
    return (f"| {r['kernel']} | {r['layer']} | {r['batch']} | {r['dtype']} | {r['target']} | {r['registers']} "
            f"| {r['spill_bytes']} | {r['shared_bytes'] / 1024:.1f} | {r['tensor_core_ops']} "
            f"| {r['programs']} / {r['sms']} | {r['keys_padded']} | {r['bytes_moved']} | {r['floor_us']} |")


def failures(records):
    """Records that miss the targets: tensor cores in every kernel, no spills, and batch-1 launches
    with at least 90% as many programs as the GPU has SMs."""
    bad = []
    for r in records:
        if r["tensor_core_ops"] <= 0:
            bad.append((r, "no tensor-core instructions"))
        if r["spill_bytes"] != 0:
            bad.append((r, "spills"))
        if r["batch"] == 1 and r["programs"] < 0.9 * r["sms"]:
            bad.append((r, "programs < 90% of SMs"))
    return bad


def _triton_version():
    import triton

    return triton.__version__


RESOURCES = ("registers", "spill_bytes", "shared_bytes", "tensor_core_ops", "programs")


def shown(records):
    """The rows RESULTS.md shows: every fp16 launch, and a bf16 one only where its registers, spills,
    shared memory, tensor-core ops or grid differ from the same launch in fp16 (the JSON has them all)."""
    fp16 = {(r["kernel"], r["layer"], r["batch"], r["target"]): r for r in records if r["dtype"] == "fp16"}
    out = []
    for r in records:
        twin = fp16.get((r["kernel"], r["layer"], r["batch"], r["target"]))
        if r["dtype"] == "fp16" or twin is None or any(r[k] != twin[k] for k in RESOURCES):
            out.append(r)
    return out


def write_results(records, command, joint_records=(), compiled_on=None):
    import datetime

    compiled_on = compiled_on or datetime.date.today().isoformat()
    table = "\n".join([HEADER, "|" + "---|" * 13] + [format_row(r) for r in shown(records)])
    joint_table = "\n".join([JOINT_HEADER, "|" + "---|" * 13] + [format_joint_row(r) for r in shown(joint_records)])
    section = (
        "## Kernels (compiled offline for sm_80 / sm_90)\n\n"
        f"`{command}`: the attention-statistics kernels compiled with Triton for A100 (sm_80, 108 SMs) and "
        "H100/H200 (sm_90, 132 SMs) exactly as the op launches them for each default captured layer "
        "(selected tokens: 4). Registers, spills (stack + local bytes) and shared memory from `cuobjdump "
        "--dump-resource-usage`; mma ops: `mma.sync` / `wgmma` instructions in the PTX; bytes: Q, K, "
        "token indices read once, maps and sums written once (backward: dQ written, the maps' gradient "
        "read); floor: bytes at 2.04 TB/s (A100) or 3.35 TB/s (H100 SXM). Rows: every fp16 launch, and a "
        "bf16 one only where its registers, spills, shared memory, tensor-core ops or grid differ from fp16's "
        "(every row: `--json`).\n\n"
        f"{table}\n\n"
        "### MMDiT joint attention (`sgfast.kernels.joint_attention_stats`)\n\n"
        "The joint op's launches at 1024px (4096 image tokens; SD3-medium: 24 heads x 64, 333 text tokens; "
        "FLUX.1-dev: 24 heads x 128, 512 text tokens; batch 1, 4 selected tokens): the forward with SDPA's "
        "row logsumexp given or computing it, the backward's dq (with the normaliser's P @ K over every "
        "joint key) and the normaliser's share of dk for the image and the text keys. Bytes: each input "
        "read once, each output written once; GFLOP: the dots the kernel does; floor: the bytes at the "
        "bandwidth above or the dots at the dense tensor-core peaks (A100: 312 TFLOP/s fp16/bf16, 156 tf32; "
        "H100 SXM: 989 and 494; Q K^T, P @ K and P^T @ (r Q) on fp16/bf16 tiles, the selected columns' "
        "dots in tf32), whichever is longer. "
        f"Compiled {compiled_on} with Triton {_triton_version()} on a CPU-only machine; Triton 3.6.0 (the GPU "
        "image's) compiles the same joint launches for both targets without spills too (the 3.6.0 wheel on "
        "PYTHONPATH, the same command).\n\n"
        f"{joint_table}\n\n"
        f"Targets missed: {len(failures(list(records) + list(joint_records)))}.\n"
    )
    text = RESULTS.read_text() if RESULTS.exists() else ""
    start = text.find("## Kernels (compiled offline")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + (text[end + 1:] if end >= 0 else "")
    RESULTS.write_text(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the records to this file")
    parser.add_argument("--no-results", action="store_true", help="do not rewrite benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    print(HEADER)
    records = all_records()
    print(JOINT_HEADER)
    joint_records = all_joint_records()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(records + joint_records, indent=1))
    if not args.no_results:
        write_results(records, "python -m benchmarks.kernels", joint_records)
    bad = failures(records + joint_records)
    for r, why in bad:
        print(f"MISSED: {why}: {r['kernel']} {r['layer']} b{r['batch']} {r['dtype']} {r['target']}")
    print(f"{len(records) + len(joint_records)} launches compiled, {len(bad)} targets missed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
