"""Every GPU measurement the project needs, in one command that fits in a few minutes on one GPU.

    python -m benchmarks.gpu              # make bench-gpu (WHEELS=wheelhouse on an air-gapped machine)
    python -m benchmarks.gpu --quick      # leaves out the slow phases (50-step images, SDXL, compile)
    python -m benchmarks.gpu --dry-run    # every code path on the CPU, tiny shapes, Triton interpreter

Phases, the headline ones first; each is timed, wrapped (a failure is reported and the next phase
still runs) and written to outputs/bench/gpu.json as soon as it ends, so that a run cut short still
leaves its results; once the time budget (--budget-s) is spent, the remaining phases are skipped and
reported as skipped. Each phase's cold time is estimated in docs/gpu-benchmark.md (under 90 s each).

1. sd15_guided_steps: SD1.5 architecture (random weights, fp16, 512px) through the public API: the
   plain CFG step against sgfast's guided step (move + keep terms), split, batched and "auto"
   (which form the run's chooser picks, and both forms' timings), eager (against diffusers' plain
   step) and with CUDA graphs (against sgfast's plain step replayed as a graph), with peak memory.
2. sd15_image: whole 50-step images with the paper's schedule, decoded: diffusers plain, sgfast
   edited, diffusers' Attend-and-Excite (eager), and sgfast plain and edited with CUDA graphs; peak
   memory and NVML energy per image.
3. sd15_compile: the guided step with compile=True against the plain eager step (its first call,
   the compile, timed apart).
4. sdxl_step: diffusers' StableDiffusionXLPipeline (SDXL base UNet, both text encoders, pooled
   embeddings, added time ids; random weights, fp16, 1024px): plain vs guided step ("auto"), eager
   and with CUDA graphs.
5. sdxl_image: SDXL 50-step images, plain vs edited, eager and with CUDA graphs, peak memory.
6. kernels_correctness: the compiled Triton kernels (impl="triton") against the float64 torch
   reference on the GPU: fp32/fp16/bf16, head dims 40/64/80/160, an odd grid, batch 3, 77 keys, a
   repeated token, contiguous and non-contiguous Q and K (diffusers' head split, and its CFG half),
   forward (sums, maps) and backward (dq). A mismatch makes the command's exit status nonzero.
7. kernel_timing: each default captured layer's launch (benchmarks.kernel_cases), fp16 and bf16,
   forward and backward, triton against the torch reference, against the HBM bandwidth floor:
   kernel time by CUDA-graph replay, and the eager call's time (the CPU's launch overhead in it).
8. sd15_step: a plain CFG step against a guided step of each mode (reference, fast), time ratio and
   peak memory; the guided step split against batched (benchmarks.guided_steps), their agreement.
9. kernel_variants: launch-plan alternatives of the kernels, each checked, then timed.
10. cuda_graphs: the plain step's UNet forward, eager against its CUDA-graph replay.

`--quick` leaves out 2, 3, 4 and 5. Exit status: 1 if a kernel disagrees with the reference, 2 if
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
from benchmarks.models import PROMPT, REPO, build_pipeline, default_arch_dir, image_size, sdxl_pipeline  # noqa: E402

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
            sd_rows=[("reference", "move_keep"), ("fast", "move")],
            sd_step_variants=[("split", False), ("auto", False), ("auto", True)], sdxl_step_variants=[("auto", True)],
            attend_excite_repeats=1, sdxl_image_repeats=1, compile_ways=("split",),
        )
    return SimpleNamespace(
        device="cuda", dtype=torch.float16, sd_model="sd15", sd_resolution=512, sdxl_model="sdxl",
        sdxl_resolution=1024, steps=50, step_call=4, repeats=5, image_repeats=2, head_dims=(40, 64, 80, 160),
        heads=8, grid=(15, 17), batch=3, timing_cases=kernel_cases.default_cases(batches=(1, 8)),
        variant_cases=kernel_timing.variant_cases(),
        compile_backend=True,
        # Reference mode first: fast mode freezes the UNet's weights.
        sd_rows=[("reference", "move"), ("reference", "move_keep"), ("fast", "move"), ("fast", "move_keep")],
        # (guided_step, CUDA graphs) of the headline step rows; "auto" measures both forms first.
        sd_step_variants=[(form, graphed) for graphed in (False, True) for form in ("split", "batched", "auto")],
        sdxl_step_variants=[("auto", False), ("auto", True)],
        # Timed 50-step images per row, after a short warm-up one (Attend-and-Excite's cost 12 s each on an H200).
        attend_excite_repeats=1, sdxl_image_repeats=1,
        # One form compiled: a cold inductor compile of the UNet's forward and backward takes most of a phase.
        compile_ways=("split",),
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
    before = measure.reset_peak_rss(collect=not DRY_RUN)  # a dry run's CPU peaks only need to be numbers
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
    """The phases' pipeline, built once and shared: "sd15", the SD1.5 architecture in a
    StableDiffusionPipeline (tiny in a dry run); "sdxl", diffusers' own StableDiffusionXLPipeline
    (both text encoders, pooled embeddings and added time ids; its tiny test build in a dry run)."""
    cfg = bench.config
    if key not in bench.state:
        if key == "sd15":
            pipe = build_pipeline(cfg.sd_model, cfg.sd_resolution, cfg.device, cfg.dtype, default_arch_dir())
        elif cfg.sdxl_model == "tiny":
            from sgfast.testing import tiny_sdxl_pipeline

            pipe = tiny_sdxl_pipeline(image_size=cfg.sdxl_resolution).to(cfg.device, cfg.dtype)
        else:
            pipe = sdxl_pipeline(default_arch_dir(), cfg.device, cfg.dtype, cfg.sdxl_resolution)
        bench.state[key] = pipe
    return bench.state[key]


def step_forms(bench):
    """The run's own guided_step="auto" chooser: its cache beside gpu.json, emptied when the run
    starts, so that every run measures (on the CPU of a dry run too: no fixed choice)."""
    from sgfast.step_form import StepFormChooser

    if getattr(bench, "step_forms", None) is None:  # kept across phases (bench.state is cleared)
        path = bench.out_json.parent / "guided_step.json"
        path.unlink(missing_ok=True)
        bench.step_forms = StepFormChooser(path=path, fixed={})
    return bench.step_forms


def sgfast_runner(bench, pipe, mode, edit, key="sd15"):
    """SgfastRunner (reference trace recorded once) for `mode` and `edit`, cached per pipeline.
    Reference-mode runners come first: fast mode freezes the UNet's weights."""
    from benchmarks.rows import Row, SgfastRunner

    name = (key, mode, edit)
    if name not in bench.state:
        bench.state[name] = SgfastRunner(pipe, Row("sgfast", mode, False, edit), bench.config.steps, bench.config.step_call,
                                         step_forms=step_forms(bench))
    return bench.state[name]


def fast_runner(bench, pipe, steps, form="auto", graphed=False, references=None, step_call=None):
    """A fast-mode runner of the paper's full move in `form`, its steps replayed as CUDA graphs where
    `graphed` (in a dry run the graphs' static-buffer path, run eagerly)."""
    from benchmarks.rows import Row, SgfastRunner
    from sgfast.graphs import StepGraphs

    cuda = torch.device(bench.config.device).type == "cuda"
    run = SgfastRunner(pipe, Row("sgfast", "fast", False, "move_keep"), steps, step_call, references=references,
                       guided_step=form, cuda_graph=graphed and cuda, step_forms=step_forms(bench))
    if graphed and not cuda:
        run.sg._graphs = StepGraphs.for_pipeline(pipe, "fast", dry_run=True)
    return run


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
    """The plain CFG step's UNet forward, eager against its CUDA-graph replay: what graph capture
    saves on this host's launch overhead (the headline phases time sgfast's own graphed steps)."""
    from benchmarks.guided_steps import GuidedStep

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


# ---------------------------------------------------------------------------------------------------
# The headline phases: SD1.5 and SDXL steps and 50-step images through the public API.
# ---------------------------------------------------------------------------------------------------

# SD1.5 512px fp16 (docs/gpu-benchmark.md): guided / plain step and edited / plain image with CUDA
# graphs on both sides, peak memory of the edited image, and the eager edited image against diffusers.
TARGETS = dict(step_graph=1.5, image_graph=1.3, image_peak=1.3, image_eager=1.8)
ATTEND_EXCITE = "diffusers Attend-and-Excite"


def with_target(record, key, ratio, target):
    record[f"{key}_target"] = target
    record[f"{key}_met"] = bool(ratio <= target)


def guided_step_rows(bench, records, key, variants):
    """Per-step time and peak memory through the public API: the plain CFG step against sgfast's
    guided step (the paper's full move) in each (form, graphed) of `variants`. An eager row's plain
    step is diffusers' own; a graphed row's is sgfast's without edits, replayed as a CUDA graph
    (graphs on both sides). An "auto" row's first guided call is where the run's chooser measures:
    the row says which form it picked and both forms' timings."""
    cfg, n = bench.config, bench.config.step_call
    pipe = sd_pipeline(bench, key)
    diffusers_plain = plain_runner(pipe, n)
    references = None
    for form, graphed in variants:
        name = f"sgfast fast ({form}{', CUDA graph' if graphed else ''}): move + keep"
        bench.tick(10.0)
        with bench.row(f"{key} {name}"):
            run = fast_runner(bench, pipe, n, form, graphed, references, step_call=n)
            references = run.references  # the unedited traces, recorded once per phase
            plain = run if graphed else diffusers_plain
            times = interleaved_medians(
                {"plain": lambda: plain.unguided(n), "guided": lambda: run.guided(n)}, cfg.repeats, cfg.device, per=n
            )
            plain_peak, _ = peak_bytes(lambda: plain.unguided(1), cfg.device)
            guided_peak, _ = peak_bytes(lambda: run.guided(1), cfg.device)
            choice = run.sg.guided_step_choice
            record = dict(
                row=name, model=key if not bench.args.dry_run else f"tiny {key}", pipeline=type(pipe).__name__,
                image_size=image_size(pipe), form=form, form_used=choice.form if choice else None, cuda_graph=graphed,
                graph_replayed=graphed and torch.device(cfg.device).type == "cuda",
                plain="sgfast, CUDA graph" if graphed else "diffusers", plain_step_ms=times["plain"] * 1e3,
                guided_step_ms=times["guided"] * 1e3, guided_over_plain=times["guided"] / times["plain"],
                plain_peak_mib=plain_peak / MIB, guided_peak_mib=guided_peak / MIB, peak_ratio=guided_peak / plain_peak,
            )
            # How the choice was first made (its warm-up call measured it; later calls read it from memory).
            first = step_forms(bench).memory.get(choice.key) if form == "auto" and choice is not None else None
            if first is not None and first.seconds:
                record.update(auto_source=first.source, auto_split_ms=first.seconds["split"] * 1e3,
                              auto_batched_ms=first.seconds["batched"] * 1e3)
            if graphed and key == "sd15":
                with_target(record, "step", record["guided_over_plain"], TARGETS["step_graph"])
            records.append(record)
            auto = (f"; auto picked {record['form_used']} (split {record['auto_split_ms']:.1f} ms, batched "
                    f"{record['auto_batched_ms']:.1f} ms)") if "auto_split_ms" in record else ""
            log(f"  {key} {name}: plain {record['plain_step_ms']:.1f} ms, guided {record['guided_step_ms']:.1f} ms "
                f"({record['guided_over_plain']:.2f}x), peak {record['peak_ratio']:.2f}x{auto}")
            del run


WARMUP_STEPS = 2  # a warm-up image's steps: one guided and one plain step (captures both graphs), and a decode


def image_groups(bench, key, with_attend_excite):
    """{group: builder of {row: (image function of a step count, the row it is compared with)}}: eager
    rows against diffusers' plain image, CUDA-graph rows against sgfast's plain image replayed as
    graphs. Each group is built and timed apart, so that no eager row's peak holds any graph."""
    from benchmarks.rows import AttendExciteRunner, Row

    cfg, steps = bench.config, bench.config.steps
    pipe = sd_pipeline(bench, key)
    plain = plain_runner(pipe, steps)
    edited = fast_runner(bench, pipe, steps, step_call=WARMUP_STEPS)

    def eager():
        rows = {
            "diffusers plain": (plain.image, None),
            "sgfast fast: move + keep (edited)": (edited.image, "diffusers plain"),
        }
        if with_attend_excite:
            excite = AttendExciteRunner(pipe, Row("attend_excite"), steps)
            if bench.args.dry_run:
                # Its refinements (up to 20 forward-backward passes at three steps) would make the dry run
                # minutes long; a dry run checks that it runs, guided at every step.
                excite.schedule = lambda n: dict(max_iter_to_alter=n, thresholds={})
            rows[ATTEND_EXCITE] = (excite.image, "diffusers plain")
        return rows

    def graphed():
        plain_graphs = fast_runner(bench, pipe, steps, graphed=True, references=edited.references)
        edited_graphs = fast_runner(bench, pipe, steps, graphed=True, references=edited.references)
        return {
            "sgfast plain, CUDA graph": (lambda n: plain_graphs.unguided(n, output_type="np"), None),
            "sgfast fast: move + keep (edited), CUDA graph": (edited_graphs.image, "sgfast plain, CUDA graph"),
        }

    return {"eager": eager, "CUDA graph": graphed}


def image_rows(bench, records, key, with_attend_excite=True):
    """Whole images with the paper's schedule, decoded: per row, a short warm-up image (graph
    captures, first-call costs, the first decode), then `image_repeats` timed images
    (Attend-and-Excite: `attend_excite_repeats`), interleaved within the group; peak memory of the
    row's first timed image, taken before the group's later rows have run (those built before it
    stay resident), and NVML energy per image."""
    cfg, steps = bench.config, bench.config.steps
    energy = measure.Energy(cfg.device)
    for group_name, build in image_groups(bench, key, with_attend_excite).items():
        bench.tick(10.0)
        group = build()
        samples, peaks, joules = {}, {}, {}

        def timed(name):
            before = energy.read_joules() if energy.available else None
            seconds = measure.timed(lambda: group[name][0](steps), cfg.device)[0]
            samples[name].append(seconds)
            if energy.available:
                joules[name].append(energy.read_joules() - before)

        for name, (fn, _) in group.items():
            bench.tick(10.0)
            with bench.row(f"{key} {name}"):
                fn(min(WARMUP_STEPS, steps))
                samples[name], joules[name] = [], []
                peaks[name] = peak_bytes(lambda: timed(name), cfg.device)[0]
        repeats = cfg.image_repeats if key == "sd15" else cfg.sdxl_image_repeats
        for repeat in range(1, repeats):
            for name in list(samples):
                if name == ATTEND_EXCITE and repeat >= cfg.attend_excite_repeats:
                    continue
                bench.tick(10.0)
                with bench.row(f"{key} {name}"):
                    timed(name)
        samples = {name: times for name, times in samples.items() if times}  # rows that failed are reported
        for name in samples:
            image_record(bench, records, key, group_name, name, group[name][1], samples, peaks, joules, energy)


def image_record(bench, records, key, group, name, against, samples, peaks, joules, energy):
    cfg = bench.config
    seconds = statistics.median(samples[name])
    record = dict(
        row=name, model=key if not bench.args.dry_run else f"tiny {key}", group=group, steps=cfg.steps,
        image_s=seconds, images_per_s=1.0 / seconds, peak_mib=peaks[name] / MIB,
        energy_j_per_image=statistics.median(joules[name]) if joules[name] else None,
        energy_note="NVML" if joules[name] else energy.reason,
    )
    if against in samples:
        record["over_plain"] = seconds / statistics.median(samples[against])
        record["peak_over_plain"] = peaks[name] / peaks[against]
        if key == "sd15" and name != ATTEND_EXCITE:
            with_target(record, "time", record["over_plain"], TARGETS["image_graph" if group == "CUDA graph" else "image_eager"])
            if group == "CUDA graph":
                with_target(record, "peak", record["peak_over_plain"], TARGETS["image_peak"])
    records.append(record)
    ratio = f" ({record['over_plain']:.2f}x, peak {record['peak_over_plain']:.2f}x)" if "over_plain" in record else ""
    log(f"  {key} {name}: {seconds:.2f} s per {cfg.steps}-step image, peak {record['peak_mib']:.0f} MiB{ratio}")


def phase_sd15_guided_steps(bench, records):
    """SD1.5 512px fp16: plain vs guided step, eager and with CUDA graphs, in both forms and "auto"."""
    guided_step_rows(bench, records, "sd15", bench.config.sd_step_variants)


def phase_sd15_image(bench, records):
    """SD1.5 50-step images: plain vs edited, eager and CUDA graph, and diffusers' Attend-and-Excite."""
    image_rows(bench, records, "sd15")


def free_sd15(bench):
    keys = [k for k in bench.state if k == "sd15" or (isinstance(k, tuple) and k[0] == "sd15")]
    for key in keys:
        del bench.state[key]
    if keys:
        release_memory()


def phase_sdxl_step(bench, records):
    """SDXL 1024px fp16 through diffusers' StableDiffusionXLPipeline (two text encoders, pooled
    embeddings, added time ids): plain vs guided step, eager and with CUDA graphs."""
    free_sd15(bench)  # the SDXL models at 1024px need the room
    guided_step_rows(bench, records, "sdxl", bench.config.sdxl_step_variants)


def phase_sdxl_image(bench, records):
    """SDXL 50-step images: plain vs edited, eager and CUDA graph (diffusers' Attend-and-Excite is SD1.x only)."""
    free_sd15(bench)
    image_rows(bench, records, "sdxl", with_attend_excite=False)
    bench.state.clear()


PHASES = [
    # (name, function, slow (left out by --quick), seconds it needs at least to start). The headline
    # phases first; each phase's cold time on one H100/H200 is estimated in docs/gpu-benchmark.md.
    ("sd15_guided_steps", phase_sd15_guided_steps, False, 30),
    ("sd15_image", phase_sd15_image, True, 45),
    ("sd15_compile", phase_sd15_compile, True, 60),
    ("sdxl_step", phase_sdxl_step, True, 30),
    ("sdxl_image", phase_sdxl_image, True, 45),
    ("kernels_correctness", phase_kernels_correctness, False, 0),
    ("kernel_timing", phase_kernel_timing, False, 10),
    ("sd15_step", phase_sd15_step, False, 20),
    ("kernel_variants", phase_kernel_variants, False, 20),
    ("cuda_graphs", phase_cuda_graphs, False, 10),
]


# ---------------------------------------------------------------------------------------------------
# The "## GPU" section of RESULTS.md.
# ---------------------------------------------------------------------------------------------------

SECTION = "## GPU"

# Per phase: (column header, record key, format) of its table.
STEP_FORM_COLUMNS = [
    ("row", "row", "{}"), ("model", "model", "{}"), ("px", "image_size", "{}"), ("plain", "plain", "{}"),
    ("plain ms", "plain_step_ms", "{:.1f}"), ("guided ms", "guided_step_ms", "{:.1f}"),
    ("guided/plain", "guided_over_plain", "{:.2f}"), ("target", "step_target", "<= {}x"), ("met", "step_met", "{}"),
    ("plain peak MiB", "plain_peak_mib", "{:.0f}"), ("guided peak MiB", "guided_peak_mib", "{:.0f}"),
    ("peak ratio", "peak_ratio", "{:.2f}"), ("form used", "form_used", "{}"), ("auto: split ms", "auto_split_ms", "{:.1f}"),
    ("auto: batched ms", "auto_batched_ms", "{:.1f}"), ("graph replayed", "graph_replayed", "{}"),
]
IMAGE_COLUMNS = [
    ("row", "row", "{}"), ("model", "model", "{}"), ("steps", "steps", "{}"), ("s/image", "image_s", "{:.2f}"),
    ("x plain", "over_plain", "{:.2f}"), ("target", "time_target", "<= {}x"), ("met", "time_met", "{}"),
    ("peak MiB", "peak_mib", "{:.0f}"), ("peak x plain", "peak_over_plain", "{:.2f}"), ("peak target", "peak_target", "<= {}x"),
    ("peak met", "peak_met", "{}"), ("J/image", "energy_j_per_image", "{:.0f}"), ("energy", "energy_note", "{}"),
]
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
    "sd15_guided_steps": STEP_FORM_COLUMNS,
    "sdxl_step": STEP_FORM_COLUMNS,
    "sd15_image": IMAGE_COLUMNS,
    "sdxl_image": IMAGE_COLUMNS,
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
    parser.add_argument("--quick", action="store_true", help="leave out the slow phases (50-step images, SDXL, compile)")
    parser.add_argument("--dry-run", action="store_true", help="every code path on the CPU with tiny shapes")
    parser.add_argument("--budget-s", type=float, default=450.0, help="time budget; later phases are skipped (default 450)")
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
