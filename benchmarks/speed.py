"""What a guided image costs with sgfast and with the alternatives, side by side, in one run.

    python -m benchmarks                      # CPU: the tiny pipeline (+ the shipped default model)
    python -m benchmarks --quick              # a faster smoke run
    python -m benchmarks --arch sd15          # GPU: SD1.5 architecture, random weights, fp16, 512px
    python -m benchmarks --arch sdxl          # GPU: SDXL UNet, random weights, fp16, 1024px

Each row runs in a fresh subprocess (peak memory per row: CUDA max_memory_allocated, or the
process's peak RSS on the CPU). Prints the tables and writes them as JSON and a PNG chart.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.models import REPO, default_arch_dir, default_model_available

MIB = 2**20


# ---------------------------------------------------------------- the worker (one row, one process)


class Counts:
    """UNet calls (with and without gradients) and backward passes (`torch.autograd.grad` calls)
    while active, plus Attend-and-Excite's refinements when it is given."""

    def __init__(self, unet, ae=None):
        import torch

        self.torch, self.unet, self.ae = torch, unet, ae
        self.forward = self.forward_grad = self.backward = 0
        self.refinements = self.refinement_forwards = 0
        self._refining = False

    def _pre_hook(self, module, args, kwargs):
        self.forward += 1
        if self.torch.is_grad_enabled():
            self.forward_grad += 1
            if self._refining:
                self.refinement_forwards += 1

    def __enter__(self):
        torch = self.torch
        self._hook = self.unet.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        self._grad = torch.autograd.grad

        def grad(*args, **kwargs):
            self.backward += 1
            return self._grad(*args, **kwargs)

        torch.autograd.grad = grad
        if self.ae is not None:
            refine = self.ae._perform_iterative_refinement_step

            def counted_refine(*args, **kwargs):
                self.refinements += 1
                self._refining = True
                try:
                    return refine(*args, **kwargs)
                finally:
                    self._refining = False

            self.ae._perform_iterative_refinement_step = counted_refine
        return self

    def __exit__(self, *exc):
        self._hook.remove()
        self.torch.autograd.grad = self._grad
        if self.ae is not None:
            del self.ae._perform_iterative_refinement_step
        return False

    def to_dict(self):
        out = dict(unet_forward=self.forward, unet_forward_grad=self.forward_grad, backward=self.backward)
        if self.ae is not None:
            # Each refinement runs iterations (forward + backward) and one last forward.
            out.update(refinement_steps=self.refinements, refinement_iterations=self.refinement_forwards - self.refinements)
        return out


def _setup(spec):
    import torch

    from benchmarks.flops import quiet
    from benchmarks.models import build_pipeline

    quiet()
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    dtype = getattr(torch, spec["dtype"])
    return build_pipeline(spec["model"], spec.get("resolution"), spec["device"], dtype, spec.get("arch_dir"))


class Memory:
    """Peak memory of a phase: CUDA max_memory_allocated over what was allocated before it, or the
    process's peak RSS over its RSS before it (Linux resets the peak per phase)."""

    def __init__(self, device):
        import torch

        self.torch, self.cuda = torch, torch.device(device).type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
            self.before = self.torch.cuda.memory_allocated()
        else:
            from benchmarks.measure import reset_peak_rss

            self.before = reset_peak_rss()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.torch.cuda.synchronize()
            self.peak = self.torch.cuda.max_memory_allocated()
        else:
            from benchmarks.measure import peak_rss_bytes

            self.peak = peak_rss_bytes()
        return False

    def to_dict(self):
        kind = "CUDA max_memory_allocated" if self.cuda else "peak RSS"
        return dict(peak_bytes=self.peak, peak_over_resident_bytes=self.peak - self.before, memory_kind=kind)


def run_row(spec):
    """Measure one row; `spec` is the dict the orchestrator passes. Returns a JSON-able dict.

    Every process also times the wrapped diffusers pipeline's plain steps and images, interleaved
    with the row's own, so that each ratio comes from one process on one machine state."""
    import torch

    from benchmarks import measure
    from benchmarks.flops import floor_step
    from benchmarks.models import PROMPT
    from benchmarks.rows import PlainRunner, Row, runner

    device = spec["device"]
    row = Row(**spec["row"])
    steps, batch, repeats = spec["steps"], spec["batch"], spec["repeats"]
    n = spec.get("step_call") or steps  # steps per timed call for per-step costs
    cuda = torch.device(device).type == "cuda"
    result = dict(row=row.to_dict(), name=row.name, key=row.key, step_call=n)

    def timed(fn):
        return measure.timed(fn, device)[0]

    start = time.perf_counter()
    pipe = _setup(spec)
    run = runner(pipe, row, steps)
    if row.kind == "plain":
        plain = run
    elif row.compile:
        # compile=True compiles the wrapped pipeline's UNet forward in place: the unit stays the eager
        # diffusers pipeline, so it gets its own copy (same seed, same weights).
        plain = PlainRunner(_setup(spec), Row("plain"), steps)
    else:
        plain = PlainRunner(pipe, Row("plain"), steps)
    result["setup_s"] = time.perf_counter() - start
    result["image_size"] = pipe.unet.config.sample_size * pipe.vae_scale_factor

    # Warm-up (compiles a compiled row), then per-step costs: n-step calls, interleaved, divided by n.
    start = time.perf_counter()
    for _ in range(spec["warmup"]):
        plain.unguided(n)
        if run is not plain:
            run.unguided(n)
        if run.guided_available:
            run.guided(n)
    result["warmup_s"] = time.perf_counter() - start
    times = {"plain": [], "unguided": [], "guided": []}
    for _ in range(repeats):
        times["plain"].append(timed(lambda: plain.unguided(n)) / n)
        if run is not plain:
            times["unguided"].append(timed(lambda: run.unguided(n)) / n)
        if run.guided_available:
            times["guided"].append(timed(lambda: run.guided(n)) / n)
    for name, samples in times.items():
        if samples:
            result[f"{name}_step_s"] = measure.summary(samples)
    plain_median = result["plain_step_s"]["median"]
    if "unguided_step_s" in result:
        result["unguided_over_plain"] = result["unguided_step_s"]["median"] / plain_median
    if "guided_step_s" in result:
        result["guided_over_plain"] = result["guided_step_s"]["median"] / plain_median

    # Peak memory of a batch-1 call of n steps, every one guided where the row guides.
    with Memory(device) as memory:
        (run.guided if run.guided_available else run.unguided)(n)
    result.update(memory.to_dict())

    if not spec.get("steps_only"):
        # One image with the method's own schedule, counted: UNet passes, backward passes, guided
        # steps, refinements, and FLOPs (this is also the images' warm-up).
        ae = getattr(run, "ae", None)
        with measure.eager(), measure.math_attention(device), Counts(pipe.unet, ae) as counts, measure.CountFlops() as flops:
            out = run.image(steps)
        result["image_flops"] = flops.total
        result["counts"] = counts.to_dict()
        if getattr(out, "energies", None) is not None:
            result["counts"]["guided_steps"] = len(out.energies)
        elif ae is not None:
            schedule = run.schedule(steps)
            result["counts"]["guided_steps"] = min(schedule["max_iter_to_alter"], steps)
            result["counts"]["schedule"] = {k: str(v) for k, v in schedule.items()}

        # Whole decoded images, batch 1 (with NVML energy), the plain image interleaved.
        energy = measure.Energy(device)
        run.image(steps)
        if run is not plain:
            plain.image(steps)
        image_times, plain_images, joules = [], [], []
        for _ in range(spec["image_repeats"]):
            if run is not plain:
                plain_images.append(timed(lambda: plain.image(steps)))
            before = energy.read_joules() if energy.available else None
            image_times.append(timed(lambda: run.image(steps)))
            if energy.available:
                joules.append(energy.read_joules() - before)
        result["image_s"] = measure.summary(image_times)
        result["plain_image_s"] = measure.summary(plain_images or image_times)
        result["image_over_plain"] = result["image_s"]["median"] / result["plain_image_s"]["median"]
        result["images_per_s"] = 1.0 / result["image_s"]["median"]
        result["energy_j_per_image"] = (sum(joules) / len(joules)) if joules else None
        result["energy_note"] = "NVML" if joules else energy.reason
        if batch > 1:
            if cuda or row.compile:  # a new batch size recompiles a compiled UNet
                run.image(steps, batch)
            batch_times = [timed(lambda: run.image(steps, batch)) for _ in range(spec["batch_repeats"])]
            result["batch_image_s"] = measure.summary(batch_times)
            result["images_per_s_batch"] = batch / result["batch_image_s"]["median"]

    # Counted work per step, from 1- and 2-step calls (FLOPs do not depend on timing):
    # unguided = F(2 unguided) - F(1 unguided); guided = F(1 guided) - F(1 unguided) + unguided.
    with measure.eager(), measure.math_attention(device):

        def count(fn):
            with measure.CountFlops() as counter:
                fn()
            return counter.total

        f_u1 = count(lambda: run.unguided(1))
        result["unguided_step_flops"] = count(lambda: run.unguided(2)) - f_u1
        if run.guided_available:
            result["guided_step_flops"] = count(lambda: run.guided(1)) - f_u1 + result["unguided_step_flops"]
            if run.layers():
                cond, uncond = pipe.encode_prompt(PROMPT, device, 1, True)
                size, channels = pipe.unet.config.sample_size, pipe.unet.config.in_channels
                latents = torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(0))
                latents = latents.to(device, cond.dtype)
                pipe.scheduler.set_timesteps(steps, device=device)
                timestep = pipe.scheduler.timesteps[1]
                result["floor_flops"] = count(lambda: floor_step(pipe.unet, run.layers(), latents, timestep, cond, uncond))
                result["x_floor"] = result["guided_step_flops"] / result["floor_flops"]
    if run.guided_available:
        with measure.eager(), measure.SavedForBackward(pipe.unet, pipe.vae, pipe.text_encoder) as keeper:
            run.guided(1)
        result["saved_bytes"] = keeper.nbytes
        with measure.eager():
            result["attention_bytes"] = run.attention_bytes()
    result["layers"] = run.layers()
    if cuda:
        result["note"] = "FLOPs: custom Triton ops are not seen by the counter"
    return result


# ---------------------------------------------------------------- the orchestrator


def machine_info(device):
    import diffusers
    import torch
    import transformers

    info = dict(
        date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        python=platform.python_version(),
        torch=torch.__version__,
        diffusers=diffusers.__version__,
        transformers=transformers.__version__,
        cpu=_cpu_model(),
        cores=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        device=device,
    )
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    return info


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_in_subprocess(spec, timeout=1800):
    """Run one row in a fresh interpreter; returns its result dict (or an error record)."""
    with tempfile.TemporaryDirectory() as folder:
        spec_path, out_path = Path(folder) / "spec.json", Path(folder) / "out.json"
        spec_path.write_text(json.dumps(spec))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        command = [sys.executable, "-m", "benchmarks.speed", "--worker", str(spec_path), str(out_path)]
        start = time.perf_counter()
        try:
            proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return dict(error=f"timed out after {timeout} s", name=spec.get("name"))
        if proc.returncode != 0 or not out_path.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
            return dict(error="\n".join(tail), name=spec.get("name"))
        result = json.loads(out_path.read_text())
        result["wall_s"] = time.perf_counter() - start
        return result


def fmt_ms(summary):
    if not summary:
        return "n/a"
    spread = f"{summary['q1'] * 1e3:.1f}-{summary['q3'] * 1e3:.1f}" if summary["n"] >= 4 else f"{summary['min'] * 1e3:.1f}-{summary['max'] * 1e3:.1f}"
    return f"{summary['median'] * 1e3:.1f} ({spread})"


def fmt_s(summary):
    if not summary:
        return "n/a"
    return f"{summary['median']:.3f} ({summary['min']:.3f}-{summary['max']:.3f})"


def fmt_bytes(n, unit=MIB, digits=1):
    return "n/a" if n is None else f"{n / unit:.{digits}f}"


def _failed(r):
    return f"| {r.get('name', '?')} | failed: {r['error'].strip().splitlines()[-1][:150]} |"


def time_table(results, batch):
    """Time per step and per image. Ratios are within each row's own process (the diffusers plain
    step and image are timed interleaved with the row's)."""
    lines = [
        (
            "| row | ms / plain step | ms / unguided step | ms / guided step | guided / plain | s / image "
            f"| image / plain image | images/s (b=1) | images/s (b={batch}) | J / image |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(_failed(r))
            continue
        ratio = f"{r['guided_over_plain']:.2f}" if "guided_over_plain" in r else "n/a"
        x_image = f"{r['image_over_plain']:.2f}" if "image_over_plain" in r else "n/a"
        ips = f"{r['images_per_s']:.2f}" if "images_per_s" in r else "n/a"
        ips_b = f"{r['images_per_s_batch']:.2f}" if "images_per_s_batch" in r else "n/a"
        joules = f"{r['energy_j_per_image']:.1f}" if r.get("energy_j_per_image") is not None else "n/a"
        unguided = fmt_ms(r["unguided_step_s"]) if "unguided_step_s" in r else "= plain"
        lines.append(
            f"| {r['name']} | {fmt_ms(r.get('plain_step_s'))} | {unguided} | {fmt_ms(r.get('guided_step_s'))} | {ratio} | "
            f"{fmt_s(r.get('image_s'))} | {x_image} | {ips} | {ips_b} | {joules} |"
        )
    return "\n".join(lines)


def cost_table(results, cuda):
    memory = "peak CUDA memory over resident, n-step call (MiB)" if cuda else "peak RSS over resident, n-step call (MiB)"
    lines = [
        (
            "| row | GFLOP / unguided step | GFLOP / guided step | x floor (same layers) | GFLOP / image "
            f"| {memory} | saved for backward (MiB) | attention data kept / step (KiB) | per image: UNet fwd / with grad / backward |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(_failed(r))
            continue
        c = r.get("counts", {})
        passes = f"{c.get('unet_forward', '?')} / {c.get('unet_forward_grad', '?')} / {c.get('backward', '?')}"
        if "refinement_steps" in c:
            passes += (
                f" ({c.get('guided_steps')} guided steps; {c['refinement_steps']} refinements of "
                f"{c['refinement_iterations']} iterations in all)"
            )
        elif "guided_steps" in c:
            passes += f" ({c['guided_steps']} guided steps)"
        guided = f"{r['guided_step_flops'] / 1e9:.3f}" if "guided_step_flops" in r else "n/a"
        x_floor = f"{r['x_floor']:.3f}" if "x_floor" in r else "n/a"
        image = f"{r['image_flops'] / 1e9:.2f}" if "image_flops" in r else "n/a"
        saved = fmt_bytes(r.get("saved_bytes"), MIB, 2) if "saved_bytes" in r else "n/a"
        attention = fmt_bytes(r.get("attention_bytes"), 1024, 1) if "attention_bytes" in r else "0"
        lines.append(
            f"| {r['name']} | {r['unguided_step_flops'] / 1e9:.3f} | {guided} | {x_floor} | {image} | "
            f"{fmt_bytes(r.get('peak_over_resident_bytes'))} | {saved} | {attention} | {passes} |"
        )
    return "\n".join(lines)


def scaling_table(results, cuda=False):
    memory = "peak CUDA memory over resident (MiB)" if cuda else "peak RSS over resident (MiB)"
    lines = [
        f"| row | image px | batch | ms / plain step | ms / guided step | guided / plain | saved for backward (MiB) | {memory} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(_failed(r))
            continue
        lines.append(
            f"| {r['name']} | {r['image_size']} | {r['batch_size']} | {fmt_ms(r['plain_step_s'])} | {fmt_ms(r['guided_step_s'])} | "
            f"{r['guided_over_plain']:.2f} | {fmt_bytes(r.get('saved_bytes'), MIB, 2)} | {fmt_bytes(r.get('peak_over_resident_bytes'))} |"
        )
    return "\n".join(lines)


def run_scaling_row(spec):
    """Per-step costs at `spec["resolution"]` and batch `spec["batch_size"]`: n-step calls of that
    batch, every step guided or none; times per step of the whole batch."""
    from benchmarks import measure
    from benchmarks.rows import PlainRunner, Row, runner

    device, row = spec["device"], Row(**spec["row"])
    steps, batch, n = spec["steps"], spec["batch_size"], spec.get("step_call") or spec["steps"]
    pipe = _setup(spec)
    run = runner(pipe, row, steps)
    plain = PlainRunner(pipe, Row("plain"), steps)
    plain.unguided(n, batch)
    run.guided(n, batch)
    plain_times, guided_times = [], []
    for _ in range(spec["repeats"]):
        plain_times.append(measure.timed(lambda: plain.unguided(n, batch), device)[0] / n)
        guided_times.append(measure.timed(lambda: run.guided(n, batch), device)[0] / n)
    with Memory(device) as memory:
        run.guided(n, batch)
    with measure.eager(), measure.SavedForBackward(pipe.unet, pipe.vae, pipe.text_encoder) as keeper:
        run.guided(1, batch)
    plain_s, guided_s = measure.summary(plain_times), measure.summary(guided_times)
    return dict(
        name=row.name, key=row.key, image_size=pipe.unet.config.sample_size * pipe.vae_scale_factor,
        batch_size=batch, plain_step_s=plain_s, guided_step_s=guided_s,
        guided_over_plain=guided_s["median"] / plain_s["median"], saved_bytes=keeper.nbytes, **memory.to_dict(),
    )


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=None, help="comma-separated: tiny, default (CPU default: both, where present)")
    parser.add_argument("--arch", choices=("sd15", "sdxl"), default=None, help="public architecture with random weights (GPU)")
    parser.add_argument("--arch-dir", default=None, help="folder of the architecture configs (default: ../shared/architectures)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 50 on GPU, 20 on CPU, 8 with --quick)")
    parser.add_argument("--step-call", type=int, default=None, help="steps per timed call for per-step costs (default: 20 GPU / 8 CPU)")
    parser.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: the model's)")
    parser.add_argument("--batch", type=int, default=None, help="the larger batch for images/s (default 8 on GPU, 4 for SDXL and on CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per step measure (default 10 GPU / 5 CPU)")
    parser.add_argument("--image-repeats", type=int, default=None, help="timed repeats per image measure (default 5 GPU / 3 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up calls before timing (default 2 GPU / 1 CPU)")
    parser.add_argument("--rows", default=None, help="comma-separated row keys to run (default: all available)")
    parser.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=None,
        help="include sgfast's compiled rows (default: on a GPU; on the CPU a cold compile takes minutes per row)",
    )
    parser.add_argument("--no-scaling", action="store_true", help="leave out the resolution / batch scaling table")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch CPU threads in each row's process (default 1 on the CPU: on a shared machine OpenMP's spinning "
        "threads slow down by 10x under oversubscription; the torch default on a GPU)",
    )
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats, no compiled rows, small scaling table")
    parser.add_argument("--out", default=str(REPO / "outputs" / "bench"), help="folder for speed.json and speed.png")
    parser.add_argument("--worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def settings(args, cuda):
    """Step counts and repeats: the paper's 50 steps on a GPU; fewer on the CPU, where the whole run
    has to fit in a few minutes on two shared cores."""
    quick = args.quick
    steps = args.steps or (8 if quick else 50 if cuda else 20)
    return dict(
        steps=steps,
        step_call=args.step_call or min(steps, 4 if quick else 20 if cuda else 8),
        batch=args.batch or (2 if quick else 4 if args.arch == "sdxl" or not cuda else 8),
        repeats=args.repeats or (2 if quick else 10 if cuda else 5),
        image_repeats=args.image_repeats or (1 if quick else 5 if cuda else 3),
        batch_repeats=args.image_repeats or (1 if quick else 3 if cuda else 1),
        warmup=args.warmup if args.warmup is not None else (1 if quick or not cuda else 2),
        dtype="float16" if cuda else "float32",
        threads=args.threads or (None if cuda else 1),
    )


def scaling_configs(resolution, quick):
    """(image side, batch) pairs: half, the model's and double resolution at batch 1; batch 2 and 4."""
    if quick:
        return [(resolution // 2, 1), (resolution, 2)]
    return [(resolution // 2, 1), (resolution, 1), (resolution * 2, 1), (resolution, 2), (resolution, 4)]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(Path(args.worker[0]).read_text())
        result = run_scaling_row(spec) if spec.get("scaling") else run_row(spec)
        Path(args.worker[1]).write_text(json.dumps(result))
        return result

    import torch

    from benchmarks.chart import bar_chart
    from benchmarks.flops import quiet
    from benchmarks.models import default_resolution
    from benchmarks.rows import all_rows, sgfast_support

    quiet()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    config = settings(args, cuda)
    notes = []
    if args.arch:
        models = [args.arch]
        if not cuda:
            notes.append(f"{args.arch} on the CPU: expect a long run")
    elif args.models:
        models = args.models.split(",")
    else:
        models = ["tiny", "default"]
    if "default" in models:
        available, reason = default_model_available()
        if not available:
            models.remove("default")
            notes.append(f"default model left out: {reason}")
    support = sgfast_support()
    if not support["fast"]:
        notes.append("sgfast fast mode: not available in this checkout (from_pipe(mode='fast') refused)")
    if not support["compile"]:
        notes.append("sgfast compiled rows: not available in this checkout (from_pipe(mode='fast', compile=True) refused)")
    compile_rows = (cuda if args.compile is None else args.compile) and not args.quick
    if support["compile"] and not compile_rows:
        notes.append("sgfast compiled rows: left out (on the CPU by default, or --quick / --no-compile); add --compile")
    rows = all_rows(support, compile_rows=compile_rows)
    if args.rows:
        wanted = args.rows.split(",")
        rows = [r for r in rows if r.key in wanted or r.kind in wanted]

    info = machine_info(device)
    info.update(config, command=" ".join(["python -m benchmarks"] + argv))
    if config["threads"]:
        info["torch_threads"] = config["threads"]
    info["schedule"] = (
        "sgfast: the paper's (every step for the first 3/16, then every other, none in the last 1/32), the unedited "
        "trace reused; Attend-and-Excite: its own (the first half of the steps, refinements at 0, 1/5 and 2/5 of them)"
    )
    report = dict(info=info, notes=notes, models={}, scaling=[])
    print(_header(info, notes), flush=True)
    base = dict(config, device=device, arch_dir=str(args.arch_dir or default_arch_dir()))
    for model in models:
        results = []
        for row in rows:
            spec = dict(base, model=model, row=row.to_dict(), name=row.name, resolution=args.resolution)
            result = run_in_subprocess(spec)
            result.setdefault("name", row.name)
            results.append(result)
            status = "failed" if "error" in result else f"{result.get('wall_s', 0):.0f} s"
            print(f"  [{model}] {row.name}: {status}", file=sys.stderr, flush=True)
        size = next((r["image_size"] for r in results if "image_size" in r), None)
        report["models"][model] = dict(image_size=size, rows=results)
        print(f"\n### {model}: {size}px, {config['steps']} steps, {config['dtype']}\n")
        print(time_table(results, config["batch"]) + "\n")
        print(cost_table(results, cuda) + "\n", flush=True)

    scaled = models[0] if models and models[0] != "default" else None
    if not args.no_scaling and scaled:
        resolution = args.resolution or default_resolution(scaled)
        # The full move in the fastest eager mode available.
        candidates = [r for r in rows if r.kind == "sgfast" and r.edit == "move_keep" and not r.compile]
        scaling_rows = [r for r in candidates if r.mode == "fast"] or candidates[:1]
        for row in scaling_rows:
            for side, size in scaling_configs(resolution, args.quick):
                spec = dict(base, model=scaled, row=row.to_dict(), name=row.name, scaling=True,
                            resolution=side, batch_size=size, repeats=max(2, config["repeats"] - 2))
                result = run_in_subprocess(spec)
                result.setdefault("name", row.name)
                report["scaling"].append(result)
                print(f"  [scaling] {row.name} {side}px b={size}", file=sys.stderr, flush=True)
        print(f"\n### scaling: {scaled}, guided step against resolution and batch\n")
        print(scaling_table(report["scaling"], cuda) + "\n")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps(report, indent=1))
    bar_chart(report, out / "speed.png")
    print(f"wrote {out / 'speed.json'} and {out / 'speed.png'}")
    return report


def _header(info, notes):
    lines = [
        f"{info['date']}  {info['cpu']} ({info['cores']} cores, torch threads {info['torch_threads']})"
        + (f"  GPU {info['gpu']}, CUDA {info['cuda']}" if "gpu" in info else ""),
        f"python {info['python']}, torch {info['torch']}, diffusers {info['diffusers']}, transformers {info['transformers']}"
        + (f", triton {info['triton']}" if "triton" in info else ""),
        f"{info['command']}",
        (
            f"{info['steps']} steps per image; per-step costs from calls of {info['step_call']} steps; larger batch {info['batch']}; "
            f"{info['warmup']} warm-up, {info['repeats']} step repeats, {info['image_repeats']} image repeats "
            f"({info['batch_repeats']} at batch {info['batch']}); times: median (IQR with >= 4 samples, else min-max)"
        ),
    ]
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
