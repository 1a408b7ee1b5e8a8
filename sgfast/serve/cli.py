"""Command line of the server: `python -m sgfast serve --model <path|default|tiny> --host 127.0.0.1 --port 8000`.

Its flags, the engine they build, and the uvicorn server. `python -m sgfast` adds the flags to its
`serve` command; the web stack is imported only when the server starts, so `python -m sgfast --help`
does not import it."""

import sys

POLICIES = ("degrade", "reject")


def add_arguments(parser):
    parser.add_argument("--model", default="default", help='"default", "tiny", or a local diffusers pipeline folder')
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--policy", choices=POLICIES, default="degrade", help="requests predicted to miss their budget: degrade or reject (503)")
    parser.add_argument("--device", default="auto", help='"auto" (cuda when available), "cpu", "cuda", ...')
    parser.add_argument("--mode", choices=("auto", "reference", "fast"), default="auto", help="SelfGuidancePipeline mode (auto: fast on CUDA)")
    # request by default: on the CPU, bench-serve measured iteration 1.26x at equal p95 on the built-in model, with far
    # more budgets missed under load (RESULTS.md)
    parser.add_argument("--scheduler", choices=("iteration", "request"), default="request",
                        help="iteration: batch per denoising step, requests join and leave between steps; request: same-shape requests run as one pipeline call")
    parser.add_argument("--max-batch", type=int, default=4, help="most requests in one UNet call (iteration) or pipeline call (request)")
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--default-steps", type=int, default=20)
    parser.add_argument("--min-steps", type=int, default=10, help="degradation floor (or the requested steps if fewer)")
    parser.add_argument("--min-guided-fraction", type=float, default=0.25, help="degradation floor of guided steps")
    parser.add_argument("--max-size", type=int, default=None, help="pixels per side (default: twice the model's native size)")
    parser.add_argument("--max-edits", type=int, default=8)
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--max-body-kb", type=int, default=64)
    parser.add_argument("--max-photo-kb", type=int, default=4096, help="cap on a photo file sent to POST /v1/edits")
    parser.add_argument("--cache-mb", type=float, default=256, help="memory bound of the reference-trace cache")
    parser.add_argument("--calibrate-sizes", default="", help="extra square sizes to calibrate, e.g. 256,768 (native always)")
    parser.add_argument("--no-drain", action="store_true", help="on shutdown answer queued requests 503 instead of running them")
    parser.add_argument("--drain-timeout", type=float, default=30.0, help="seconds from SIGTERM/SIGINT to stopping: every request is answered by then (503 if it cannot run)")
    parser.add_argument("--header-timeout", type=float, default=10.0, help="seconds a connection has to send a request's headers")
    parser.add_argument("--body-timeout", type=float, default=10.0, help="seconds a request has to send its whole body")
    parser.add_argument("--max-connections", type=int, default=256, help="open connections at most (more are answered 503)")
    parser.add_argument("--allowed-hosts", default="", help="extra Host header names to answer (comma-separated); loopback names and --host always")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads of the model worker (0: torch's default)")
    parser.add_argument("--log-level", default="info")


def build_engine(args, log=print):
    """Load the model named by the flags, calibrate the cost model, return an Engine (not started)."""
    import torch

    from sgfast import SelfGuidancePipeline
    from sgfast.serve.admission import Limits
    from sgfast.serve.engine import Engine
    from sgfast.serve.families import is_transformer, native_size
    from sgfast.serve.iteration import IterationEngine
    from sgfast.shapes import load_pipeline

    pipe, name = load_pipeline(args.model)
    if args.scheduler == "iteration" and is_transformer(pipe):
        sys.exit(f"--scheduler iteration runs UNet pipelines; {type(pipe).__name__} is served with --scheduler request")
    pipe.set_progress_bar_config(disable=True)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe.to(device)
    mode = args.mode if args.mode != "auto" else ("fast" if device.startswith("cuda") else "reference")
    sg = SelfGuidancePipeline.from_pipe(pipe, mode=mode)
    limits = Limits(
        max_steps=args.max_steps,
        default_steps=min(args.default_steps, args.max_steps),
        min_steps=args.min_steps,
        min_guided_fraction=args.min_guided_fraction,
        max_size=args.max_size,
        max_edits=args.max_edits,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_body_bytes=args.max_body_kb * 1024,
        max_photo_bytes=args.max_photo_kb * 1024,
    )
    native = native_size(pipe)
    sizes = [(native, native)] + [(int(s), int(s)) for s in args.calibrate_sizes.split(",") if s.strip() and int(s) != native]
    name = display_name(args.model, name)
    log(f"model: {name} on {device} ({mode} mode); the cost model is calibrated when the worker starts")
    engine_class = IterationEngine if args.scheduler == "iteration" else Engine
    return engine_class(
        sg, model=name, cost=None, policy=args.policy, limits=limits, cache_bytes=int(args.cache_mb * 2**20), log=log,
        threads=args.threads or None, calibrate_sizes=sizes,
    )


def display_name(flag, description):
    """The model's name for /healthz and logs: no machine paths."""
    import os

    if flag == "default":
        return description.split(" (")[0]
    if os.path.isdir(flag):
        return os.path.basename(os.path.normpath(flag))
    return description


def allowed_hosts(args):
    """Host header names to answer: loopback, --host (unless it is a wildcard) and --allowed-hosts."""
    from sgfast.serve.app import LOOPBACK_NAMES

    names = list(LOOPBACK_NAMES) + [h.strip() for h in args.allowed_hosts.split(",") if h.strip()]
    if args.host not in ("0.0.0.0", "::", ""):
        names.append(args.host)
    return tuple(dict.fromkeys(n.lower() for n in names))


def serve(args):
    try:
        import uvicorn  # noqa: F401
    except ImportError:
        sys.exit("serving needs the serve extra: pip install -e '.[serve]'")
    from sgfast.serve.app import create_app
    from sgfast.serve.http import bind, server

    try:
        sock = bind(args.host, args.port)  # before loading the model: a busy port fails at once
    except OSError as e:
        sys.exit(f"error: {e}")
    engine = build_engine(args)
    app = create_app(
        engine, drain_on_shutdown=not args.no_drain, shutdown_timeout=args.drain_timeout,
        allowed_hosts=allowed_hosts(args), body_timeout_s=args.body_timeout,
    )
    http = server(
        app, engine, host=args.host, port=args.port, drain=not args.no_drain, drain_timeout_s=args.drain_timeout,
        header_timeout_s=args.header_timeout, max_connections=args.max_connections, log_level=args.log_level,
    )
    print(f"serving on http://{args.host}:{args.port}/  (policy: {args.policy}; SIGTERM/Ctrl-C answers every request and stops within {args.drain_timeout:g} s)")
    http.run(sockets=[sock])
