"""Load test of the HTTP server (`make bench-serve`): both schedulers on the same Poisson arrivals.

Starts `python -m sgfast serve` on a free loopback port for each model (the tiny model, and the
built-in model when it is installed) and each scheduler (`--scheduler request`: same-shape requests
run as one pipeline call; `--scheduler iteration`: batched per denoising step), then sends the same
open-loop Poisson trace at several offered loads (requests per second, relative to the time one
request takes alone): the same bodies, the same arrival times. A mix of plain generations and edits of
a small set of images (the trace cache is exercised) at a few step counts, half of them with a budget.
Reports, per load, p50/p95/p99 latency, throughput, the deadline-miss rate and sent vs answered
(nothing may be lost); the throughput each scheduler sustains with p95 under an SLO; writes JSON, a PNG
of latency against offered load, and the "## Serving" section of benchmarks/RESULTS.md.

    python -m benchmarks.serve_load                        # tiny (+ default if present), both schedulers
    python -m benchmarks.serve_load --models tiny --loads 0.5,1,2 --requests 20
"""

import argparse
import datetime
import json
import os
import platform
import random
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Captions both the tiny model and the built-in one (coloured shapes) know word by word.
PROMPTS = ["a red circle and a blue square", "a green triangle and a yellow circle", "a purple square", "a blue triangle and a red square"]
OBJECTS = {p: [w for w in p.split() if w in ("circle", "square", "triangle")] for p in PROMPTS}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values, q):
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def start_server(model, scheduler, port, extra):
    command = [
        sys.executable, "-m", "sgfast", "serve", "--model", model, "--host", "127.0.0.1", "--port", str(port),
        "--scheduler", scheduler, "--log-level", "warning", *extra,
    ]
    log = open(os.path.join(ROOT, "outputs", "bench", f"serve_{os.path.basename(model)}_{scheduler}.log"), "w")
    process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    with httpx.Client(timeout=5) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}; see {log.name}")
            try:
                if client.get(url + "/healthz").status_code == 200:
                    return process, url, command
            except httpx.TransportError:
                pass
            time.sleep(0.25)
    process.send_signal(signal.SIGINT)
    raise RuntimeError("the server did not come up in 600 s")


def stop_server(process):
    process.send_signal(signal.SIGTERM)  # graceful: answers every request within the drain deadline
    try:
        return process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def make_requests(count, steps, unit_ms, seed):
    """A reproducible mix: 40% plain, 60% edits, at `steps` -2, +0 or +2 steps; every other request
    has a budget of 8x the predicted time of one plain request alone (`unit_ms`)."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        prompt = rng.choice(PROMPTS)
        body = {"prompt": prompt, "seed": rng.randrange(3), "steps": steps + rng.choice([-2, 0, 2])}
        if rng.random() < 0.6:
            word = rng.choice(OBJECTS[prompt])
            kind = rng.choice(["move", "place", "resize"])
            edit = {"type": kind, "word": word}
            if kind == "move":
                edit["dx"] = rng.choice([-0.25, 0.25])
            elif kind == "place":
                edit.update(x=round(rng.uniform(0.2, 0.8), 2), y=round(rng.uniform(0.2, 0.8), 2))
            else:
                edit["scale"] = rng.choice([0.5, 1.5, 2.0])
            body["edits"] = [edit]
        if i % 2:
            body["budget_ms"] = round(8 * unit_ms)
        out.append(body)
    return out


def arrivals(count, seed):
    """Poisson arrival times at rate 1 (seconds); divide by a rate to get that load's trace."""
    rng = random.Random(seed + 1)
    times, t = [], 0.0
    for _ in range(count):
        t += rng.expovariate(1.0)
        times.append(t)
    return times


def send(client, url, index, body):
    """One request; returns its record (status, latency, what the answer said)."""
    sent = time.monotonic()
    record = {"index": index, "budget_ms": body.get("budget_ms"), "edit": bool(body.get("edits"))}
    try:
        r = client.post(url + "/v1/images", json=body)
        record["status"] = r.status_code
        data = r.json()
        if r.status_code == 200:
            record.update(degraded=data["degraded"], missed=data["deadline_missed"], cache_hit=data["cache_hit"], batch=data["batch_size"])
        else:
            detail = data.get("detail") or {}
            record["expired"] = detail.get("type") == "expired"
            record["message"] = str(detail.get("message", ""))[:160]
    except (httpx.HTTPError, ValueError) as e:
        record["status"] = None
        record["error"] = f"{type(e).__name__}: {e}"
    record["latency_ms"] = (time.monotonic() - sent) * 1000
    record["done"] = time.monotonic()
    return record


def drive(url, requests, times, rate):
    """Open loop: request k is sent at times[k] / rate seconds, whatever the answers before it."""
    results, lock = [], threading.Lock()
    start = time.monotonic()
    limits = httpx.Limits(max_connections=len(requests) + 4, max_keepalive_connections=len(requests) + 4)
    with httpx.Client(timeout=600, limits=limits) as client:
        def one(index, body, at):
            time.sleep(max(0.0, start + at / rate - time.monotonic()))
            record = send(client, url, index, body)
            with lock:
                results.append(record)

        threads = [threading.Thread(target=one, args=(i, b, t)) for i, (b, t) in enumerate(zip(requests, times))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    end = max([r["done"] for r in results], default=start)
    return results, end - start


def summarize(results, sent, elapsed):
    ok = [r for r in results if r["status"] == 200]
    reasons = {}
    for r in results:
        if r["status"] != 200:
            key = f'{r["status"]}: ' + (r.get("message") or r.get("error") or "")[:60]
            reasons[key] = reasons.get(key, 0) + 1
    latencies = [r["latency_ms"] for r in ok]
    budgeted = [r for r in results if r["budget_ms"] is not None and r["status"] in (200, 503)]
    missed = [r for r in budgeted if r.get("missed") or r.get("expired")]
    return {
        "sent": sent,
        "answered": sum(r["status"] is not None for r in results),
        "lost": sent - sum(r["status"] is not None for r in results),
        "ok": len(ok),
        "rejected_503": sum(r["status"] == 503 and not r.get("expired") for r in results),
        "expired_in_queue": sum(bool(r.get("expired")) for r in results),
        "rejected_422": sum(r["status"] == 422 for r in results),
        "errors": sum(r["status"] not in (200, 503, 422) for r in results),
        "degraded": sum(bool(r.get("degraded")) for r in ok),
        "cache_hits": sum(bool(r.get("cache_hit")) for r in ok),
        "mean_batch": round(sum(r["batch"] for r in ok) / len(ok), 2) if ok else None,
        "p50_ms": percentile(latencies, 50),
        "p95_ms": percentile(latencies, 95),
        "p99_ms": percentile(latencies, 99),
        "throughput_rps": len(ok) / elapsed if elapsed > 0 else None,
        "deadline_miss_rate": len(missed) / len(budgeted) if budgeted else None,
        "elapsed_s": elapsed,
        "not_ok": reasons,
    }


def scrape(url):
    """A few figures from /metrics."""
    text = httpx.get(url + "/metrics", timeout=10).text
    wanted = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        if name.startswith(("sgfast_trace_cache_hits_total", "sgfast_deadline_misses_total", "sgfast_steps_per_second", "sgfast_steps_total")):
            wanted[name] = float(value)
    return wanted


def machine():
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return f"{cpu}, {os.cpu_count()} cores, GPU: {gpu}, torch {torch.__version__}, Python {platform.python_version()}"


def fmt(value, digits=0):
    if value is None:
        return "-"
    return f"{value:.{digits}f}"


def table(rows):
    head = ["model", "scheduler", "offered req/s", "sent", "answered", "lost", "200", "503", "expired", "422", "errors", "degraded",
            "cache hits", "mean batch", "p50 ms", "p95 ms", "p99 ms", "req/s", "miss rate"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        s = r["summary"]
        miss = s["deadline_miss_rate"]
        cells = [
            r["model"], r["scheduler"], fmt(r["rate"], 2), s["sent"], s["answered"], s["lost"], s["ok"], s["rejected_503"],
            s["expired_in_queue"], s["rejected_422"], s["errors"], s["degraded"], s["cache_hits"], fmt(s["mean_batch"], 2),
            fmt(s["p50_ms"]), fmt(s["p95_ms"]), fmt(s["p99_ms"]), fmt(s["throughput_rps"], 2),
            "-" if miss is None else f"{100 * miss:.1f}%",
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def _runs(rows, model, scheduler):
    return [r["summary"] for r in rows if r["model"] == model and r["scheduler"] == scheduler
            and r["summary"]["p95_ms"] is not None and r["summary"]["lost"] == 0]


def best_within(runs, p95_ms):
    """The highest throughput among runs whose p95 is at most `p95_ms` (None if none)."""
    fits = [s["throughput_rps"] for s in runs if s["p95_ms"] <= p95_ms]
    return max(fits) if fits else None


def comparison_table(rows, slos):
    """Per model: each scheduler's best throughput within the SLO, and iteration-level's best
    throughput at a p95 no higher than request-level's at request-level's own best throughput."""
    lines = ["| model | SLO: p95 <= ms | request req/s within SLO | iteration req/s within SLO | request-level best req/s (its p95 ms) "
             "| iteration req/s at equal or lower p95 | ratio |", "|---|---|---|---|---|---|---|"]
    for model, slo in slos.items():
        request, iteration = _runs(rows, model, "request"), _runs(rows, model, "iteration")
        if not request:
            continue
        top = max(request, key=lambda s: s["throughput_rps"])
        matched = best_within(iteration, top["p95_ms"])
        ratio = f"{matched / top['throughput_rps']:.2f}x" if matched else "-"
        lines.append(f"| {model} | {slo:.0f} | {fmt(best_within(request, slo), 2)} | {fmt(best_within(iteration, slo), 2)} | "
                     f"{top['throughput_rps']:.2f} ({top['p95_ms']:.0f}) | {fmt(matched, 2)} | {ratio} |")
    return "\n".join(lines)


def write_results_md(path, text):
    """Replace this benchmark's own "## Serving" section (up to the next "## "), or append it."""
    old = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
    lines = old.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.strip() == "## Serving"), None)
    if start is None:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        new = "".join(lines[:start]) + text + ("\n" + "".join(lines[end:]) if end < len(lines) else "")
    with open(path, "w") as f:
        f.write(new)


def run_server(model, scheduler, args, trace, rate_of, unit, loads, rows):
    """One server: a warm-up, then the trace at each load; appends a row per load."""
    port = free_port()
    print(f"== {model} / {scheduler}: starting the server on 127.0.0.1:{port} (calibration) ...", flush=True)
    flags = ["--threads", str(args.threads), "--max-batch", str(args.max_batch), "--max-steps", str(args.steps + 2),
             "--min-steps", str(args.min_steps), "--policy", "degrade", "--max-queue", str(args.requests + 8)]
    process, url, _ = start_server(model, scheduler, port, flags)
    try:
        health = httpx.get(url + "/healthz", timeout=10).json()
        with httpx.Client(timeout=600) as client:
            for k in range(2):
                send(client, url, -1, {"prompt": PROMPTS[k], "steps": args.steps, "edits": [{"type": "move", "word": OBJECTS[PROMPTS[k]][0], "dx": 0.2}]})
        for level, load in enumerate(loads):
            # New seeds at each load: the cache starts each level as cold as the first.
            requests = [{**body, "seed": body["seed"] + 3 * level} for body in trace["requests"]]
            rate = rate_of(load)
            results, elapsed = drive(url, requests, trace["times"], rate)
            summary = summarize(results, len(requests), elapsed)
            rows.append({"model": model, "scheduler": scheduler, "load": load, "rate": rate, "unit_ms": unit, "summary": summary,
                         "metrics": scrape(url), "health": health})
            print(table(rows[-1:]), flush=True)
    finally:
        code = stop_server(process)
    rows[-1]["summary"]["server_exit_code"] = code


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="auto", help='comma-separated; "auto": tiny, and default when installed')
    parser.add_argument("--schedulers", default="request,iteration")
    parser.add_argument("--loads", default="0.3,0.6,1.2,2.4", help="offered loads, in requests per predicted plain-request time")
    parser.add_argument("--requests", type=int, default=20, help="requests per load")
    parser.add_argument("--steps", type=int, default=10, help="steps of the mix's middle (it uses -2, +0, +2)")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server's worker")
    parser.add_argument("--min-steps", type=int, default=4, help="the server's degradation floor")
    parser.add_argument("--json", default=os.path.join("outputs", "bench", "serve_load.json"))
    parser.add_argument("--plot", default=os.path.join("docs", "img", "serve_load.png"))
    parser.add_argument("--results-md", default=os.path.join("benchmarks", "RESULTS.md"), help='"" to leave it alone')
    parser.add_argument("--report-only", action="store_true", help="no runs: redo the tables, plot and RESULTS.md from --json")
    parser.add_argument("--note", default="", help="a sentence on the conditions of the run, for RESULTS.md (e.g. a shared machine)")
    args = parser.parse_args(argv)
    os.makedirs(os.path.join(ROOT, "outputs", "bench"), exist_ok=True)
    # Run as `python -m benchmarks.serve_load` from the repository root: benchmarks/ itself on sys.path
    # (a script's folder) would make benchmarks/kernels.py answer transformers' `import kernels`.
    from benchmarks.serve_plot import latency_plot

    models = args.models.split(",") if args.models != "auto" else ["tiny"]
    if args.models == "auto" and os.path.exists(os.path.join(ROOT, "sgfast", "shapes", "assets", "default", "model_index.json")):
        models.append("default")
    loads = [float(x) for x in args.loads.split(",")]
    rows, slos = [], {}
    if args.report_only:
        with open(os.path.join(ROOT, args.json)) as f:
            saved = json.load(f)
        rows, slos, models = saved["runs"], saved["slo_ms"], []
        vars(args).update({k: v for k, v in saved["settings"].items() if k not in ("report_only", "json", "plot", "results_md")})
        loads = [float(x) for x in args.loads.split(",")]
    for model in models:
        trace, unit = None, None
        for scheduler in args.schedulers.split(","):
            if trace is None:  # the first server's calibration sets the trace both get
                port = free_port()
                process, url, _ = start_server(model, scheduler, port, ["--threads", str(args.threads)])
                try:
                    health = httpx.get(url + "/healthz", timeout=10).json()
                finally:
                    stop_server(process)
                native, cost = str(health["native_size"] ** 2), health["cost_ms"]
                unit = cost["overhead"][native]["1"] + args.steps * cost["plain"][native]["1"]
                trace = {"requests": make_requests(args.requests, args.steps, unit, args.seed), "times": arrivals(args.requests, args.seed)}
                slos[model] = 8 * unit

            def rate_of(load, unit=unit):
                return load * 1000.0 / unit

            run_server(model, scheduler, args, trace, rate_of, unit, loads, rows)
    command = shlex.join(["python", "-m", "benchmarks.serve_load", *(argv if argv is not None else sys.argv[1:])])
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine(), "command": command,
              "settings": vars(args), "slo_ms": slos, "runs": rows}
    if args.report_only:
        report = {**saved, "slo_ms": slos, "runs": rows}
        command = report["command"]
    else:
        with open(os.path.join(ROOT, args.json), "w") as f:
            json.dump(report, f, indent=1, default=str)
    latency_plot(rows, os.path.join(ROOT, args.plot), slos)
    print("\n" + table(rows) + "\n\n" + comparison_table(rows, slos))
    print(f"\nwrote {args.json} and {args.plot}")
    if args.results_md:
        units = ", ".join(f"{m}: {s / 8:.0f} ms" for m, s in slos.items())
        text = (
            "## Serving\n\n"
            f"{report['date'][:10]}, {report['machine']}. Both schedulers ran in this one run, one after the other."
            + (f" {args.note}" if args.note else "") + "\n"
            f"Command: `{command}` (`make bench-serve`). For each model, `python -m sgfast serve` runs on loopback with one "
            f"worker thread, `--max-batch {args.max_batch}`, once per scheduler (`--scheduler request`: same-shape requests "
            f"as one pipeline call; `--scheduler iteration`: batched per denoising step). Both get the same open-loop Poisson "
            f"trace of {args.requests} requests at each offered load ({', '.join(map(str, loads))} requests per predicted "
            f"time of one plain {args.steps}-step request alone: {units}): 40% plain, 60% edits (move, place or resize) of "
            f"4 prompts x 3 seeds (new seeds at each load), at {args.steps - 2}, {args.steps} or {args.steps + 2} steps; every other "
            f"request has a budget of 8x that time (policy degrade). Latency is the client's, of answered 200s; throughput "
            f"is 200s per second from the first send to the last answer; the miss rate counts budgeted requests answered late "
            f"or expired in the queue; errors: any status but 200, 422 and 503; lost = sent - answered.\n\n"
            f"Throughput with p95 latency within the SLO (8x the plain-request time), the highest over the loads, and "
            f"iteration-level's highest throughput at a p95 no higher than request-level's at its own highest throughput:\n\n"
            + comparison_table(rows, slos) + "\n\n"
            f"![p95 latency against offered load](../{args.plot})\n\n" + table(rows) + "\n"
        )
        write_results_md(os.path.join(ROOT, args.results_md), text)
        print(f"updated {args.results_md} (## Serving)")
    lost = sum(r["summary"]["lost"] for r in rows)
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
