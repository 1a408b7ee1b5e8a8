"""Load test of the HTTP server (`make bench-serve`).

Starts `python -m sgfast serve` on a free loopback port (the tiny model, and the built-in model when it
is installed), once per admission policy, and drives it with a bounded client: a fixed number of
requests and a time limit, a few at a time, mixing plain generations and edits of a small set of
images (so that the reference-trace cache is exercised) with budgets from tight to none. Reports
p50/p95/p99 latency, throughput, the deadline-miss rate and sent vs answered (nothing may be lost),
prints a table, writes JSON and replaces the "## Serving" section of benchmarks/RESULTS.md.

    python benchmarks/serve_load.py                      # tiny model (+ default if present), both policies
    python benchmarks/serve_load.py --requests 40 --concurrency 4 --duration 60 --policies degrade
"""

import argparse
import datetime
import json
import os
import platform
import random
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


def start_server(model, policy, port, extra):
    command = [
        sys.executable, "-m", "sgfast", "serve", "--model", model, "--host", "127.0.0.1", "--port", str(port),
        "--policy", policy, "--log-level", "warning", *extra,
    ]
    log = open(os.path.join(ROOT, "outputs", "bench", f"serve_{os.path.basename(model)}_{policy}.log"), "w")
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
    process.send_signal(signal.SIGINT)  # graceful: drains the queue
    try:
        return process.wait(120)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def make_requests(count, steps, unit_ms, seed):
    """A reproducible mix: 40% plain, 60% edits; budgets none / loose / medium / tight relative to the
    predicted time of one plain request (`unit_ms`)."""
    rng = random.Random(seed)
    budgets = [None, 8 * unit_ms, 4 * unit_ms, 2 * unit_ms]
    out = []
    for i in range(count):
        prompt = rng.choice(PROMPTS)
        body = {"prompt": prompt, "seed": rng.randrange(3), "steps": steps}
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
        budget = budgets[i % len(budgets)]
        if budget is not None:
            body["budget_ms"] = round(budget)
        out.append(body)
    return out


def drive(url, requests, concurrency, duration):
    """Send `requests` from `concurrency` threads, stopping new sends after `duration` seconds."""
    results, lock = [], threading.Lock()
    pending = list(enumerate(requests))
    start = time.monotonic()
    stop_at = start + duration

    def worker():
        with httpx.Client(timeout=max(duration, 60) + 60) as client:
            while True:
                with lock:
                    if not pending or time.monotonic() >= stop_at:
                        return
                    index, body = pending.pop(0)
                sent = time.monotonic()
                record = {"index": index, "budget_ms": body.get("budget_ms"), "edit": bool(body.get("edits"))}
                try:
                    r = client.post(url + "/v1/images", json=body)
                    record["status"] = r.status_code
                    data = r.json()
                    if r.status_code == 200:
                        record.update(
                            degraded=data["degraded"], missed=data["deadline_missed"], cache_hit=data["cache_hit"],
                            batch=data["batch_size"], server_ms=data["timings"]["total_ms"],
                        )
                    else:
                        detail = data.get("detail")
                        message = detail.get("message", "") if isinstance(detail, dict) else str(detail)
                        record["expired"] = "deadline passed" in message
                        record["message"] = message[:160]
                except (httpx.HTTPError, ValueError) as e:
                    record["status"] = None
                    record["error"] = f"{type(e).__name__}: {e}"
                record["latency_ms"] = (time.monotonic() - sent) * 1000
                with lock:
                    results.append(record)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.monotonic() - start


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
    head = ["model", "policy", "sent", "answered", "lost", "200", "503", "expired", "422", "errors", "degraded", "cache hits", "p50 ms", "p95 ms", "p99 ms", "req/s", "miss rate"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        s = r["summary"]
        cells = [
            r["model"], r["policy"], s["sent"], s["answered"], s["lost"], s["ok"], s["rejected_503"], s["expired_in_queue"],
            s["rejected_422"], s["errors"], s["degraded"], s["cache_hits"], fmt(s["p50_ms"]), fmt(s["p95_ms"]), fmt(s["p99_ms"]), fmt(s["throughput_rps"], 2),
            fmt(None if s["deadline_miss_rate"] is None else 100 * s["deadline_miss_rate"], 1) + ("%" if s["deadline_miss_rate"] is not None else ""),
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="auto", help='comma-separated; "auto": tiny, and default when installed')
    parser.add_argument("--policies", default="degrade,reject")
    parser.add_argument("--requests", type=int, default=60, help="requests per run (bounded)")
    parser.add_argument("--duration", type=float, default=60, help="stop sending after this many seconds per run")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server's worker")
    parser.add_argument("--min-steps", type=int, default=4, help="the server's degradation floor")
    parser.add_argument("--json", default=os.path.join("outputs", "bench", "serve_load.json"))
    parser.add_argument("--results-md", default=os.path.join("benchmarks", "RESULTS.md"), help='"" to leave it alone')
    args = parser.parse_args(argv)
    os.makedirs(os.path.join(ROOT, "outputs", "bench"), exist_ok=True)

    models = args.models.split(",") if args.models != "auto" else ["tiny"]
    if args.models == "auto" and os.path.exists(os.path.join(ROOT, "sgfast", "shapes", "assets", "default", "model_index.json")):
        models.append("default")
    rows = []
    for model in models:
        for policy in args.policies.split(","):
            port = free_port()
            print(f"== {model} / {policy}: starting the server on 127.0.0.1:{port} (calibration) ...", flush=True)
            process, url, command = start_server(model, policy, port, ["--threads", str(args.threads), "--max-steps", str(max(args.steps, 10)), "--min-steps", str(args.min_steps)])
            try:
                health = httpx.get(url + "/healthz", timeout=10).json()
                native = health["native_size"]
                # One plain request at the requested steps, as the server predicts it.
                cost = health["cost_ms"]
                pixels = str(native * native)
                unit = cost["overhead"][pixels]["1"] + args.steps * cost["plain"][pixels]["1"]
                requests = make_requests(args.requests, args.steps, unit, args.seed)
                results, elapsed = drive(url, requests, args.concurrency, args.duration)
                sent = len(results)
                metrics = scrape(url)
            finally:
                code = stop_server(process)
            summary = summarize(results, sent, elapsed)
            summary["server_exit_code"] = code
            rows.append({"model": model, "policy": policy, "summary": summary, "metrics": metrics, "unit_ms": unit, "health": health})
            print(table(rows[-1:]), flush=True)
    command = "python benchmarks/serve_load.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "command": command.strip(),
        "settings": vars(args),
        "runs": rows,
    }
    with open(os.path.join(ROOT, args.json), "w") as f:
        json.dump(report, f, indent=1, default=str)
    print()
    print(table(rows))
    print(f"\nwrote {args.json}")
    if args.results_md:
        unit = ", ".join(f"{r['model']}: {r['unit_ms']:.0f} ms" for r in rows[:: max(1, len(args.policies.split(',')))])
        text = (
            "## Serving\n\n"
            f"{report['date'][:10]}, {report['machine']}.\n"
            f"Command: `{report['command']}` (`make bench-serve`). Each run starts `python -m sgfast serve` on loopback "
            f"with one worker thread, then {args.concurrency} clients send up to {args.requests} requests "
            f"(or stop after {args.duration:g} s) of {args.steps} steps: 40% plain, 60% edits (move, place or resize) "
            f"of 4 prompts x 3 seeds; budgets cycle through none, 8x, 4x and 2x the predicted time of one plain "
            f"request ({unit}). Latency is the client's, of answered 200s; the miss rate counts budgeted requests "
            f"answered late or expired in the queue (503s at admission and 422s for budgets below what the request can "
            f"ever take are rejections, not misses); errors: any other status; lost = sent - answered.\n\n"
            + table(rows) + "\n"
        )
        write_results_md(os.path.join(ROOT, args.results_md), text)
        print(f"updated {args.results_md} (## Serving)")
    lost = sum(r["summary"]["lost"] for r in rows)
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
