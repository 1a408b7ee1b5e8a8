"""The serving engine behind `python -m sgfast serve`: one worker thread owning the model, the
earliest-deadline-first queue and the scheduler that batches queued requests of the same shape.

It has no web dependency: `sgfast.serve.app` puts FastAPI in front of it, `sgfast.serve.ray_serve`
Ray Serve. What it uses: the cost model (`sgfast.serve.cost`), admission and degradation against each
request's budget (`sgfast.serve.admission`), the reference-trace cache (`sgfast.serve.cache`).

    engine = Engine(sg, model="tiny", cost=CostModel.calibrate(sg), policy="degrade")
    engine.start()
    job = engine.submit(Spec(prompt="a red circle and a blue square", edits=[move("circle", dx=0.25)],
                             edit_specs=[...], seed=0, steps=20, budget_ms=2000))
    result = job.future.result()     # Result: image, steps and guided steps run, timings, degradation
    engine.cancel(job)               # its client went away: dropped from the queue, or from its batch
    engine.shutdown(drain=True, timeout=30)   # answers every request within the deadline

A request is admitted on arrival (against the work queued ahead) and planned again on dispatch.
"""

import heapq
import itertools
import math
import threading
import time
from concurrent.futures import CancelledError, Future

import torch

from sgfast.serve.admission import POLICIES, Expired, Limits, Plan, Rejected, ShuttingDown, admit, degradation_of, model_guided
from sgfast.serve.cache import TraceCache, call_photo_edit, call_pipeline
from sgfast.serve.cost import CostModel
from sgfast.serve.jobs import Abandoned, Job, denoiser, native_size, reference_steps, result_of

SHUTDOWN_RETRY_S = 5  # Retry-After of requests answered 503 because the server stopped
NO_BUDGET_MS = 3_600_000.0  # requests without a budget are ordered as if due in an hour (FIFO among themselves)


class Engine:
    """The single worker that owns the model, its EDF queue, the trace cache and the cost model.
    `metrics`: an object with the hooks of `sgfast.serve.metrics.Metrics` (or None)."""

    scheduler = "request"  # request-level batching; sgfast.serve.iteration.IterationEngine batches per step

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
        self.native = native_size(self.pipe)
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
        self.stop_at = None  # time.monotonic() by which a shutting-down engine has answered everything
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
        """steps -> the reference pass steps a plan needs (`jobs.reference_steps`)."""
        return reference_steps(spec, self.cache, self.model)

    def guided_steps_for(self, spec):
        """steps -> the step indices guided for `spec` (`admission.model_guided`)."""
        return model_guided(getattr(self.sg, "settings", None), spec)

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
            guided_for = self.guided_steps_for(spec)
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
                guided_for=guided_for,
                batch=self._admission_batch(),
            )
            plan = decision.plan
            job = Job(spec, plan, now, deadline, decision.predicted_ms, decision.degraded, next(self.seq), guided_for=guided_for)
            job.cost_ms = decision.predicted_ms - ahead
            heapq.heappush(self.queue, (deadline, job.seq, job))
            self.admitted += 1
            self.cond.notify()
        return job

    def cancel(self, job):
        """Drop a request whose client went away: a queued one leaves the queue; a running one is
        dropped from its batch at the next step where the scheduler can (request-level batching: the
        call stops when every request of its batch has gone). Returns "queued", "running" or None."""
        with self.cond:
            job.abandoned = True
            for i, entry in enumerate(self.queue):
                if entry[2] is job:
                    self.queue[i] = self.queue[-1]
                    self.queue.pop()
                    heapq.heapify(self.queue)
                    job.future.cancel()
                    return "queued"
            return "running" if not job.future.done() else None

    def begin_shutdown(self, drain=True, deadline_s=None):
        """Stop taking requests and answer every one within `deadline_s` (None: no deadline). `drain`:
        run queued requests that can finish by then; the rest, and any still running at the deadline,
        are answered 503 (ShuttingDown, with Retry-After). Returns at once."""
        with self.cond:
            self.closing = True
            self.drain = self.drain and drain
            if deadline_s is not None:
                stop_at = time.monotonic() + max(deadline_s, 0.0)
                self.stop_at = stop_at if self.stop_at is None else min(self.stop_at, stop_at)
            if not self.drain:
                self._cancel_queued()
            self.cond.notify_all()
        if deadline_s is not None:
            timer = threading.Timer(max(self.stop_at - time.monotonic(), 0.0), self._stop_now)
            timer.daemon = True
            timer.start()

    def shutdown(self, drain=True, timeout=None):
        """Stop taking requests and wait for the worker, at most `timeout` seconds: `begin_shutdown`
        with that deadline. Every request gets an answer (a result, or 503 ShuttingDown)."""
        self.begin_shutdown(drain, timeout)
        if self.thread is not None and self.thread is not threading.current_thread():
            left = None if self.stop_at is None else max(self.stop_at - time.monotonic(), 0.0) + 1.0
            self.thread.join(left)
        self._stop_now()

    def _stop_now(self):
        """The shutdown deadline: answer what is queued and what is running with 503."""
        with self.cond:
            self._cancel_queued()
            running = self.running[2] if self.running is not None else []
            for job in running:
                job.abandoned = True
                job.answer(error=ShuttingDown("the server stopped before this request finished", retry_after_s=SHUTDOWN_RETRY_S))
            self.cond.notify_all()

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

    def _admission_batch(self):
        """The batch size whose step times a request is planned with: 1 here (request-level batches
        form at dispatch, and only a batch whose time meets every member's deadline runs)."""
        return 1

    def _cancel_queued(self):
        while self.queue:
            _, _, job = heapq.heappop(self.queue)
            job.answer(error=ShuttingDown("the server shut down before this request ran", retry_after_s=SHUTDOWN_RETRY_S))

    def _batch_key(self, job):
        s, p = job.spec, job.plan
        return (
            s.height, s.width, p.steps, s.guidance_scale, s.negative_prompt, bool(s.edits),
            s.self_guidance_scale if s.edits else None, s.normalize_gradient if s.edits else None,
            p.schedule if s.edits else None, p.reference_steps > 0,
            None if s.photo is None else id(s.photo),  # a photo edit runs alone
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
            guided_for=job.guided_for,
            batch=self._admission_batch(),
        )
        if self.policy == "degrade":
            # Never run more than admitted (the admitted plan may already be degraded).
            if (decision.plan.steps, decision.plan.guided_steps) > (job.plan.steps, job.plan.guided_steps):
                self._refresh_reference(job)
            else:
                job.plan = decision.plan
            job.degraded = degradation_of(spec, job.plan, job.guided_for) is not None
        else:
            job.plan = Plan(job.plan.steps, job.plan.guided_steps, job.plan.schedule, decision.plan.reference_steps)

    def _pop_head(self):
        """Pop the earliest-deadline job that can still run, replanned against the time it has left;
        those whose client went away are dropped, those whose deadline passed are answered 503."""
        while self.queue:
            now = time.monotonic()
            _, _, head = heapq.heappop(self.queue)
            if not head.future.set_running_or_notify_cancel():  # its client went away
                continue
            try:
                self._replan(head, now)
            except Exception as e:
                if not isinstance(e, Rejected):
                    head.answer(error=e)
                    continue
                late = (now - head.arrival) * 1000
                head.answer(error=Expired(f"deadline passed while queued ({late:.0f} ms waited): {e.detail['message']}", queued_ms=round(late, 1)))
                if self.metrics is not None:
                    self.metrics.deadline_miss()
                continue
            return head
        return None

    def _next_batch(self):
        """Pop the earliest-deadline job that can still run, then the queued jobs of the same shape
        (earliest deadlines first) while the batch's predicted time meets every member's deadline."""
        head = self._pop_head()
        if head is None:
            return None
        now = time.monotonic()
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
                if self._past_stop(predicted):
                    for job in batch:
                        job.answer(error=ShuttingDown("the server is stopping and this request would not finish before it stops", retry_after_s=SHUTDOWN_RETRY_S))
                    continue
                self.running = (time.monotonic(), predicted, batch)
            try:
                self._run_batch(batch)
            except BaseException as e:  # never leave a request unanswered, whatever happened
                for job in batch:
                    job.answer(error=e if isinstance(e, Exception) else RuntimeError(f"the worker stopped: {type(e).__name__}"))
                if not isinstance(e, Exception):
                    raise
            finally:
                with self.cond:
                    self.running = None

    def _past_stop(self, predicted_ms):
        """Whether work predicted to take `predicted_ms` would end after the shutdown deadline."""
        return self.stop_at is not None and time.monotonic() + predicted_ms / 1000 > self.stop_at

    # -- running --------------------------------------------------------------------------------

    def _run_batch(self, batch):
        start = time.monotonic()
        try:
            outputs = self._call(batch)
        except Abandoned:
            self.log(f"stopped a batch of {len(batch)}: every request of it had gone")
            for job in batch:
                job.answer(error=CancelledError("the request was cancelled while it ran"))
            return
        except Exception as error:
            if len(batch) == 1:
                batch[0].answer(error=error)
                self.log(f"request failed: {type(error).__name__}: {error}")
                return
            # One bad request must not fail the others: run each alone.
            for job in batch:
                if not job.abandoned:
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
            self._deliver(job, image, hit, start, elapsed_ms, len(batch), done)

    def _deliver(self, job, image, hit, start, elapsed_ms, batch_size, done):
        result = result_of(job, image, hit, start, elapsed_ms, batch_size, done)
        if job.answer(result) and result.deadline_missed and self.metrics is not None:
            self.metrics.deadline_miss()

    def _call(self, batch):
        """One pipeline call for the batch. Returns (images, cache hit per job). Stops (Abandoned) at
        the next UNet call once every request of the batch has gone."""

        def stop_if_abandoned(module, args):
            if all(j.abandoned for j in batch):
                raise Abandoned()

        hook = denoiser(self.pipe).register_forward_pre_hook(stop_if_abandoned)
        try:
            if batch[0].spec.photo is not None:
                return call_photo_edit(self.sg, batch[0])
            return call_pipeline(self.sg, self.cache, self.model, batch, self.metrics)
        finally:
            hook.remove()
