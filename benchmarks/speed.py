"""What a guided image costs with sgfast and with the alternatives, side by side, in one run.

    python -m benchmarks                      # CPU: the tiny pipeline (+ the shipped default model)
    python -m benchmarks --quick              # a faster smoke run
    python -m benchmarks --arch sd15          # GPU: SD1.5 architecture, random weights, fp16, 512px
    python -m benchmarks --arch sdxl          # GPU: SDXL UNet, random weights, fp16, 1024px

The harness: it picks the rows and settings, runs each row in a fresh subprocess
(`benchmarks.speed_row`; peak memory per row: CUDA max_memory_allocated, or the process's peak RSS on
the CPU), prints the tables (`benchmarks.speed_tables`) and writes them as JSON and a PNG chart.
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
from benchmarks.speed_tables import cost_table, header, scaling_table, time_table


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
        command = [sys.executable, "-m", "benchmarks.speed_row", str(spec_path), str(out_path)]
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
    print(header(info, notes), flush=True)
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


if __name__ == "__main__":
    main()
