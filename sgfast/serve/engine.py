"""The serving engine behind `python -m sgfast serve`: cost model, admission, earliest-deadline-first
scheduling with same-shape batching, and the LRU cache of unedited reference traces.

It has no web dependency: `sgfast.serve` puts FastAPI in front of it, `sgfast.serve_ray` Ray Serve.

    engine = Engine(sg, model="tiny", cost=CostModel.calibrate(sg), policy="degrade")
    engine.start()
    job = engine.submit(Spec(prompt="a red circle and a blue square", edits=[move("circle", dx=0.25)],
                             edit_specs=[...], seed=0, steps=20, budget_ms=2000))
    result = job.future.result()     # Result: image, steps and guided steps run, timings, degradation
    engine.shutdown(drain=True)      # answers every queued request

One worker thread owns the model. Every request is planned against its budget when it arrives
(`admit`): predicted completion = the predicted work queued ahead of it (earlier deadlines) + its own
cost from the cost model. A request that would miss is rejected (policy "reject": `Rejected`, HTTP 503,
with the predicted time and what would fit) or degraded (policy "degrade": guidance on fewer steps,
then fewer steps). A budget that no plan can meet even on an idle server is `Rejected` with status 422.
"""

import heapq
import itertools
import math
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from sgfast.sampler import default_schedule

POLICIES = ("degrade", "reject")
NO_BUDGET_MS = 3_600_000.0  # requests without a budget are ordered as if due in an hour (FIFO among themselves)


# ----------------------------------------------------------------------------------------------
# Errors


class Rejected(Exception):
    """A request the engine will not run. `status`: 503 (overloaded, shutting down, deadline passed
    while queued) or 422 (can never be met); `detail`: a JSON-able dict (message, predictions, what fits)."""

    def __init__(self, status, message, **detail):
        super().__init__(message)
        self.status = status
        self.detail = {"message": message, **detail}


# ----------------------------------------------------------------------------------------------
# Cost model


def _interpolate(table, batch):
    """Linear interpolation of {batch: ms} at `batch`, extrapolated from the two nearest points."""
    sizes = sorted(table)
    if batch in table:
        return table[batch]
    if len(sizes) == 1:
        return table[sizes[0]] * batch / sizes[0]
    if batch < sizes[0]:
        lo, hi = sizes[0], sizes[1]
    elif batch > sizes[-1]:
        lo, hi = sizes[-2], sizes[-1]
    else:
        hi = next(s for s in sizes if s > batch)
        lo = max(s for s in sizes if s < batch)
    value = table[lo] + (table[hi] - table[lo]) * (batch - lo) / (hi - lo)
    return max(value, min(table.values()) * 0.5)


class CostModel:
    """Milliseconds per denoising step ("plain": a classifier-free-guidance step; "guided": a step
    with the self-guidance gradient) and per pipeline call ("overhead": prompt encoding, VAE decode),
    by batch size and resolution (pixels). Calibrated on the loaded model, refreshed from live
    timings by an exponential moving average. An unmeasured resolution is scaled from the nearest
    measured one by the ratio of pixels; an unmeasured batch size is interpolated."""

    KINDS = ("plain", "guided", "overhead")

    def __init__(self, table=None, alpha=0.2):
        self.table = {}  # {(kind, pixels): {batch: ms}}
        self.alpha = alpha
        self.lock = threading.Lock()
        for (kind, pixels), by_batch in (table or {}).items():
            self.table[(kind, int(pixels))] = {int(b): float(ms) for b, ms in by_batch.items()}

    @classmethod
    def fixed(cls, plain_ms, guided_ms, overhead_ms=0.0, pixels=64 * 64, batch_factor=1.0):
        """A cost model from constants (for tests and dry runs): a batch of b costs
        ms * (1 + batch_factor * (b - 1)) per step."""
        table = {}
        for kind, ms in (("plain", plain_ms), ("guided", guided_ms), ("overhead", overhead_ms)):
            table[(kind, pixels)] = {1: ms, 2: ms * (1 + batch_factor)}
        return cls(table)

    def ms(self, kind, batch=1, pixels=64 * 64):
        with self.lock:
            measured = sorted(p for (k, p) in self.table if k == kind)
            if not measured:
                raise KeyError(f"the cost model has no {kind!r} timings")
            nearest = min(measured, key=lambda p: (abs(math.log(p / pixels)), p))
            return _interpolate(self.table[(kind, nearest)], batch) * pixels / nearest

    def call_ms(self, batch, pixels, steps, guided, reference_steps=0):
        """Predicted milliseconds of one pipeline call: `steps` steps of which `guided` carry
        self-guidance, plus `reference_steps` steps of an unedited reference pass."""
        plain = self.ms("plain", batch, pixels)
        return self.ms("overhead", batch, pixels) + (steps - guided + reference_steps) * plain + guided * self.ms(
            "guided", batch, pixels
        )

    def observe(self, kind, batch, pixels, ms):
        """Fold a live measurement into the table (EWMA at measured points, a new point otherwise)."""
        if not (math.isfinite(ms) and ms > 0):
            return
        with self.lock:
            by_batch = self.table.setdefault((kind, int(pixels)), {})
            old = by_batch.get(batch)
            by_batch[batch] = ms if old is None else (1 - self.alpha) * old + self.alpha * ms

    def observe_call(self, batch, pixels, steps, guided, reference_steps, elapsed_ms):
        """Attribute a measured call to its step kind: a call without guided steps refreshes the plain
        step time, a call with them the guided one (the rest taken from the model)."""
        overhead = self.ms("overhead", batch, pixels)
        if guided == 0:
            plain_steps = steps + reference_steps
            if plain_steps:
                self.observe("plain", batch, pixels, (elapsed_ms - overhead) / plain_steps)
        else:
            plain = self.ms("plain", batch, pixels)
            self.observe("guided", batch, pixels, (elapsed_ms - overhead - (steps - guided + reference_steps) * plain) / guided)

    def snapshot(self):
        """{kind: {pixels: {batch: ms}}} (for /metrics, /healthz and logs)."""
        with self.lock:
            out = {}
            for (kind, pixels), by_batch in sorted(self.table.items()):
                out.setdefault(kind, {})[pixels] = dict(sorted(by_batch.items()))
            return out

    @classmethod
    def calibrate(cls, sg, sizes=None, batches=(1, 2), prompt=None, log=None):
        """Measure the loaded model: for each resolution and batch size, plain calls of 2 and 6 steps
        (their difference: ms per plain step; the rest: the per-call overhead) and an edited call of 4
        guided steps on a recorded trace (ms per guided step). Takes a few seconds on the tiny model."""
        from sgfast.edits import move

        pipe = sg.pipe
        native = pipe.unet.config.sample_size * pipe.vae_scale_factor
        sizes = sizes or [(native, native)]
        prompt = prompt or calibration_prompt(sg)
        word = next((w for w in sg.words(prompt)[::-1] if w.isalpha()), sg.words(prompt)[-1])
        model = cls()
        for height, width in sizes:
            pixels = height * width
            for batch in batches:
                prompts = [prompt] * batch
                common = dict(height=height, width=width, guidance_scale=7.5)

                def timed(**kw):
                    start = time.perf_counter()
                    out = sg(prompts, **common, **kw)
                    return (time.perf_counter() - start) * 1000, out

                seeded = seeded_latents(pipe, [0] * batch, height, width)
                timed(num_inference_steps=2, latents=seeded.clone())  # warm-up
                t2, _ = timed(num_inference_steps=2, latents=seeded.clone())
                t6, out = timed(num_inference_steps=6, latents=seeded.clone())
                plain = max((t6 - t2) / 4, 1e-3)
                overhead = max(t2 - 2 * plain, 0.0)
                traces = out.trace if batch > 1 else [out.trace]
                tg, _ = timed(
                    num_inference_steps=6,
                    edits=[move(word, dx=0.1)],
                    trace=traces if batch > 1 else traces[0],
                    guidance_schedule=[0, 1, 2, 3],
                )
                guided = max((tg - overhead - 2 * plain) / 4, plain)
                for kind, ms in (("plain", plain), ("guided", guided), ("overhead", overhead)):
                    model.table.setdefault((kind, pixels), {})[batch] = ms
                if log:
                    log(
                        f"calibrated {height}x{width} batch {batch}: {plain:.1f} ms/plain step, "
                        f"{guided:.1f} ms/guided step, {overhead:.1f} ms/call"
                    )
        return model


def calibration_prompt(sg):
    """A short prompt with at least one word the tokenizer keeps whole."""
    return "a red circle and a blue square"


def seeded_latents(pipe, seeds, height, width):
    """The initial noise of each seed, as diffusers draws it for a batch of one with a CPU generator,
    so that a request's image does not depend on what it was batched with."""
    unet = pipe.unet
    shape = (1, unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s)), dtype=unet.dtype) for s in seeds]
    return torch.cat(noise).to(pipe._execution_device)


# ----------------------------------------------------------------------------------------------
# Plans and admission


@dataclass(frozen=True)
class Plan:
    """What a request will run: `steps` denoising steps with self-guidance on `guided_steps` of them
    (`schedule`: step indices, or None for the library's default schedule), plus an unedited
    reference pass of `reference_steps` steps when its trace is not cached."""

    steps: int
    guided_steps: int
    schedule: tuple = None
    reference_steps: int = 0

    def as_dict(self):
        return {"steps": self.steps, "guided_steps": self.guided_steps, "reference_steps": self.reference_steps}


def thinned_schedule(steps, guided):
    """`guided` of the default schedule's guided steps at `steps` steps, evenly spaced from the first."""
    full = [i for i, on in enumerate(default_schedule(steps)) if on]
    if guided >= len(full):
        return None
    if guided <= 0:
        return ()
    return tuple(full[math.floor(k * len(full) / guided)] for k in range(guided))


def full_guided(steps, has_edits):
    return sum(default_schedule(steps)) if has_edits else 0


@dataclass
class Limits:
    """Caps on what a request may ask for, and the floor of degradation."""

    max_steps: int = 100
    default_steps: int = 20
    min_steps: int = 10  # degradation never goes below min(this, the requested steps)
    min_guided_fraction: float = 0.25  # nor below this fraction of the schedule's guided steps
    max_size: int = None  # pixels per side; default: twice the model's native size
    max_edits: int = 8
    max_batch: int = 4
    max_queue: int = 64
    max_body_bytes: int = 64 * 1024
    max_prompt_chars: int = 1000


def candidate_plans(steps, has_edits, reference_steps_for, limits):
    """Plans from best to worst: the full request, then guidance on fewer steps, then fewer steps.
    `reference_steps_for(steps)` gives the reference pass a plan at `steps` would need."""
    lowest = min(limits.min_steps, steps)
    for s in range(steps, lowest - 1, -1):
        full = full_guided(s, has_edits)
        floor = max(1, math.ceil(full * limits.min_guided_fraction)) if full else 0
        for g in range(full, floor - 1, -1):
            yield Plan(s, g, None if g == full else thinned_schedule(s, g), reference_steps_for(s))


@dataclass
class Decision:
    plan: Plan
    predicted_ms: float  # predicted time to completion from now, queue included
    degraded: bool


def admit(
    cost, *, steps, has_edits, pixels, ahead_ms, budget_ms, policy, limits, reference_steps_for=lambda s: 0, batch=1,
    slack_ms=math.inf,
):
    """Plan one request. Returns a Decision or raises Rejected (422: no plan meets the budget even on
    an idle server; 503: not with the work queued ahead of it now). `slack_ms`: how much work can be
    put ahead of the queued requests due after this one before one of them is predicted to miss its
    deadline (a plan costing more is not admitted either). Pure: no timing, no engine."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")

    def predict(plan):
        return cost.call_ms(batch, pixels, plan.steps, plan.guided_steps, plan.reference_steps)

    def fits(plan):
        ms = predict(plan)
        return ms <= slack_ms and (budget_ms is None or ahead_ms + ms <= budget_ms)

    candidates = list(candidate_plans(steps, has_edits, reference_steps_for, limits))
    full = candidates[0]
    full_ms = predict(full)
    if budget_ms is None or fits(full):
        return Decision(full, ahead_ms + full_ms, False)
    allowed = candidates if policy == "degrade" else [full]
    idle_best = min(allowed, key=predict)
    idle_ms = predict(idle_best)
    if idle_ms > budget_ms:
        what = "the request" if policy == "reject" else "the most degraded plan"
        raise Rejected(
            422,
            f"budget_ms={budget_ms:g} can never be met: {what} takes about {idle_ms:.0f} ms on an idle server",
            predicted_ms=round(idle_ms, 1),
            min_budget_ms=math.ceil(idle_ms),
            plan=idle_best.as_dict(),
        )
    fitting = next((p for p in candidates if fits(p)), None)
    if policy == "degrade" and fitting is not None:
        return Decision(fitting, ahead_ms + predict(fitting), True)
    detail = dict(
        predicted_ms=round(ahead_ms + full_ms, 1),
        queue_ms=round(ahead_ms, 1),
        min_budget_ms=math.ceil(ahead_ms + full_ms),
        would_fit=fitting.as_dict() if fitting is not None else None,
        retry_after_s=max(1, math.ceil(max(ahead_ms + full_ms - budget_ms, full_ms - slack_ms) / 1000)),
    )
    if ahead_ms + full_ms <= budget_ms:  # it would meet its own budget, but make queued requests miss theirs
        detail["slack_ms"] = round(slack_ms, 1)
        message = (
            f"overloaded: running it ({full_ms:.0f} ms) would make queued requests miss their deadlines "
            f"(they can wait {slack_ms:.0f} ms more)"
        )
        if fitting is not None:
            message += f"; {fitting.steps} steps with guidance on {fitting.guided_steps} would fit"
    elif fitting is None:
        message = f"overloaded: completion predicted in {ahead_ms + full_ms:.0f} ms ({ahead_ms:.0f} ms queued ahead), budget {budget_ms:g} ms; nothing fits now"
    else:
        message = (
            f"predicted completion {ahead_ms + full_ms:.0f} ms ({ahead_ms:.0f} ms queued ahead) misses the budget of "
            f"{budget_ms:g} ms; {fitting.steps} steps with guidance on {fitting.guided_steps} would fit"
        )
    raise Rejected(503, message, **detail)


# ----------------------------------------------------------------------------------------------
# Reference-trace cache


class TraceCache:
    """LRU of unedited reference traces keyed by (model, prompt, seed, steps, height, width,
    guidance scale), bounded in bytes (`Trace.nbytes()` plus its initial latents)."""

    def __init__(self, max_bytes=256 * 2**20):
        self.max_bytes = max_bytes
        self.entries = OrderedDict()  # key -> (trace, nbytes)
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.lock = threading.Lock()

    @staticmethod
    def size_of(trace):
        latents = trace.latents
        return trace.nbytes() + (0 if latents is None else latents.numel() * latents.element_size())

    def peek(self, key):
        with self.lock:
            return key in self.entries

    def get(self, key):
        with self.lock:
            entry = self.entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self.entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def put(self, key, trace):
        size = self.size_of(trace)
        with self.lock:
            if key in self.entries:
                self.bytes -= self.entries.pop(key)[1]
            if size > self.max_bytes:
                return False
            self.entries[key] = (trace, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, evicted) = self.entries.popitem(last=False)
                self.bytes -= evicted
            return True

    def __len__(self):
        return len(self.entries)


# ----------------------------------------------------------------------------------------------
# Requests, jobs, results


@dataclass
class Spec:
    """One validated request. `edits`: sgfast edit objects; `edit_specs`: the same as JSON-able dicts."""

    prompt: str
    edits: list = field(default_factory=list)
    edit_specs: list = field(default_factory=list)
    seed: int = 0
    steps: int = 20
    guidance_scale: float = 7.5
    self_guidance_scale: float = 1.0
    normalize_gradient: bool = False
    height: int = 64
    width: int = 64
    negative_prompt: str = None
    budget_ms: float = None


@dataclass
class Result:
    image: object  # PIL image
    spec: Spec
    plan: Plan
    degraded: bool
    degradation: dict
    timings: dict  # ms: queue, run (the batch's pipeline call), total, predicted
    cache_hit: bool
    batch_size: int
    deadline_missed: bool


@dataclass(eq=False)
class Job:
    spec: Spec
    plan: Plan
    arrival: float  # time.monotonic()
    deadline: float
    predicted_ms: float
    degraded: bool
    seq: int
    future: Future = field(default_factory=Future)
    cost_ms: float = 0.0  # predicted run time alone (for the queue-ahead estimate of later arrivals)

    @property
    def has_edits(self):
        return bool(self.spec.edits)

    def trace_key(self, model, steps=None):
        s = self.spec
        return (model, s.prompt, s.negative_prompt, s.seed, steps or self.plan.steps, s.height, s.width, s.guidance_scale)


def degradation_of(spec, plan):
    """What was cut, for the response (None if nothing)."""
    full = full_guided(spec.steps, bool(spec.edits))
    if plan.steps == spec.steps and plan.guided_steps == full:
        return None
    return {
        "requested_steps": spec.steps,
        "steps": plan.steps,
        "requested_guided_steps": full,
        "guided_steps": plan.guided_steps,
        "guided_step_indices": None if plan.schedule is None else list(plan.schedule),
    }


class ShuttingDown(Rejected):
    def __init__(self, message="the server is shutting down"):
        super().__init__(503, message)


# ----------------------------------------------------------------------------------------------
# Engine


class Engine:
    """The single worker that owns the model, its EDF queue, the trace cache and the cost model.
    `metrics`: an object with the hooks of `sgfast.serve.Metrics` (or None)."""

    def __init__(
        self, sg, model="model", cost=None, policy="degrade", limits=None, cache_bytes=256 * 2**20, metrics=None, log=None,
        threads=None, calibrate_sizes=None,
    ):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.sg = sg
        self.pipe = sg.pipe
        self.model = model
        self.cost = cost
        self.policy = policy
        self.limits = limits or Limits()
        self.native = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        if self.limits.max_size is None:
            self.limits.max_size = 2 * self.native
        self.cache = TraceCache(cache_bytes)
        self.metrics = metrics
        self.log = log or (lambda msg: None)
        self.queue = []  # heap of (deadline, seq, job)
        self.cond = threading.Condition()
        self.seq = itertools.count()
        self.running = None  # (started, predicted_ms, jobs)
        self.closing = False
        self.drain = True
        self.thread = None
        self.batches = 0  # pipeline calls that succeeded
        self.admitted = 0  # requests queued
        self.replica = None  # a name for this server among several (Ray Serve replicas)
        self.threads = threads  # torch intra-op threads of the worker (None: torch's default)
        self.calibrate_sizes = calibrate_sizes  # [(height, width)] to calibrate (default: the native size)

    # -- public ---------------------------------------------------------------------------------

    def start(self, timeout=None):
        """Start the worker thread; it calibrates the cost model first if there is none (on the same
        thread, with the same torch settings, as it will serve). Returns once it is ready."""
        ready = Future()
        self.thread = threading.Thread(target=self._main, args=(ready,), name="sgfast-worker", daemon=True)
        self.thread.start()
        ready.result(timeout)  # re-raises a calibration error
        return self

    def _main(self, ready):
        previous = torch.get_num_threads()
        try:
            if self.threads:
                # Intra-op threads of this thread (and of threads started after it). On a small or shared
                # CPU one thread avoids OpenMP teams spinning against each other and other processes.
                torch.set_num_threads(self.threads)
            if self.cost is None:
                self.cost = CostModel.calibrate(self.sg, sizes=self.calibrate_sizes, batches=sorted({1, 2, self.limits.max_batch}), log=self.log)
        except BaseException as e:
            ready.set_exception(e)
            return
        ready.set_result(True)
        try:
            self._loop()
        finally:
            if self.threads:
                torch.set_num_threads(previous)

    @property
    def alive(self):
        return self.thread is not None and self.thread.is_alive()

    def depth(self):
        return len(self.queue)

    def reference_steps_for(self, spec):
        """The reference pass a plan of `steps` steps needs: none without edits or with a cached trace."""
        if not spec.edits or not any(e.needs_reference for e in spec.edits):
            return lambda steps: 0
        probe = Job(spec, None, 0, 0, 0, False, 0)
        return lambda steps: 0 if self.cache.peek(probe.trace_key(self.model, steps)) else steps

    def submit(self, spec):
        """Admit and queue a request; returns its Job (`job.future` resolves to a Result or raises).
        Raises Rejected when it is not admitted."""
        now = time.monotonic()
        with self.cond:
            if self.closing:
                raise ShuttingDown()
            if not self.alive:
                raise Rejected(503, "the worker is not running")
            if len(self.queue) >= self.limits.max_queue:
                raise Rejected(503, f"the queue is full ({self.limits.max_queue} requests)", retry_after_s=1)
            budget = spec.budget_ms
            deadline = now + (budget if budget is not None else NO_BUDGET_MS) / 1000
            ahead, slack = self._ahead_ms(deadline, now)
            decision = admit(
                self.cost,
                steps=spec.steps,
                has_edits=bool(spec.edits),
                pixels=spec.height * spec.width,
                ahead_ms=ahead,
                budget_ms=budget,
                policy=self.policy,
                limits=self.limits,
                reference_steps_for=self.reference_steps_for(spec),
                slack_ms=slack,
            )
            plan = decision.plan
            job = Job(spec, plan, now, deadline, decision.predicted_ms, decision.degraded, next(self.seq))
            job.cost_ms = decision.predicted_ms - ahead
            heapq.heappush(self.queue, (deadline, job.seq, job))
            self.admitted += 1
            self.cond.notify()
        return job

    def shutdown(self, drain=True, timeout=None):
        """Stop taking requests. `drain`: run every queued request first; otherwise answer each
        queued one with ShuttingDown (503). Either way every request gets an answer."""
        with self.cond:
            self.closing = True
            self.drain = drain
            if not drain:
                self._cancel_queued()
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout)
        with self.cond:  # whatever is left (worker gone or timed out) is answered
            self._cancel_queued()

    # -- scheduling -----------------------------------------------------------------------------

    def _ahead_ms(self, deadline, now):
        """(work predicted to run before a request due at `deadline`, in ms; its slack: how much it may
        add before a queued request due after it is predicted to miss, ignoring those already late)."""
        done = 0.0
        if self.running is not None:
            started, predicted, _ = self.running
            done = max(0.0, predicted - (now - started) * 1000)
        ahead, slack = done, math.inf
        for d, _, job in sorted(self.queue, key=lambda e: e[:2]):
            done += job.cost_ms
            if d <= deadline:
                ahead = done
            elif job.spec.budget_ms is not None:
                left = (d - now) * 1000 - done
                if left >= 0:
                    slack = min(slack, left)
        return ahead, slack

    def _cancel_queued(self):
        while self.queue:
            _, _, job = heapq.heappop(self.queue)
            if not job.future.done():
                job.future.set_exception(ShuttingDown("the server shut down before this request ran"))
                self._count("cancelled")

    def _count(self, outcome, job=None, latency_s=None):
        if self.metrics is not None:
            self.metrics.request_done(outcome, latency_s)

    def _batch_key(self, job):
        s, p = job.spec, job.plan
        return (
            s.height, s.width, p.steps, s.guidance_scale, s.negative_prompt, bool(s.edits),
            s.self_guidance_scale if s.edits else None, s.normalize_gradient if s.edits else None,
            p.schedule if s.edits else None, p.reference_steps > 0,
        )

    def _refresh_reference(self, job):
        reference = self.reference_steps_for(job.spec)
        job.plan = Plan(job.plan.steps, job.plan.guided_steps, job.plan.schedule, reference(job.plan.steps))

    def _replan(self, job, now):
        """Re-admit a job at dispatch against the time it has left (the cache may have changed)."""
        spec = job.spec
        if spec.budget_ms is None:
            self._refresh_reference(job)
            return
        remaining = (job.deadline - now) * 1000
        decision = admit(
            self.cost,
            steps=job.plan.steps if self.policy == "reject" else spec.steps,
            has_edits=bool(spec.edits),
            pixels=spec.height * spec.width,
            ahead_ms=0.0,
            budget_ms=max(remaining, 0.0),
            policy=self.policy,
            limits=self.limits,
            reference_steps_for=self.reference_steps_for(spec),
        )
        if self.policy == "degrade":
            # Never run more than admitted (the admitted plan may already be degraded).
            if (decision.plan.steps, decision.plan.guided_steps) > (job.plan.steps, job.plan.guided_steps):
                self._refresh_reference(job)
            else:
                job.plan = decision.plan
            job.degraded = degradation_of(spec, job.plan) is not None
        else:
            job.plan = Plan(job.plan.steps, job.plan.guided_steps, job.plan.schedule, decision.plan.reference_steps)

    def _next_batch(self):
        """Pop the earliest-deadline job that can still run, then the queued jobs of the same shape
        (earliest deadlines first) while the batch's predicted time meets every member's deadline."""
        while self.queue:
            now = time.monotonic()
            _, _, head = heapq.heappop(self.queue)
            if not head.future.set_running_or_notify_cancel():  # its client went away
                self._count("cancelled")
                continue
            try:
                self._replan(head, now)
            except Exception as e:
                if not isinstance(e, Rejected):
                    head.future.set_exception(e)
                    self._count("error")
                    continue
                late = (now - head.arrival) * 1000
                head.future.set_exception(
                    Rejected(503, f"deadline passed while queued ({late:.0f} ms waited): {e.detail['message']}", queued_ms=round(late, 1))
                )
                self._count("expired", latency_s=now - head.arrival)
                if self.metrics is not None:
                    self.metrics.deadline_miss()
                continue
            batch, chosen_cancelled = [head], []
            key = self._batch_key(head)
            pixels = head.spec.height * head.spec.width
            for item in sorted(self.queue, key=lambda e: e[:2]):
                if len(batch) >= self.limits.max_batch:
                    break
                job = item[2]
                self._refresh_reference(job)  # the cache may have changed since it was admitted
                if self._batch_key(job) != key:
                    continue
                p = head.plan
                predicted = self.cost.call_ms(len(batch) + 1, pixels, p.steps, p.guided_steps, p.reference_steps)
                if any(j.spec.budget_ms is not None and now + predicted / 1000 > j.deadline for j in batch + [job]):
                    continue
                if job.future.set_running_or_notify_cancel():
                    batch.append(job)
                else:
                    chosen_cancelled.append(job)
            if len(batch) > 1 or chosen_cancelled:
                chosen = {id(j) for j in batch + chosen_cancelled}
                self.queue = [e for e in self.queue if id(e[2]) not in chosen]
                heapq.heapify(self.queue)
            return batch
        return None

    def _loop(self):
        while True:
            with self.cond:
                while not self.queue and not self.closing:
                    self.cond.wait()
                if not self.queue and self.closing:
                    return
                batch = self._next_batch()
                if not batch:
                    continue
                p = batch[0].plan
                predicted = self.cost.call_ms(len(batch), batch[0].spec.height * batch[0].spec.width, p.steps, p.guided_steps, p.reference_steps)
                self.running = (time.monotonic(), predicted, batch)
            try:
                self._run_batch(batch)
            except BaseException as e:  # never leave a request unanswered, whatever happened
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(e)
                if not isinstance(e, Exception):
                    raise
            finally:
                with self.cond:
                    self.running = None

    # -- running --------------------------------------------------------------------------------

    def _run_batch(self, batch):
        start = time.monotonic()
        try:
            outputs = self._call(batch)
        except Exception as error:
            if len(batch) == 1:
                job = batch[0]
                job.future.set_exception(error)
                self._count("error", latency_s=time.monotonic() - job.arrival)
                self.log(f"request failed: {type(error).__name__}: {error}")
                return
            # One bad request must not fail the others: run each alone.
            for job in batch:
                self._run_batch([job])
            return
        elapsed_ms = (time.monotonic() - start) * 1000
        head = batch[0]
        pixels = head.spec.height * head.spec.width
        p = head.plan
        self.cost.observe_call(len(batch), pixels, p.steps, p.guided_steps, p.reference_steps, elapsed_ms)
        self.batches += 1
        if self.metrics is not None:
            self.metrics.batch_done(len(batch), p.steps * len(batch), p.guided_steps * len(batch), p.reference_steps * len(batch))
        done = time.monotonic()
        images, hits = outputs
        for job, image, hit in zip(batch, images, hits):
            missed = job.spec.budget_ms is not None and done > job.deadline
            total_ms = (done - job.arrival) * 1000
            result = Result(
                image=image,
                spec=job.spec,
                plan=job.plan,
                degraded=job.degraded,
                degradation=degradation_of(job.spec, job.plan),
                timings={
                    "queue_ms": round((start - job.arrival) * 1000, 1),
                    "run_ms": round(elapsed_ms, 1),
                    "total_ms": round(total_ms, 1),
                    "predicted_ms": round(job.predicted_ms, 1),
                    "budget_ms": job.spec.budget_ms,
                },
                cache_hit=hit,
                batch_size=len(batch),
                deadline_missed=missed,
            )
            if missed and self.metrics is not None:
                self.metrics.deadline_miss()
            self._count("degraded" if result.degradation else "ok", latency_s=done - job.arrival)
            job.future.set_result(result)

    def _call(self, batch):
        """One pipeline call for the batch. Returns (images, cache hit per job)."""
        sg = self.sg
        head = batch[0]
        spec, plan = head.spec, head.plan
        kwargs = dict(
            height=spec.height,
            width=spec.width,
            num_inference_steps=plan.steps,
            guidance_scale=spec.guidance_scale,
            negative_prompt=[j.spec.negative_prompt for j in batch] if spec.negative_prompt is not None else None,
            output_type="pil",
        )
        prompts = [j.spec.prompt for j in batch]
        keys = [j.trace_key(self.model) for j in batch]
        if not spec.edits:
            out = sg(prompts, latents=seeded_latents(self.pipe, [j.spec.seed for j in batch], spec.height, spec.width), **kwargs)
            traces = out.trace if isinstance(out.trace, list) else [out.trace]
            for key, trace in zip(keys, traces):
                if trace is not None:
                    self.cache.put(key, trace)
            return out.images, [False] * len(batch)
        needs_reference = any(e.needs_reference for j in batch for e in j.spec.edits)
        traces = [self.cache.get(k) for k in keys] if needs_reference else [None] * len(batch)
        hits = [t is not None for t in traces]
        if self.metrics is not None:
            self.metrics.cache(sum(hits), len(hits) - sum(hits) if needs_reference else 0)
        edit_kwargs = dict(
            edits=[j.spec.edits for j in batch],
            self_guidance_scale=spec.self_guidance_scale,
            normalize_gradient=spec.normalize_gradient,
            guidance_schedule=None if plan.schedule is None else list(plan.schedule),
        )
        if needs_reference and all(hits):
            out = sg(prompts, trace=traces if len(batch) > 1 else traces[0], **edit_kwargs, **kwargs)
            return out.images, hits
        # Not every trace is cached: run the reference pass for the whole call (same seeds), keep its traces.
        latents = seeded_latents(self.pipe, [j.spec.seed for j in batch], spec.height, spec.width)
        out = sg(prompts, latents=latents, **edit_kwargs, **kwargs)
        new = out.trace if isinstance(out.trace, list) else [out.trace]
        if needs_reference:
            for key, trace, hit in zip(keys, new, hits):
                if trace is not None and not hit:
                    self.cache.put(key, trace)
        return out.images, hits
