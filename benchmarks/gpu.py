"""Every GPU measurement the project needs, in one command that fits in a few minutes on one GPU.

    python -m benchmarks.gpu              # make bench-gpu (WHEELS=wheelhouse on an air-gapped machine)
    python -m benchmarks.gpu --quick      # leaves out the slow phases (50-step images, energy, SDXL, compile)
    python -m benchmarks.gpu --dry-run    # every code path on the CPU, tiny shapes, Triton interpreter

Phases, cheapest and most important first; each is timed, wrapped (a failure is reported and the
next phase still runs) and written to outputs/bench/gpu.json as soon as it ends, so that a run cut
short still leaves its results; once the time budget (--budget-s) is spent, the remaining phases
are skipped and reported as skipped.

1. kernels_correctness: the compiled Triton kernels (impl="triton") against the float64 torch
   reference on the GPU: fp32/fp16/bf16, head dims 40/64/80/160, an odd grid, batch 3, 77 keys, a
   repeated token, contiguous and non-contiguous Q and K (diffusers' head split, and its CFG half),
   forward (sums, maps) and backward (dq). A mismatch makes the command's exit status nonzero.
2. kernel_timing: each default captured layer's launch (benchmarks.kernel_cases), fp16 and bf16,
   forward and backward, triton against the torch reference, against the HBM bandwidth floor:
   kernel time by CUDA-graph replay, and the eager call's time (the CPU's launch overhead in it).
3. sd15_step: SD1.5 architecture (random weights, fp16, 512px): a plain CFG step against a guided
   step of each mode, time ratio and peak memory; the guided step split (today) against batched.
   Then kernel_variants: launch-plan alternatives of the kernels, each checked, then timed.
4. sd15_image: a whole 50-step image with the paper's schedule, plain, edited and diffusers'
   Attend-and-Excite, in this process.
5. energy: NVML energy per image of the same three.
6. sdxl_step: the SDXL UNet at 1024px (in an SD1.x pipeline, as `python -m benchmarks --arch sdxl`).
7. cuda_graphs: the plain step's UNet forward replayed as a CUDA graph, and an attempt at capturing
   the guided step (reported as captured or not, with the reason).
8. sd15_compile: the guided step with compile=True, split and batched (last: inductor compiles of
   the UNet are slow when cold, and what does not fit in the budget is skipped).

`--quick` leaves out 4, 5, 6 and 8. Exit status: 1 if a kernel disagrees with the reference, 2 if
a phase failed otherwise, 0 else (skipped phases are reported, not failures).
"""

import os
import sys

DRY_RUN = "--dry-run" in sys.argv
if DRY_RUN:
    # Triton picks the interpreter when the kernels are defined: switch it on before any import.
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import gc  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import torch  # noqa: E402

from benchmarks import kernel_cases, kernel_timing, measure  # noqa: E402
from benchmarks.models import PROMPT, REPO, build_pipeline, default_arch_dir  # noqa: E402

COMMAND = "make bench-gpu"
TAG = "[bench-gpu]"
MIB = 2**20
HARD_STOP_GRACE_S = 30.0  # how far past the budget a phase may run before it is interrupted

# Relative error ||out - ref|| / ||ref|| allowed against float64: (maps and sums, dq).
TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 3e-3), torch.bfloat16: (1e-2, 2e-2)}
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
LAYOUTS = ("contiguous", "head_split", "cfg_half")


def log(message):
    print(f"{TAG} {message}", flush=True)


# ---------------------------------------------------------------------------------------------------
# Settings: the real run, or the dry run's tiny stand-ins.
# ---------------------------------------------------------------------------------------------------


def settings(args):
    if args.dry_run:
        return SimpleNamespace(
            device="cpu", dtype=torch.float32, sd_model="tiny", sd_resolution=64, sdxl_model="tiny",
            sdxl_resolution=64, steps=2, step_call=1, repeats=1, image_repeats=1, head_dims=(40,), heads=2,
            grid=(3, 5), batch=3, timing_cases=tiny_timing_cases(), variant_cases=tiny_timing_cases()[:1],
            compile_backend="eager",
            # Fewer rows: each code path once (a dry run checks that they run, not what they measure).
            sd_rows=[("reference", "move_keep"), ("fast", "move")], sdxl_rows=[("fast", "move")],
            compile_ways=("split",),
        )
    return SimpleNamespace(
        device="cuda", dtype=torch.float16, sd_model="sd15", sd_resolution=512, sdxl_model="sdxl",
        sdxl_resolution=1024, steps=50, step_call=4, repeats=5, image_repeats=2, head_dims=(40, 64, 80, 160),
        heads=8, grid=(15, 17), batch=3, timing_cases=kernel_cases.default_cases(batches=(1, 8)),
        variant_cases=kernel_timing.variant_cases(),
        compile_backend=True,
        # Reference mode first: fast mode freezes the UNet's weights.
        sd_rows=[("reference", "move"), ("reference", "move_keep"), ("fast", "move"), ("fast", "move_keep")],
        sdxl_rows=[("reference", "move"), ("fast", "move"), ("fast", "move_keep")],
        compile_ways=("split", "batched"),
    )


def tiny_timing_cases():
    return [kernel_cases.Case("tiny", "up_blocks.1", 1, batch, 2, 4, 4, 40) for batch in (1, 2)]


# ---------------------------------------------------------------------------------------------------
# The phase runner: budget, loud failures, incremental JSON and RESULTS.md.
# ---------------------------------------------------------------------------------------------------


class OutOfBudget(Exception):
    """Raised inside a phase when the time budget is spent: what it measured so far is kept."""


class KernelMismatch(Exception):
    """The compiled kernels disagree with the float64 reference."""


class Bench:
    def __init__(self, args, config, out_json, results_md):
        self.args, self.config = args, config
        self.out_json, self.results_md = Path(out_json), Path(results_md)
        self.start = time.perf_counter()
        self.state = {}  # models shared between phases
        self.report = dict(
            command=COMMAND + (f" ARGS='{' '.join(args.argv)}'" if args.argv else ""),
            started=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            machine=machine_info(config.device), dry_run=args.dry_run, quick=args.quick, budget_s=args.budget_s,
            phases={},
        )

    def elapsed(self):
        return time.perf_counter() - self.start

    def remaining(self):
        return self.args.budget_s - self.elapsed()

    def tick(self, need_s=0.0):
        """Called between a phase's items: stop the phase once the budget cannot cover `need_s` more."""
        if self.remaining() < need_s or self.remaining() <= 0:
            raise OutOfBudget(f"time budget spent ({self.elapsed():.0f} of {self.args.budget_s:.0f} s)")

    def run(self, name, fn, slow=False, need_s=0.0):
        phase = dict(status="running", seconds=0.0, records=[], note="")
        self.report["phases"][name] = phase
        if slow and self.args.quick:
            return self._skip(name, phase, "--quick")
        if self.remaining() < max(need_s, 1.0):
            return self._skip(name, phase, f"time budget: {self.remaining():.0f} s left, needs about {need_s:.0f} s")
        log(f"{name}: start ({self.elapsed():.0f} s into the run, {self.remaining():.0f} s of budget left)")
        self.save()
        start = time.perf_counter()
        self.row_errors, self.hard_stopped = [], False
        try:
            with self.hard_stop(self.remaining() + HARD_STOP_GRACE_S):
                fn(self, phase["records"])
            phase["status"] = "ok"
            if self.row_errors:
                phase["status"], phase["note"] = "failed", "; ".join(self.row_errors)[:2000]
        except OutOfBudget as stop:
            phase["status"], phase["note"] = "partial", "; ".join([str(stop)] + self.row_errors)[:2000]
        except KernelMismatch as mismatch:
            phase["status"], phase["note"] = "mismatch", str(mismatch)
            log(f"FAIL {name}: {mismatch}")
        except Exception as error:  # noqa: BLE001 - one phase's failure must not stop the others
            if self.hard_stopped:  # the stop may come back wrapped (by torch.compile, say)
                phase["status"], phase["note"] = "partial", f"hard stop at the time budget ({type(error).__name__})"
            else:
                phase["status"], phase["note"] = "failed", f"{type(error).__name__}: {error}"[:2000]
                traceback.print_exc()
                log(f"FAIL {name}: {type(error).__name__}: {error}")
        phase["seconds"] = time.perf_counter() - start
        log(f"{name}: {phase['status']} in {phase['seconds']:.1f} s, {len(phase['records'])} records")
        release_memory()
        self.save()

    @contextmanager
    def hard_stop(self, seconds):
        """Interrupt a phase that runs `seconds` past its start (a cold compile cannot be stopped
        between items): SIGALRM raises OutOfBudget in the main thread."""
        if not hasattr(signal, "setitimer"):
            yield
            return

        def stop(signum, frame):
            self.hard_stopped = True
            raise OutOfBudget(f"hard stop: the time budget ({self.args.budget_s:.0f} s) ran out inside the phase")

        previous = signal.signal(signal.SIGALRM, stop)
        signal.setitimer(signal.ITIMER_REAL, max(seconds, 1.0))
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)

    @contextmanager
    def row(self, name):
        """One row of a phase: a failure is reported and the phase goes on with its next row (the
        phase is then marked failed)."""
        try:
            yield
        except OutOfBudget:
            raise
        except Exception as error:  # noqa: BLE001
            traceback.print_exc()
            log(f"FAIL {name}: {type(error).__name__}: {error}")
            self.row_errors.append(f"{name}: {type(error).__name__}: {error}")

    def _skip(self, name, phase, reason):
        phase["status"], phase["note"] = "skipped", reason
        log(f"{name}: skipped ({reason})")
        self.save()

    def save(self):
        self.report["total_s"] = self.elapsed()
        self.out_json.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out_json.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.report, indent=1, default=str))
        tmp.replace(self.out_json)  # never a half-written file, even if the run is killed here
        write_results_section(self.results_md, render_section(self.report))

    def exit_status(self):
        statuses = [p["status"] for p in self.report["phases"].values()]
        checked = self.report["phases"].get("kernels_correctness", {}).get("records", [])
        if "mismatch" in statuses or any(not r["ok"] for r in checked):  # also when cut short
            return 1
        return 2 if "failed" in statuses else 0


def release_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def machine_info(device):
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = dict(
        python=platform.python_version(), torch=torch.__version__, triton=triton_version,
        cuda=torch.version.cuda, device=device,
    )
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        info["diffusers"] = None
    stats = importlib.import_module("sgfast.kernels.attention_stats")

    info["sgfast_kernels"] = str(Path(stats.__file__).parent)  # which copy runs (installed or checkout)
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, sms=props.multi_processor_count, memory_gib=props.total_memory / 2**30)
    else:
        info.update(gpu=None, sms=None)
    info["hbm_bytes_per_s"], info["hbm_note"] = hbm_bandwidth(info["gpu"])
    return info


def hbm_bandwidth(gpu_name):
    """The datasheet HBM bandwidth the roofline is measured against, picked by the device name."""
    name = (gpu_name or "").upper()
    for key, bandwidth in kernel_cases.HBM_BYTES_PER_S.items():
        if key in name:
            return bandwidth, f"{key} datasheet"
    return kernel_cases.HBM_BYTES_PER_S["H200"], f"unknown GPU {gpu_name!r}: H200 datasheet figure used"


# ---------------------------------------------------------------------------------------------------
# Timing and memory helpers.
# ---------------------------------------------------------------------------------------------------


def kernel_us(fn, cuda):
    """Median time of `fn` in microseconds: CUDA events via triton's do_bench on a GPU (it also
    flushes the L2 between calls), a wall clock on the CPU."""
    if cuda:
        import triton.testing

        try:
            return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e3
        except TypeError:  # a Triton without return_mode
            return triton.testing.do_bench(fn, warmup=10, rep=40, quantiles=[0.5]) * 1e3
    fn()  # the interpreter: one warm-up and one sample (a dry run checks the path, not the time)
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e6


def interleaved_medians(fns, repeats, device, per=1, warmup=True):
    """{name: median seconds / per} of each function, calls interleaved so that all see one
    machine state; one warm-up call each first."""
    for fn in fns.values() if warmup else ():
        fn()
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(measure.timed(fn, device)[0] / per)
    return {name: statistics.median(s) for name, s in samples.items()}


def peak_bytes(fn, device):
    """(peak, resident before) memory around `fn`: CUDA max_memory_allocated and memory_allocated,
    or the process's peak RSS and RSS on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(), before
    before = measure.reset_peak_rss()
    fn()
    return measure.peak_rss_bytes(), before


def rel_error(out, ref):
    out, ref = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out).all():
        return math.inf
    scale = ref.norm().item()
    return (out - ref).norm().item() / (scale if scale > 0 else 1.0)


# ---------------------------------------------------------------------------------------------------
# Phase 1: compiled kernels against the float64 reference.
# ---------------------------------------------------------------------------------------------------


def poison_allocator(device):
    """Fill the caching allocator's free memory with NaN, so that any output element a kernel fails
    to write reads as NaN rather than as a plausible stale value."""
    if torch.device(device).type == "cuda":
        # Both pools: blocks up to 1 MiB come from 2 MiB segments of their own, larger ones from big segments.
        garbage = [torch.full((MIB // 4 - 1024,), float("nan"), device=device) for _ in range(32)]
        garbage.append(torch.full((64 * MIB // 4,), float("nan"), device=device))
        del garbage


def stats_input(batch, heads, n, d, dtype, layout, device, generator, requires_grad):
    """q or k [batch, heads, n, d] in one of the layouts the op meets: contiguous, diffusers' head
    split of [B, n, heads * d] (`view(...).transpose(1, 2)`), or the CFG half `x[1:]` of that."""
    rows = batch + 1 if layout == "cfg_half" else batch
    shape = (rows, heads, n, d) if layout == "contiguous" else (rows, n, heads * d)
    base = torch.randn(shape, generator=generator, dtype=torch.float32).to(device, dtype).requires_grad_(requires_grad)
    x = base if layout == "contiguous" else base.view(rows, n, heads, d).transpose(1, 2)
    return x[1:] if layout == "cfg_half" else x


def token_indices(batch, selected, keys, generator, device):
    """[batch, selected] key indices with a repeated token and the last key."""
    index = torch.randint(0, keys, (batch, selected), generator=generator)
    index[:, -1] = index[:, 0]  # a repeated token: its gradients must add up
    index[:, 1] = keys - 1
    return index.to(device)


def correctness_case(op, reference, device, dtype, head_dim, layout, cfg, seed):
    generator = torch.Generator().manual_seed(seed)  # fresh inputs per case
    (height, width), batch, heads, keys, selected = cfg.grid, cfg.batch, cfg.heads, kernel_cases.KEYS, 5
    n = height * width
    q = stats_input(batch, heads, n, head_dim, dtype, layout, device, generator, requires_grad=True)
    k = stats_input(batch, heads, keys, head_dim, dtype, layout, device, generator, requires_grad=False)
    index = token_indices(batch, selected, keys, generator, device)
    grad_sums = torch.randn(batch, selected, 3, generator=generator).to(device)
    grad_maps = torch.randn(batch, selected, n, generator=generator).to(device)
    scale = head_dim**-0.5

    poison_allocator(device)
    sums, maps = op(q, k, index, height, width, scale=scale, return_maps=True, impl="triton")
    (dq,) = torch.autograd.grad([sums, maps], [q], [grad_sums.to(sums.dtype), grad_maps.to(maps.dtype)])
    again_sums, again_maps = op(q.detach(), k, index, height, width, scale=scale, return_maps=True, impl="triton")

    q64 = q.detach().double().requires_grad_(True)
    ref_sums, ref_maps = reference(q64, k.double(), index, height, width, scale, return_maps=True)
    (ref_dq,) = torch.autograd.grad([ref_sums, ref_maps], [q64], [grad_sums.double(), grad_maps.double()])

    tol, tol_dq = TOLERANCES[dtype]
    record = dict(
        dtype=DTYPE_NAMES[dtype], head_dim=head_dim, layout=layout, batch=batch, heads=heads, height=height,
        width=width, keys=keys, selected=selected, q_contiguous=q.is_contiguous(),
        err_sums=rel_error(sums, ref_sums), err_maps=rel_error(maps, ref_maps), err_dq=rel_error(dq, ref_dq),
        tol=tol, tol_dq=tol_dq,
        deterministic=bool(torch.equal(sums, again_sums) and torch.equal(maps, again_maps)),
    )
    record["ok"] = record["err_sums"] <= tol and record["err_maps"] <= tol and record["err_dq"] <= tol_dq
    return record


def log_case(record):
    case = f"{record['dtype']} d={record['head_dim']} {record['layout']}"
    if "error" in record:
        log(f"  FAIL {case}: {record['error']}")
        return
    log(
        f"  {'ok' if record['ok'] else 'FAIL'} {case}: sums {record['err_sums']:.1e} maps {record['err_maps']:.1e} "
        f"dq {record['err_dq']:.1e} (tol {record['tol']:.0e}/{record['tol_dq']:.0e})"
        + ("" if record["deterministic"] else " NOT DETERMINISTIC")
    )


def phase_kernels_correctness(bench, records):
    # The module itself (its debug flag): `sgfast.kernels.attention_stats` as an attribute is the function.
    stats = importlib.import_module("sgfast.kernels.attention_stats")

    if hasattr(stats, "DEBUG_POISON_OUTPUTS"):
        stats.DEBUG_POISON_OUTPUTS = True  # NaN-filled outputs: an unwritten element cannot pass
    cfg, device = bench.config, bench.config.device
    seed = 0
    try:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for head_dim in cfg.head_dims:
                for layout in LAYOUTS:
                    bench.tick()
                    seed += 1
                    try:
                        record = correctness_case(
                            stats.attention_stats, stats.attention_stats_reference, device, dtype, head_dim, layout,
                            cfg, seed,
                        )
                    except Exception as error:  # noqa: BLE001 - a crash is a failed case, not the end of the phase
                        traceback.print_exc()
                        record = dict(
                            dtype=DTYPE_NAMES[dtype], head_dim=head_dim, layout=layout, ok=False,
                            error=f"{type(error).__name__}: {error}"[:500],
                        )
                    records.append(record)
                    log_case(record)
    finally:
        if hasattr(stats, "DEBUG_POISON_OUTPUTS"):
            stats.DEBUG_POISON_OUTPUTS = False
    failed = [r for r in records if not r["ok"]]
    if failed:
        names = ", ".join(f"{r['dtype']} d={r['head_dim']} {r['layout']}" for r in failed)
        raise KernelMismatch(f"{len(failed)} of {len(records)} cases outside tolerance: {names}")


# ---------------------------------------------------------------------------------------------------
# Phase 2: kernel time against the bandwidth floor.
# ---------------------------------------------------------------------------------------------------


def timing_inputs(case, dtype, device, generator):
    """Q and K as the capture passes them (diffusers' head split of [B, N, heads * d])."""
    h, d = case.heads, case.head_dim

    def split(rows):
        x = torch.randn(case.batch, rows, h * d, generator=generator).to(device, dtype)
        return x.view(case.batch, rows, h, d).transpose(1, 2)

    index = torch.randint(0, case.keys, (case.batch, case.selected), generator=generator).to(device)
    return split(case.n), split(case.keys), index


def time_case(op, case, dtype, device, cuda):
    """Kernel times (CUDA-graph replays of the launches: the GPU's own time) and eager times of the
    public op (the CPU's launch overhead included), fused and torch, forward and backward."""
    fused = kernel_timing.time_fused(case, dtype, torch.device(device), check=False, eager=True)
    reference = kernel_timing.time_reference(case, dtype, torch.device(device))
    times = {}
    for kernel in ("forward", "backward"):
        times[(kernel, "triton")] = fused[f"{kernel}_us"]
        times[(kernel, "torch")] = reference[f"{kernel}_us"]
        times[(kernel, "triton_eager")] = fused[f"{kernel}_eager_us"]
        times[(kernel, "torch_eager")] = reference[f"{kernel}_eager_us"]
    return times


def phase_kernel_timing(bench, records):
    from sgfast.kernels.attention_stats import attention_stats

    cfg, device = bench.config, bench.config.device
    cuda = torch.device(device).type == "cuda"
    bandwidth = bench.report["machine"]["hbm_bytes_per_s"]
    for case in cfg.timing_cases:
        for dtype in (torch.float16, torch.bfloat16):
            bench.tick(5.0)
            with bench.row(f"{case.name} b{case.batch} {DTYPE_NAMES[dtype]}"):
                timing_row(records, attention_stats, case, dtype, device, cuda, bandwidth)


def phase_kernel_variants(bench, records):
    """Launch-plan variants of the fused kernels (more programs per SM, other blocks, warps and
    stages), each checked against float64 before it is timed: what the default plan should be."""
    device = torch.device(bench.config.device)
    cases = bench.config.variant_cases
    for case in cases:
        bench.tick(8.0)
        with bench.row(f"variants {case.name} b{case.batch}"):
            for row in kernel_timing.variant_rows(device, [case], progress=log):
                row["variant"] = str(row["variant"] or "default")
                records.append(row)


def timing_row(records, op, case, dtype, device, cuda, bandwidth):
    times = time_case(op, case, dtype, device, cuda)
    for kernel in ("forward", "backward"):
        nbytes = kernel_cases.bytes_moved(case, torch.finfo(dtype).bits // 8, kernel)
        floor = kernel_cases.floor_us(nbytes, bandwidth)
        triton_us, torch_us = times[(kernel, "triton")], times[(kernel, "torch")]
        records.append(dict(
            case=case.name, arch=case.arch, layer=case.layer, batch=case.batch, heads=case.heads,
            height=case.height, width=case.width, head_dim=case.head_dim, selected=case.selected,
            dtype=DTYPE_NAMES[dtype], kernel=kernel, triton_us=triton_us, torch_us=torch_us,
            speedup=torch_us / triton_us, bytes_moved=nbytes, floor_us=floor,
            pct_roofline=100.0 * floor / triton_us,
            triton_eager_us=times[(kernel, "triton_eager")], torch_eager_us=times[(kernel, "torch_eager")],
        ))
        log(
            f"  {case.name} b{case.batch} {DTYPE_NAMES[dtype]} {kernel}: triton {triton_us:.1f} us, "
            f"torch {torch_us:.1f} us, floor {floor:.2f} us ({100 * floor / triton_us:.0f}% of roofline)"
        )


# ---------------------------------------------------------------------------------------------------
# Phases 3-8: the pipelines.
# ---------------------------------------------------------------------------------------------------


def sd_pipeline(bench, key="sd15"):
    """The SD1.5-architecture pipeline (tiny in a dry run), built once and shared by the phases."""
    cfg = bench.config
    if key not in bench.state:
        model, resolution = (cfg.sd_model, cfg.sd_resolution) if key == "sd15" else (cfg.sdxl_model, cfg.sdxl_resolution)
        bench.state[key] = build_pipeline(model, resolution, cfg.device, cfg.dtype, default_arch_dir())
    return bench.state[key]


def sgfast_runner(bench, pipe, mode, edit, key="sd15"):
    """SgfastRunner (reference trace recorded once) for `mode` and `edit`, cached per pipeline.
    Reference-mode runners come first: fast mode freezes the UNet's weights."""
    from benchmarks.rows import Row, SgfastRunner

    name = (key, mode, edit)
    if name not in bench.state:
        bench.state[name] = SgfastRunner(pipe, Row("sgfast", mode, False, edit), bench.config.steps, bench.config.step_call)
    return bench.state[name]


def plain_runner(pipe, steps):
    from benchmarks.rows import PlainRunner, Row

    return PlainRunner(pipe, Row("plain"), steps)


def step_rows(bench, records, key, rows):
    """Per-step time (calls of `step_call` steps, interleaved with the plain pipeline's) and peak
    memory of a plain CFG step and of guided steps, each row against plain."""
    cfg = bench.config
    pipe = sd_pipeline(bench, key)
    plain = plain_runner(pipe, cfg.steps)
    for mode, edit in rows:
        bench.tick(10.0)
        with bench.row(f"{key} {mode} {edit}"):
            step_row(bench, records, key, pipe, plain, mode, edit)


def step_row(bench, records, key, pipe, plain, mode, edit):
    cfg, n = bench.config, bench.config.step_call
    run = sgfast_runner(bench, pipe, mode, edit, key)
    times = interleaved_medians(
        {"plain": lambda: plain.unguided(n), "guided": lambda: run.guided(n)}, cfg.repeats, cfg.device, per=n
    )
    plain_peak, plain_resident = peak_bytes(lambda: plain.unguided(1), cfg.device)
    guided_peak, guided_resident = peak_bytes(lambda: run.guided(1), cfg.device)
    records.append(dict(
        row=run.row.name, mode=mode, edit=edit, model=key if not bench.args.dry_run else "tiny",
        image_size=pipe.unet.config.sample_size * pipe.vae_scale_factor, dtype=str(cfg.dtype).split(".")[-1],
        plain_step_ms=times["plain"] * 1e3, guided_step_ms=times["guided"] * 1e3,
        guided_over_plain=times["guided"] / times["plain"], plain_peak_mib=plain_peak / MIB,
        guided_peak_mib=guided_peak / MIB, peak_ratio=guided_peak / plain_peak,
        # Above what was allocated before the call (weights and the cached runners): the step's own memory.
        plain_extra_mib=(plain_peak - plain_resident) / MIB, guided_extra_mib=(guided_peak - guided_resident) / MIB,
    ))
    r = records[-1]
    log(
        f"  {r['row']}: plain {r['plain_step_ms']:.1f} ms, guided {r['guided_step_ms']:.1f} ms "
        f"({r['guided_over_plain']:.2f}x); peak {r['plain_peak_mib']:.0f} -> {r['guided_peak_mib']:.0f} MiB "
        f"({r['peak_ratio']:.2f}x)"
    )


def split_vs_batched(bench, records, key="sd15", edit="move"):
    """The guided step two ways (benchmarks.guided_steps) on fast mode: time, peak memory, agreement."""
    from benchmarks.guided_steps import GuidedStep, batched_step, split_step

    cfg = bench.config
    bench.tick(10.0)
    run = sgfast_runner(bench, sd_pipeline(bench, key), "fast", edit, key)
    step = GuidedStep(run.sg, PROMPT, run.edits(), run.references[cfg.steps], cfg.steps)
    ways = {"split": lambda: split_step(step), "batched": lambda: batched_step(step)}
    times = interleaved_medians(ways, cfg.repeats, cfg.device)
    (noise_a, grad_a), (noise_b, grad_b) = split_step(step), batched_step(step)
    agreement = dict(noise_rel_diff=rel_error(noise_b, noise_a), grad_rel_diff=rel_error(grad_b, grad_a))
    for way, fn in ways.items():
        records.append(dict(
            row=f"guided step, {way}", way=way, mode="fast", edit=edit, step_ms=times[way] * 1e3,
            peak_mib=peak_bytes(fn, cfg.device)[0] / MIB, over_split=times[way] / times["split"], **agreement,
        ))
        log(f"  guided step {way}: {times[way] * 1e3:.1f} ms, peak {records[-1]['peak_mib']:.0f} MiB")
    faster = min(times, key=times.get)
    log(f"  faster here: {faster}; batched/split noise diff {agreement['noise_rel_diff']:.1e}")


def phase_sd15_step(bench, records):
    step_rows(bench, records, "sd15", bench.config.sd_rows)
    with bench.row("guided step split vs batched"):
        split_vs_batched(bench, records)


def image_runners(bench):
    """Plain, edited (fast mode, the paper's full move) and Attend-and-Excite on the SD1.5 pipeline."""
    from benchmarks.rows import AttendExciteRunner, Row

    if "image_runners" not in bench.state:
        pipe = sd_pipeline(bench)
        steps = bench.config.steps
        bench.state["image_runners"] = {
            "diffusers plain": plain_runner(pipe, steps),
            "sgfast fast: move + keep (edited)": sgfast_runner(bench, pipe, "fast", "move_keep"),
            "diffusers Attend-and-Excite": AttendExciteRunner(pipe, Row("attend_excite"), steps),
        }
        if bench.args.dry_run:
            # Its refinements (up to 20 forward-backward passes at three steps) would make the dry run
            # minutes long; a dry run checks that it runs, guided at every step.
            bench.state["image_runners"]["diffusers Attend-and-Excite"].schedule = lambda n: dict(
                max_iter_to_alter=n, thresholds={}
            )
    return bench.state["image_runners"]


def phase_sd15_image(bench, records):
    cfg = bench.config
    fns = {}
    for name, run in image_runners(bench).items():
        bench.tick(10.0)
        with bench.row(name):  # the warm-up image: a runner that fails is reported and left out
            run.image(cfg.steps)
            fns[name] = lambda run=run: run.image(cfg.steps)
    bench.tick(20.0)
    times = interleaved_medians(fns, cfg.image_repeats, cfg.device, warmup=False)
    plain = times.get("diffusers plain")
    for name, seconds in times.items():
        records.append(dict(
            row=name, steps=cfg.steps, image_s=seconds, over_plain=seconds / plain if plain else None,
            images_per_s=1.0 / seconds,
        ))
        log(f"  {name}: {seconds:.2f} s per {cfg.steps}-step image ({records[-1]['over_plain'] or 0:.2f}x plain)")


def phase_energy(bench, records):
    cfg = bench.config
    energy = measure.Energy(cfg.device)
    for name, run in image_runners(bench).items():
        bench.tick(10.0)
        with bench.row(name):
            energy_row(bench, records, energy, name, run)


def energy_row(bench, records, energy, name, run):
    cfg = bench.config
    joules, seconds = [], []
    for _ in range(cfg.image_repeats):
        before = energy.read_joules() if energy.available else None
        seconds.append(measure.timed(lambda: run.image(cfg.steps), cfg.device)[0])
        if energy.available:
            joules.append(energy.read_joules() - before)
    records.append(dict(
        row=name, steps=cfg.steps, image_s=statistics.median(seconds),
        energy_j_per_image=statistics.median(joules) if joules else None,
        energy_note="NVML" if joules else energy.reason,
    ))
    j = records[-1]["energy_j_per_image"]
    log(f"  {name}: " + (f"{j:.0f} J per image" if j is not None else f"no energy reading ({energy.reason})"))


def phase_sdxl_step(bench, records):
    # Free the SD1.5 models first: the SDXL UNet at 1024px needs the room.
    for key in [k for k in bench.state if k == "sd15" or k == "image_runners" or (isinstance(k, tuple) and k[0] == "sd15")]:
        del bench.state[key]
    release_memory()
    step_rows(bench, records, "sdxl", bench.config.sdxl_rows)
    for record in records:
        record["note"] = "SDXL UNet in an SD1.x pipeline (SD VAE, one-layer 2048-wide text encoder, zero pooled embeddings)"
    bench.state.clear()


def phase_sd15_compile(bench, records):
    """compile=True: the UNet forward compiled in place (so this phase owns its pipeline), timed on
    the guided step split and batched against the plain eager step, with each first call (the
    compile) timed apart."""
    from benchmarks.guided_steps import GuidedStep, batched_step, split_step
    from sgfast import SelfGuidancePipeline

    cfg = bench.config
    pipe = sd_pipeline(bench)
    eager = sgfast_runner(bench, pipe, "fast", "move")  # its reference trace, recorded eagerly
    plain = plain_runner(pipe, cfg.steps)
    plain_s = interleaved_medians({"plain": lambda: plain.unguided(cfg.step_call)}, cfg.repeats, cfg.device)["plain"]
    plain_s /= cfg.step_call
    compiled = SelfGuidancePipeline.from_pipe(pipe, mode="fast", compile=cfg.compile_backend)
    step = GuidedStep(compiled, PROMPT, eager.edits(), eager.references[cfg.steps], cfg.steps)
    for way in cfg.compile_ways:
        fn = {"split": split_step, "batched": batched_step}[way]
        bench.tick(60.0)
        first_s = measure.timed(lambda: fn(step), cfg.device)[0]  # compiles (cold caches: slow)
        seconds = interleaved_medians({way: lambda: fn(step)}, cfg.repeats, cfg.device)[way]
        records.append(dict(
            row=f"fast compiled, guided step {way}", way=way, backend=str(cfg.compile_backend),
            first_call_s=first_s, step_ms=seconds * 1e3, plain_eager_step_ms=plain_s * 1e3,
            guided_over_plain=seconds / plain_s,
        ))
        log(f"  compiled {way}: first call {first_s:.1f} s, then {seconds * 1e3:.1f} ms ({seconds / plain_s:.2f}x plain eager)")
    bench.state.clear()  # the pipeline's UNet is compiled now: nothing after this may reuse it


def capture_graph(fn, warmup=3):
    """A CUDA graph of `fn` (after warm-up on a side stream, as torch.cuda.graphs asks) and its outputs."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def graph_row(bench, records, name, fn):
    """`fn` eager against its CUDA-graph replay; a capture that fails is recorded as not capturable
    (with the reason), a finding rather than a failure."""
    cfg = bench.config
    eager_s = interleaved_medians({"eager": fn}, cfg.repeats, cfg.device)["eager"]
    record = dict(row=name, eager_ms=eager_s * 1e3, graph_ms=None, captured=False, note="")
    if torch.device(cfg.device).type != "cuda":
        record["note"] = "no CUDA: ran eagerly only"
    else:
        try:
            graph, _ = capture_graph(fn)
            replay = interleaved_medians({"graph": graph.replay}, cfg.repeats, cfg.device)["graph"]
            record.update(captured=True, graph_ms=replay * 1e3)
        except Exception as error:  # noqa: BLE001
            record["note"] = f"not capturable: {type(error).__name__}: {error}"[:500]
    records.append(record)
    graph = f"{record['graph_ms']:.1f} ms" if record["captured"] else record["note"]
    log(f"  {name}: eager {record['eager_ms']:.1f} ms, CUDA graph {graph}")


def phase_cuda_graphs(bench, records):
    """The plain CFG step's UNet forward as a CUDA graph, then the guided split step (today's sampler
    step, fast mode): each eager against its replay, or why it could not be captured."""
    from benchmarks.guided_steps import GuidedStep, split_step

    cfg = bench.config
    pipe = sd_pipeline(bench)
    run = sgfast_runner(bench, pipe, "fast", "move")
    step = GuidedStep(run.sg, PROMPT, run.edits(), run.references[cfg.steps], cfg.steps)
    latents = torch.cat([step.latents] * 2)

    def plain_forward():
        with torch.no_grad():
            return pipe.unet(latents, step.timestep, encoder_hidden_states=step.embeds, return_dict=False)[0]

    with bench.row("plain CFG UNet forward"):
        graph_row(bench, records, "plain CFG UNet forward", plain_forward)
    with bench.row("guided split step (fast)"):
        graph_row(bench, records, "guided split step (fast)", lambda: split_step(step))


def phase_sd15_guided_steps(bench, records):
    """SD1.5 per-step time through the public API: the plain diffusers step against sgfast's guided
    step (move + keep terms) in both forms (split, batched), eager and with cuda_graph=True (each
    guided and plain step replayed as a CUDA graph). In a dry run (no CUDA) the graphs' static-buffer
    path runs eagerly (StepGraphs dry_run), so that its code is exercised."""
    from benchmarks.rows import Row, SgfastRunner
    from sgfast.graphs import StepGraphs

    cfg, n = bench.config, bench.config.step_call
    pipe = sd_pipeline(bench)
    plain = plain_runner(pipe, cfg.steps)
    cuda = torch.device(cfg.device).type == "cuda"
    for form in ("split", "batched"):
        for graphed in (False, True):
            name = f"sgfast fast ({form}{', CUDA graph' if graphed else ''}): move + keep"
            bench.tick(10.0)
            with bench.row(name):
                options = dict(guided_step=form, cuda_graph=graphed and cuda)
                run = SgfastRunner(pipe, Row("sgfast", "fast", False, "move_keep"), cfg.steps, n, **options)
                if graphed and not cuda:
                    run.sg._graphs = StepGraphs.for_pipeline(pipe, "fast", dry_run=True)
                times = interleaved_medians(
                    {"plain": lambda: plain.unguided(n), "guided": lambda: run.guided(n)}, cfg.repeats, cfg.device, per=n
                )
                peak, _ = peak_bytes(lambda: run.guided(1), cfg.device)
                records.append(dict(
                    row=name, form=form, cuda_graph=graphed, graph_replayed=graphed and cuda,
                    plain_step_ms=times["plain"] * 1e3, guided_step_ms=times["guided"] * 1e3,
                    guided_over_plain=times["guided"] / times["plain"], guided_peak_mib=peak / MIB,
                ))
                log(f"  {name}: plain {times['plain'] * 1e3:.1f} ms, guided {times['guided'] * 1e3:.1f} ms "
                    f"({times['guided'] / times['plain']:.2f}x)")


PHASES = [
    # (name, function, slow (left out by --quick), seconds it needs at least to start)
    ("kernels_correctness", phase_kernels_correctness, False, 0),
    ("kernel_timing", phase_kernel_timing, False, 10),
    ("sd15_step", phase_sd15_step, False, 20),
    ("sd15_guided_steps", phase_sd15_guided_steps, False, 30),
    ("kernel_variants", phase_kernel_variants, False, 30),
    ("sd15_image", phase_sd15_image, True, 30),
    ("energy", phase_energy, True, 20),  # 50-step images again: slow too
    ("sdxl_step", phase_sdxl_step, True, 45),
    ("cuda_graphs", phase_cuda_graphs, False, 15),
    ("sd15_compile", phase_sd15_compile, True, 100),
]


# ---------------------------------------------------------------------------------------------------
# The "## GPU" section of RESULTS.md.
# ---------------------------------------------------------------------------------------------------

SECTION = "## GPU"

# Per phase: (column header, record key, format) of its table.
TABLES = {
    "kernels_correctness": [
        ("dtype", "dtype", "{}"), ("head dims", "head_dim", "{}"), ("Q/K layouts", "layout", "{}"),
        ("max sums err", "err_sums", "{:.1e}"), ("max maps err", "err_maps", "{:.1e}"), ("max dq err", "err_dq", "{:.1e}"),
        ("tol (maps/dq)", None, None), ("deterministic", "deterministic", "{}"), ("ok", "ok", "{}"),
        ("error", "error", "{}"),
    ],
    "kernel_timing": [
        ("layer", "case", "{}"), ("batch", "batch", "{}"), ("dtype", "dtype", "{}"), ("kernel", "kernel", "{}"),
        ("triton us", "triton_us", "{:.1f}"), ("torch us", "torch_us", "{:.1f}"), ("speed-up", "speedup", "{:.2f}x"),
        ("floor us", "floor_us", "{:.2f}"), ("% of roofline", "pct_roofline", "{:.0f}"),
        ("triton eager us", "triton_eager_us", "{:.1f}"), ("torch eager us", "torch_eager_us", "{:.1f}"),
    ],
    "kernel_variants": [
        ("layer", "layer", "{}"), ("batch", "batch", "{}"), ("variant", "variant", "{}"), ("block_n", "block_n", "{}"),
        ("warps", "num_warps", "{}"), ("fwd programs", "programs_forward", "{}"), ("fwd us", "forward_us", "{:.1f}"),
        ("bwd programs", "programs_backward", "{}"), ("bwd us", "backward_us", "{:.1f}"),
        ("maps err", "maps_error", "{:.1e}"), ("dq err", "dq_error", "{:.1e}"), ("error", "error", "{}"),
    ],
    "sd15_step": [
        ("row", "row", "{}"), ("model", "model", "{}"), ("px", "image_size", "{}"), ("plain ms", "plain_step_ms", "{:.1f}"), ("guided ms", "guided_step_ms", "{:.1f}"),
        ("guided/plain", "guided_over_plain", "{:.2f}"), ("way", "way", "{}"), ("step ms", "step_ms", "{:.1f}"),
        ("plain peak MiB", "plain_peak_mib", "{:.0f}"), ("guided peak MiB", "guided_peak_mib", "{:.0f}"),
        ("peak ratio", "peak_ratio", "{:.2f}"), ("plain extra MiB", "plain_extra_mib", "{:.0f}"),
        ("guided extra MiB", "guided_extra_mib", "{:.0f}"), ("peak MiB", "peak_mib", "{:.0f}"),
    ],
    "sd15_guided_steps": [
        ("row", "row", "{}"), ("plain ms", "plain_step_ms", "{:.1f}"), ("guided ms", "guided_step_ms", "{:.1f}"),
        ("guided/plain", "guided_over_plain", "{:.2f}"), ("guided peak MiB", "guided_peak_mib", "{:.0f}"),
        ("graph replayed", "graph_replayed", "{}"),
    ],
    "sd15_image": [
        ("row", "row", "{}"), ("steps", "steps", "{}"), ("s/image", "image_s", "{:.2f}"), ("x plain", "over_plain", "{:.2f}"),
    ],
    "energy": [
        ("row", "row", "{}"), ("s/image", "image_s", "{:.2f}"), ("J/image", "energy_j_per_image", "{:.0f}"),
        ("source", "energy_note", "{}"),
    ],
    "sdxl_step": [
        ("row", "row", "{}"), ("model", "model", "{}"), ("px", "image_size", "{}"), ("plain ms", "plain_step_ms", "{:.1f}"), ("guided ms", "guided_step_ms", "{:.1f}"),
        ("guided/plain", "guided_over_plain", "{:.2f}"), ("plain peak MiB", "plain_peak_mib", "{:.0f}"),
        ("guided peak MiB", "guided_peak_mib", "{:.0f}"), ("peak ratio", "peak_ratio", "{:.2f}"),
        ("plain extra MiB", "plain_extra_mib", "{:.0f}"), ("guided extra MiB", "guided_extra_mib", "{:.0f}"),
    ],
    "sd15_compile": [
        ("row", "row", "{}"), ("first call s", "first_call_s", "{:.1f}"), ("step ms", "step_ms", "{:.1f}"),
        ("plain eager ms", "plain_eager_step_ms", "{:.1f}"), ("guided/plain", "guided_over_plain", "{:.2f}"),
    ],
    "cuda_graphs": [
        ("row", "row", "{}"), ("eager ms", "eager_ms", "{:.1f}"), ("graph ms", "graph_ms", "{:.1f}"),
        ("captured", "captured", "{}"), ("note", "note", "{}"),
    ],
}


def cell(record, key, fmt):
    if key is None:  # the tolerance pair
        return f"{record.get('tol', 0):.0e} / {record.get('tol_dq', 0):.0e}"
    value = record.get(key)
    if value is None:
        return ""
    try:
        return fmt.format(value).replace("|", "/")
    except (ValueError, TypeError):
        return str(value)


def table(records, columns):
    columns = [c for c in columns if c[1] is None or any(r.get(c[1]) is not None for r in records)]
    lines = ["| " + " | ".join(c[0] for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r, key, fmt) for _, key, fmt in columns) + " |" for r in records]
    return lines


def correctness_by_dtype(records):
    """One row per dtype: the largest errors over its head dims and Q/K layouts (each case is in
    outputs/bench/gpu.json); deterministic and ok only if every case was."""
    rows = {}
    for r in records:
        row = rows.setdefault(r["dtype"], {"dtype": r["dtype"], "head_dim": [], "layout": [], "tol": r.get("tol"),
                                           "tol_dq": r.get("tol_dq"), "deterministic": True, "ok": True, "error": None})
        for key in ("head_dim", "layout"):
            if r.get(key) not in row[key]:
                row[key].append(r.get(key))
        for key in ("err_sums", "err_maps", "err_dq"):
            if r.get(key) is not None:
                row[key] = max(row.get(key, r[key]), r[key])
        row["deterministic"] = row["deterministic"] and bool(r.get("deterministic"))
        row["ok"] = row["ok"] and bool(r.get("ok"))
        if r.get("error"):
            row["error"] = r["error"]
    for row in rows.values():
        row["head_dim"] = ", ".join(str(v) for v in row["head_dim"])
        row["layout"] = ", ".join(str(v) for v in row["layout"])
    return list(rows.values())


SUMMARISED = {"kernels_correctness": correctness_by_dtype}


def render_section(report):
    m = report["machine"]
    lines = [
        f"{SECTION} (`{COMMAND}`)", "",
        f"`{report['command']}`, {report['started']}: {m.get('gpu') or 'no GPU (dry run on the CPU)'}"
        + (f" ({m['sms']} SMs)" if m.get("sms") else "")
        + f", torch {m['torch']}, triton {m['triton']}, diffusers {m.get('diffusers')}, Python {m['python']}; "
        f"{report['total_s']:.0f} s in all (budget {report['budget_s']:.0f} s). Roofline: bytes that must move "
        f"over {m['hbm_bytes_per_s'] / 1e12:.2f} TB/s ({m['hbm_note']}). Raw records: `outputs/bench/gpu.json`.",
        "",
        "| phase | status | seconds | note |", "|---|---|---|---|",
    ]
    for name, phase in report["phases"].items():
        lines.append(f"| {name} | {phase['status']} | {phase['seconds']:.1f} | {phase['note'].replace('|', '/')[:200]} |")
    for name, phase in report["phases"].items():
        if phase["records"] and name in TABLES:
            lines += ["", f"**{name}**"]
            # Records of another kind (the split/batched guided step) get a table of their own.
            groups = {}
            for record in SUMMARISED.get(name, list)(phase["records"]):
                groups.setdefault("way" in record, []).append(record)
            for group in groups.values():
                lines += [""] + table(group, TABLES[name])
    return "\n".join(lines) + "\n"


def write_results_section(path, text):
    """Replace the "## GPU" section of `path` (up to the next level-1 or level-2 heading), or append it."""
    path = Path(path)
    lines = path.read_text().splitlines() if path.exists() else ["# Benchmark results"]
    start = next((i for i, line in enumerate(lines) if line == SECTION or line.startswith(SECTION + " ")), None)
    new = text.rstrip("\n").splitlines()
    if start is None:
        lines += [""] + new
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith(("# ", "## "))), len(lines))
        lines[start:end] = new + ([""] if end < len(lines) else [])
    path.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------------
# Entry point.
# ---------------------------------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="leave out the slow phases (50-step images and their energy, SDXL, compile)")
    parser.add_argument("--dry-run", action="store_true", help="every code path on the CPU with tiny shapes")
    parser.add_argument("--budget-s", type=float, default=420.0, help="time budget; later phases are skipped (default 420)")
    parser.add_argument(
        "--only", default=None, help="comma-separated phases to run (default: all): " + ",".join(n for n, *_ in PHASES)
    )
    parser.add_argument("--out", default=None, help="folder for gpu.json and RESULTS.md (dry run: a temporary folder)")
    args = parser.parse_args(argv)
    args.argv = list(argv)
    return args


def output_paths(args):
    """(gpu.json, RESULTS.md): the repo's, or for a dry run (or --out) a folder of its own holding a
    copy of RESULTS.md, so that a dry run never rewrites the committed figures."""
    if args.out is None and not args.dry_run:
        return REPO / "outputs" / "bench" / "gpu.json", REPO / "benchmarks" / "RESULTS.md"
    folder = Path(args.out or tempfile.mkdtemp(prefix="sgfast-gpu-dry-run-"))
    folder.mkdir(parents=True, exist_ok=True)
    results = folder / "RESULTS.md"
    if not results.exists():
        results.write_text((REPO / "benchmarks" / "RESULTS.md").read_text())
    return folder / "gpu.json", results


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.dry_run and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--dry-run needs TRITON_INTERPRET=1 before the kernels are imported (run it as a script)")
    config = settings(args)
    if config.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run this on a machine with an NVIDIA GPU, or use --dry-run")
    if args.dry_run:
        # One thread: on a small shared CPU, torch's thread pool makes tiny ops stall.
        torch.set_num_threads(1)
    out_json, results_md = output_paths(args)
    bench = Bench(args, config, out_json, results_md)
    log(f"{bench.report['machine']}; writing {out_json} and the GPU section of {results_md}")
    only = set(args.only.split(",")) if args.only else None
    if only and only - {name for name, *_ in PHASES}:
        raise SystemExit(f"--only: unknown phases {sorted(only - {name for name, *_ in PHASES})}")
    for name, fn, slow, need_s in PHASES:
        if only is None or name in only:
            bench.run(name, fn, slow=slow, need_s=need_s)
    status = bench.exit_status()
    for name, phase in bench.report["phases"].items():
        log(f"{name:20s} {phase['status']:8s} {phase['seconds']:7.1f} s  {phase['note'][:120]}")
    log(f"total {bench.elapsed():.0f} s; results in {out_json}; exit status {status}")
    if status == 1:
        log("FAIL: the compiled kernels disagree with the float64 reference (see kernels_correctness)")
    return status


if __name__ == "__main__":
    sys.exit(main())
