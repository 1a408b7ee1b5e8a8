"""Iteration-level batching (Orca's iteration-level scheduling, vLLM's continuous batching, for a
denoising loop): the engine's scheduler batches per denoising step instead of per request.

At every iteration the worker runs, for each image size among the active requests, one UNet call for
every request at an unguided step (each at its own timestep) and one guided pass for those at guided
steps (`sgfast.serve.steps`); between iterations it retires finished requests (decode, answer, cache
the trace) and admits queued ones, earliest deadline first, up to `--max-batch` active requests. A
request arriving one step after others started joins them at the next step instead of waiting for
them to finish. Admission, degradation, the EDF queue, the trace cache, cancellation and shutdown are
the engine's (`sgfast.serve.engine`); `--scheduler request` falls back to request-level batching.
"""

import time
from concurrent.futures import CancelledError

from sgfast.serve.admission import ShuttingDown
from sgfast.serve.engine import SHUTDOWN_RETRY_S, Engine
from sgfast.serve.jobs import result_of
from sgfast.serve.steps import Run, guided_step, unguided_step


class IterationEngine(Engine):
    """The engine with the iteration-level scheduler (same API as `Engine`)."""

    scheduler = "iteration"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.active = []  # Runs in progress, in admission order
        self.iterations = 0

    def _loop(self):
        while True:
            with self.cond:
                while not self.queue and not self.active and not self.closing:
                    self.cond.wait()
                if not self.queue and not self.active and self.closing:
                    return
                for run in [r for r in self.active if r.job.abandoned]:  # clients gone, or stopped
                    run.job.answer(error=CancelledError("the request was cancelled while it ran"))
                self.active = [r for r in self.active if not r.job.abandoned]
                joining = self._admit_to_active()
                self.running = (time.monotonic(), self._remaining_ms(), [r.job for r in self.active] + joining)
            self.active += [run for run in map(self._start, joining) if run is not None]
            try:
                if self.active:
                    self._iterate()
            except BaseException as e:  # never leave a request unanswered, whatever happened
                for run in self.active:
                    run.job.answer(error=e if isinstance(e, Exception) else RuntimeError(f"the worker stopped: {type(e).__name__}"))
                self.active = []
                if not isinstance(e, Exception):
                    raise
            finally:
                with self.cond:
                    self.running = None

    def _admit_to_active(self):
        """Queued jobs to start now (EDF), up to the cap on active requests, while every budgeted
        request already running is still predicted to meet its deadline with one more beside it."""
        joining = []
        while self.queue and len(self.active) + len(joining) < self.limits.max_batch:
            if (self.active or joining) and not self._fits(joining + [self.queue[0][2]]):
                break  # later deadlines would hurt as much: wait for a request to finish
            job = self._pop_head()
            if job is None:
                break
            if self._past_stop(job.cost_ms):
                job.answer(error=ShuttingDown("the server is stopping and this request would not finish before it stops", retry_after_s=SHUTDOWN_RETRY_S))
                continue
            joining.append(job)
        return joining

    def _fits(self, joining):
        """Whether the active requests plus `joining` (jobs) all meet their deadlines, as the cost
        model predicts steps at that many requests per UNet call."""
        now, n = time.monotonic(), len(self.active) + len(joining)
        pixels = {r.size[0] * r.size[1] for r in self.active} | {j.spec.height * j.spec.width for j in joining}
        plain_ms = max(self.cost.ms("plain", n, p) for p in pixels)
        guided_ms = max(self.cost.ms("guided", n, p) for p in pixels)
        left = [(r.job, r.steps_left(), r.guided_left()) for r in self.active]
        left += [(j, j.plan.steps + j.plan.reference_steps, j.plan.guided_steps) for j in joining]
        for job, steps, guided in left:
            if job.spec.budget_ms is not None and now + ((steps - guided) * plain_ms + guided * guided_ms) / 1000 > job.deadline:
                return False
        return True

    def _remaining_ms(self):
        """Predicted time until the active requests are done (for the queue-ahead estimate)."""
        left = 0.0
        for run in self.active:
            total = run.job.plan.steps + run.job.plan.reference_steps
            left = max(left, run.job.cost_ms * (1 - run.steps_run / max(total, 1)))
        return left

    def _start(self, job):
        """A Run for `job` (its prompt encoded, its reference trace looked up), or None if it failed.
        A photo edit (inversion, then the edit) runs whole here, between two iterations, and answers."""
        if job.spec.photo is not None:
            self._run_batch([job])
            return None
        try:
            reference = None
            if any(e.needs_reference for e in job.spec.edits):
                reference = self.cache.get(job.trace_key(self.model))
                if self.metrics is not None:
                    self.metrics.cache(int(reference is not None), int(reference is None))
            run = Run(self.sg, job, reference)
        except Exception as e:
            job.answer(error=e)
            return None
        run.started, run.cache_hit, run.peak = time.monotonic(), reference is not None, 1
        return run

    def _iterate(self):
        """One step of every active request, then retire the finished ones."""
        self.iterations += 1
        groups = {}
        for run in self.active:
            groups.setdefault(run.size, []).append(run)
        with self.sg.capture() as capture:
            for (height, width), runs in groups.items():
                plain = [r for r in runs if not r.at_guided_step]
                guided = [r for r in runs if r.at_guided_step]
                if plain:
                    self._step(unguided_step, plain, capture, "plain", height * width)
                if guided:
                    self._step(guided_step, guided, capture, "guided", height * width)
        for run in [r for r in self.active if r.finished or r.failed]:
            self.active.remove(run)
            if not run.failed:
                self._finish(run)

    def _step(self, step, runs, capture, kind, pixels):
        """Run `step` on `runs` together; if it fails, on each alone, so one bad request fails alone."""
        for run in runs:
            run.peak = max(run.peak, len(runs))
        start = time.monotonic()
        try:
            finished = step(runs, capture)
        except Exception as error:
            if len(runs) == 1:
                runs[0].failed = True
                runs[0].job.answer(error=error)
                self.log(f"request failed: {type(error).__name__}: {error}")
                return
            for run in runs:
                self._step(step, [run], capture, kind, pixels)
            return
        self.cost.observe(kind, len(runs), pixels, (time.monotonic() - start) * 1000)
        if self.metrics is not None:
            self.metrics.batch_done(len(runs), len(runs), len(runs) if kind == "guided" else 0, 0)
        for run, trace in finished or []:  # reference passes that just ended: later edits reuse them
            self.cache.put(run.job.trace_key(self.model), trace)

    def _finish(self, run):
        job = run.job
        try:
            image = run.image()
        except Exception as e:
            job.answer(error=e)
            return
        if run.trace is not None and not run.edits:  # a plain generation seeds the cache too
            self.cache.put(job.trace_key(self.model), run.trace)
        done = time.monotonic()
        result = result_of(job, image, run.cache_hit, run.started, (done - run.started) * 1000, run.peak, done)
        if job.answer(result) and result.deadline_missed and self.metrics is not None:
            self.metrics.deadline_miss()
        self.batches += 1
