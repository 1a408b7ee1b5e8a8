"""The same HTTP API on Ray Serve: one replica per GPU (num_gpus=1 each), or CPU replicas when the
cluster has no GPU. Each replica is a whole `sgfast.serve.app` server: its own model, worker thread, EDF
queue, cost model, trace cache and /metrics; Ray's proxy spreads requests over the replicas.

Needs the `ray` extra (`pip install -e '.[ray]'`). Run it with

    python -m sgfast serve-ray --model tiny --host 127.0.0.1 --port 8000 --replicas 2

(the flags of `python -m sgfast serve`, plus `--replicas` and `--cpus-per-replica`), or with Ray's CLI:

    serve run sgfast.serve.ray_serve:build_app model=tiny replicas=2

Edit sessions: a replica's reference-trace cache is its own, so a second edit of an image hits the
cache only when it reaches the replica that made the first (Ray routes without affinity); it is still
correct elsewhere, only slower (the reference pass runs again).
"""

import argparse
import os
import signal
import threading

from ray import serve

from sgfast.serve.cli import add_arguments, allowed_hosts

_ENGINE = None  # this replica's engine: set by the deployment's constructor, read by the app builder


def _build_asgi_app():
    # Ray Serve calls this on the replica right after the deployment's constructor. The importable
    # module holds the engine (this function may travel pickled by value, with a copy of its globals).
    import sgfast.serve.ray_serve as module
    from sgfast.serve.app import create_app

    engine = module._ENGINE
    return create_app(engine, drain_on_shutdown=True, allowed_hosts=engine.allowed_hosts)


def engine_arguments(options=None):
    """The `python -m sgfast serve` flags as a namespace: `options` (a dict keyed by the flags' names,
    e.g. {"model": "tiny", "max_batch": 4}; strings are parsed as on the command line) over the defaults."""
    parser = argparse.ArgumentParser(prog="sgfast serve-ray", add_help=False, exit_on_error=False)
    add_arguments(parser)
    flags = {a.dest: a for a in parser._actions}
    argv = []
    for key, value in (options or {}).items():
        key = key.replace("-", "_")
        if key not in flags:
            raise ValueError(f"unknown option {key!r}; the serve flags are: {sorted(flags)}")
        flag = flags[key].option_strings[0]
        if flags[key].nargs == 0:  # a switch such as --no-drain
            if str(value).lower() in ("1", "true", "yes", "on"):
                argv.append(flag)
        elif value is not None:
            argv += [flag, str(value)]
    try:
        return parser.parse_args(argv)
    except (argparse.ArgumentError, SystemExit) as e:
        raise ValueError(f"bad serve options {options}: {e}") from None


@serve.deployment(name="sgfast", max_ongoing_requests=128)
@serve.ingress(_build_asgi_app)
class SgfastReplica:
    """One server: loads the model, starts the worker (which calibrates the cost model)."""

    def __init__(self, options=None):
        import sgfast.serve.ray_serve as module  # the importable module (this class may travel pickled by value)
        from sgfast.serve.cli import allowed_hosts, build_engine

        args = engine_arguments(options)
        engine = build_engine(args)
        engine.allowed_hosts = allowed_hosts(args)  # Host names the replica's app answers
        engine.replica = f"{os.uname().nodename}:{os.getpid()}"
        engine.start()
        module._ENGINE = self.engine = engine

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown(drain=True, timeout=120)


def deployment(options=None, replicas=None, cpus_per_replica=1):
    """The bound application: `serve.run(deployment({"model": "tiny"}, replicas=2))`. With GPUs in the
    cluster: one replica per GPU (unless `replicas` says otherwise), each holding one; without:
    `replicas` CPU replicas (default 1) of `cpus_per_replica` CPUs."""
    import ray

    options = dict(options or {})
    engine_arguments(options)  # fail early on a bad option, not on the replicas
    gpus = int(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0
    if gpus:
        actor = {"num_gpus": 1}
        count = replicas or gpus
    else:
        actor = {"num_cpus": cpus_per_replica}
        count = replicas or 1
        options.setdefault("threads", max(1, int(cpus_per_replica)))  # torch threads = the CPUs it holds
    max_queue = engine_arguments(options).max_queue
    return SgfastReplica.options(
        num_replicas=count, ray_actor_options=actor, max_ongoing_requests=max_queue + 8
    ).bind(options)


def build_app(args):
    """For `serve run sgfast.serve.ray_serve:build_app model=tiny replicas=2 ...` (values are strings)."""
    args = dict(args)
    replicas = int(args.pop("replicas")) if "replicas" in args else None
    cpus = float(args.pop("cpus_per_replica", 1))
    return deployment(args, replicas=replicas, cpus_per_replica=cpus)


def main(argv=None):
    import ray

    parser = argparse.ArgumentParser(prog="python -m sgfast serve-ray", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--replicas", type=int, default=None, help="default: one per GPU, else 1")
    parser.add_argument("--cpus-per-replica", type=float, default=1)
    parser.add_argument("--address", default=None, help="a running Ray cluster (default: start a local one)")
    args = parser.parse_args(argv)
    options = {k: v for k, v in vars(args).items() if k not in ("host", "port", "replicas", "cpus_per_replica", "address", "log_level")}
    options["allowed_hosts"] = ",".join(allowed_hosts(args))  # the proxy's --host, as `serve` does
    ray.init(address=args.address, include_dashboard=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(deployment(options, args.replicas, args.cpus_per_replica), name="sgfast", route_prefix="/")
    print(f"serving on http://{args.host}:{args.port}/ with Ray Serve; Ctrl-C or SIGTERM stops", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # also when started with SIGINT ignored (a background job)
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    finally:
        print("stopping: replicas drain their queues", flush=True)
        serve.shutdown()
        ray.shutdown()

