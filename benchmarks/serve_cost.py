"""How far the serving cost model's predictions are from what runs (`python -m benchmarks.serve_cost`).

Builds the engine `python -m sgfast serve` builds (same flags, same calibration on its worker thread),
then submits requests one at a time, so nothing queues and each prediction is the cost model's alone:
plain generations, edits whose reference pass runs (a new seed) or is cached (the same image again),
and photo edits (inversion, regeneration and edit), at several step counts. For each, the prediction
admission made (`timings.predicted_ms`) is compared with the pipeline call's time (`timings.run_ms`):
error = predicted / measured - 1. Prints the distribution of |error| by kind (p50, p90, max) and the
signed median (under- or over-prediction); `--results-md` writes it as RESULTS.md's "## Serving: the
cost model's error" section.

    python -m benchmarks.serve_cost --model default --threads 1
    python -m benchmarks.serve_cost --model tiny --rounds 1
"""

import argparse
import datetime
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "a red circle and a blue square"
HEADING = "## Serving: the cost model's error"


def percentile(values, q):
    values = sorted(values)
    k = (len(values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def requests(rounds, steps_list, seed0=100):
    """(kind, Spec arguments) of the mix, in the order they run."""
    from sgfast.edits import move, resize

    out, seed = [], seed0
    for _ in range(rounds):
        for steps in steps_list:
            seed += 1
            out.append(("plain", dict(prompt=PROMPT, steps=steps, seed=seed)))
            edit = [{"type": "move", "word": "circle", "dx": 0.2}]
            out.append(("edit, reference run", dict(prompt=PROMPT, steps=steps, seed=seed + 1000, edits=[move("circle", dx=0.2)], edit_specs=edit)))
            out.append(("edit, reference cached", dict(prompt=PROMPT, steps=steps, seed=seed + 1000, edits=[resize("square", 1.4)],
                                                       edit_specs=[{"type": "resize", "word": "square", "scale": 1.4}])))
            out.append(("photo edit", dict(prompt=PROMPT, steps=steps, edits=[move("circle", dx=-0.2)], edit_specs=edit)))
    return out


def measure(engine, mix, log=print):
    """Run each request alone; [(kind, steps, predicted_ms, run_ms, total_ms)]."""
    from sgfast.serve.jobs import Spec

    photo = None
    rows = []
    for kind, arguments in mix:
        size = engine.native
        spec = Spec(height=size, width=size, **arguments)
        if kind == "photo edit":
            spec.photo = photo
            spec.strength = engine.sg.settings.photo_strength
        job = engine.submit(spec)
        result = job.future.result(600)
        if kind == "plain":
            photo = result.image  # the next photo edit's photo: an image of the model's own
        t = result.timings
        rows.append((kind, spec.steps, t["predicted_ms"], t["run_ms"], t["total_ms"]))
        log(f"{kind:24s} {spec.steps:3d} steps: predicted {t['predicted_ms']:8.1f} ms, ran {t['run_ms']:8.1f} ms "
            f"({t['predicted_ms'] / t['run_ms'] - 1:+.0%}), answered in {t['total_ms']:.1f} ms")
    return rows


def summary(rows):
    """{kind: (n, p50 |error|, p90 |error|, max |error|, median signed error)}, "all" included."""
    kinds = {}
    for kind, _, predicted, run, _ in rows:
        kinds.setdefault(kind, []).append(predicted / run - 1)
        kinds.setdefault("all", []).append(predicted / run - 1)
    return {
        kind: (len(e), percentile([abs(x) for x in e], 50), percentile([abs(x) for x in e], 90), max(abs(x) for x in e), percentile(e, 50))
        for kind, e in kinds.items()
    }


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def markdown(stats, command, note, load):
    import torch

    date = datetime.date.today().isoformat()
    lines = [
        HEADING,
        "",
        f"{date}, {cpu_name()}, {os.cpu_count()} cores, GPU: none, torch {torch.__version__}, Python {platform.python_version()}. "
        f"Load average during the run: {load}. {note}".strip(),
        f"Command: `{command}`. Each request ran alone (nothing queued), so each prediction is the cost model's own; "
        "error = predicted / measured - 1 of the pipeline call (`timings.predicted_ms` against `timings.run_ms`). "
        "Target: |error| within 25% at p90 on an idle machine.",
        "",
        "| requests | n | p50 abs(error) | p90 abs(error) | max abs(error) | median error |",
        "|---|---|---|---|---|---|",
    ]
    for kind, (n, p50, p90, worst, median) in stats.items():
        lines.append(f"| {kind} | {n} | {p50:.0%} | {p90:.0%} | {worst:.0%} | {median:+.0%} |")
    return "\n".join(lines) + "\n"


def write_section(path, text):
    """Replace this benchmark's own section of RESULTS.md, or put it after the last "## Serving" one."""
    lines = open(path).read().splitlines(keepends=True)
    heads = [i for i, line in enumerate(lines) if line.startswith("## ")]
    own = next((i for i in heads if lines[i].strip() == HEADING), None)
    if own is not None:
        end = next((i for i in heads if i > own), len(lines))
        del lines[own:end]
        at = own
    else:
        serving = [i for i in heads if lines[i].startswith("## Serving")]
        at = next((i for i in heads if serving and i > serving[-1]), len(lines))
    lines[at:at] = [text, "\n"]
    with open(path, "w") as f:
        f.write("".join(lines))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="times through the mix (new seeds each time)")
    # From 8: the built-in model's resize guides from step 5, so a 4-step resize has no guided step
    # (the server refuses it with 422 before it runs).
    parser.add_argument("--steps", default="8,12,16,20", help="step counts of the mix")
    parser.add_argument("--json", default=os.path.join("outputs", "bench", "serve_cost.json"))
    parser.add_argument("--results-md", default="", help="RESULTS.md to add the table to (default: leave it alone)")
    parser.add_argument("--note", default="", help="a sentence on the conditions of the run")
    parser.add_argument("--skew", type=float, default=1.0,
                        help="scale the calibrated times of --skew-kinds by this (a calibration made under another load) before the run")
    parser.add_argument("--skew-kinds", default="plain", help="comma-separated: plain, guided, overhead")
    from sgfast.serve.cli import add_arguments, build_engine

    add_arguments(parser)
    args = parser.parse_args(argv)
    args.min_steps = 1  # predictions are compared as planned: nothing degraded
    engine = build_engine(args)
    engine.start()
    for (kind, _), by_batch in engine.cost.table.items():
        if kind in args.skew_kinds.split(","):
            for batch in by_batch:
                by_batch[batch] *= args.skew
    try:
        load_before = os.getloadavg()[0]
        steps_list = [int(s) for s in args.steps.split(",")]
        mix = requests(args.rounds, steps_list)
        if args.skew == 1.0:  # warm-up (other seeds): first calls are slow; a skewed model is measured from its start
            measure(engine, requests(1, [min(steps_list)], seed0=10), log=lambda msg: None)
        rows = measure(engine, mix)
        load_after = os.getloadavg()[0]
    finally:
        engine.shutdown(timeout=60)
    stats = summary(rows)
    for kind, (n, p50, p90, worst, median) in stats.items():
        print(f"{kind:24s} n={n:3d}  |error| p50 {p50:.0%}  p90 {p90:.0%}  max {worst:.0%}  median {median:+.0%}")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"rows": rows, "stats": stats, "cost_ms": engine.cost.snapshot()}, f, indent=1, default=str)
    if args.results_md:
        command = "python -m benchmarks.serve_cost " + " ".join(argv if argv is not None else sys.argv[1:])
        write_section(args.results_md, markdown(stats, command.strip(), args.note, f"{load_before:.1f} to {load_after:.1f} on its {os.cpu_count()} cores"))


if __name__ == "__main__":
    start = time.time()
    main()
    print(f"done in {time.time() - start:.0f} s")
