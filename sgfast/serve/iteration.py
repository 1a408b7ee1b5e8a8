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

import heapq
import math
import time
from concurrent.futures import CancelledError

from sgfast.serve.admission import ShuttingDown
from sgfast.serve.engine import SHUTDOWN_RETRY_S, Engine
from sgfast.serve.jobs import result_of
from sgfast.serve.steps import Run, decode, guided_step, unguided_step


class IterationEngine(Engine):
    """The engine with the iteration-level scheduler (same API as `Engine`)."""

    scheduler = "iteration"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.active = []  # Runs in progress, in admission order
        self.iterations = 0
        self.device = None  # the pipeline's execution device (the worker's model does not move)

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
        """Queued jobs to start now (EDF), up to the cap on active requests, while no budgeted request
        running that is predicted to meet its deadline would miss it with one more beside it."""
        joining = []
        while self.queue and len(self.active) + len(joining) < self.limits.max_batch:
            head = self.queue[0][2]
            if self.active or joining:
                try:  # planned again for the time it has left (maybe degraded) before it is weighed
                    self._replan(head, time.monotonic())
                except Exception:
                    pass  # _pop_head answers it
                if not self._fits(joining, head):
                    break  # later deadlines would hurt as much: wait for a request to finish
            job = self._pop_head()
            if job is None:
                break
            if self._past_stop(job.cost_ms):
                job.answer(error=ShuttingDown("the server is stopping and this request would not finish before it stops", retry_after_s=SHUTDOWN_RETRY_S))
                continue
            joining.append(job)
        return joining

    def _fits(self, joining, job):
        """Whether `job` may join the active requests and `joining` (jobs): no budgeted one of them
        that is predicted to meet its deadline would miss it with one more request per step. One
        already predicted to miss is not protected (holding the queue for it would make everyone
        later and save nothing), nor is `job` held for its own deadline (waiting only adds to it)."""
        now, n = time.monotonic(), len(self.active) + len(joining)
        pixels = {r.size[0] * r.size[1] for r in self.active} | {j.spec.height * j.spec.width for j in joining}
        left = [(r.job, r.steps_left(), r.guided_left()) for r in self.active]
        left += [(j, j.plan.steps + j.plan.reference_steps, j.plan.guided_steps) for j in joining]

        def meets(running, steps, guided, batch, sizes):
            plain_ms, guided_ms = (max(ms) for ms in zip(*(self._step_times(batch, p) for p in sizes)))
            return now + ((steps - guided) * plain_ms + guided * guided_ms) / 1000 <= running.deadline

        wider = pixels | {job.spec.height * job.spec.width}
        for running, steps, guided in left:
            if running.spec.budget_ms is None:
                continue
            if meets(running, steps, guided, n, pixels) and not meets(running, steps, guided, n + 1, wider):
                return False
        return True

    def _admission_batch(self):
        """Requests are planned at the step times of the batch they will run in: the active ones,
        those queued, and themselves, up to the cap."""
        return max(1, min(self.limits.max_batch, len(self.active) + len(self.queue) + 1))

    def _ahead_ms(self, deadline, now):
        """(time until a request due at `deadline` gets a place among the active requests, its slack:
        how much later the queued requests due after it may start before one is predicted to miss).
        Up to `max_batch` requests run side by side, every step at the time of a step of that batch:
        each active run frees its place when its steps are done, and queued jobs take the earliest
        free place in EDF order, as `_admit_to_active` gives them."""
        batch = self._admission_batch()
        places = [self._run_ms(r.steps_left(), r.guided_left(), r.size, batch) for r in list(self.active)]
        places += [0.0] * max(self.limits.max_batch - len(places), 0)
        heapq.heapify(places)
        ahead, slack = None, math.inf
        for d, _, job in sorted(self.queue, key=lambda e: e[:2]):
            if d > deadline and ahead is None:
                ahead = places[0]  # this request takes the next free place; the later jobs come after it
            start = heapq.heappop(places)
            p = job.plan
            done = start + self._run_ms(p.steps + p.reference_steps, p.guided_steps, (job.spec.height, job.spec.width), batch)
            heapq.heappush(places, done)
            if d > deadline and job.spec.budget_ms is not None:
                left = (d - now) * 1000 - done
                if left >= 0:
                    slack = min(slack, left)
        return (places[0] if ahead is None else ahead), slack

    def _run_ms(self, steps, guided, size, batch):
        plain_ms, guided_ms = self._step_times(batch, size[0] * size[1])
        return (steps - guided) * plain_ms + guided * guided_ms

    def _step_times(self, n, pixels):
        """(ms of a plain step, ms of a guided step) of a run among `n` active ones. A run waits for the
        whole iteration (the plain call and the guided pass), so once iterations of `n` or more runs
        have been timed neither is taken as less than an iteration at `n` (not extrapolated upwards:
        from one small batch that would be a guess)."""
        plain, guided = self.cost.ms("plain", n, pixels), self.cost.ms("guided", n, pixels)
        if self.cost.largest_batch("iteration") < n:
            return plain, guided
        iteration = self.cost.ms("iteration", n, pixels)
        return max(plain, iteration), max(guided, iteration)

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
            if self.device is None:  # looked up once: diffusers' lookup walks every module
                self.device = self.pipe._execution_device
            run = Run(self.sg, job, reference, self.device)
        except Exception as e:
            job.answer(error=e)
            return None
        run.started, run.cache_hit, run.peak = time.monotonic(), reference is not None, 1
        return run

    def _stepping(self):
        """The active runs that take a step this iteration: all of them, unless a budgeted run that
        would meet its deadline among the budgeted runs alone is predicted to miss it among all; then
        the fewest runs without a budget pause (the latest admitted first; their deadline is an hour
        away) for it to meet its deadline, until it is safe again."""
        budgeted = [r for r in self.active if r.job.spec.budget_ms is not None]
        free = [r for r in self.active if r.job.spec.budget_ms is None]
        if not budgeted or not free:
            return self.active
        now = time.monotonic()

        def meets(run, n):
            return now + self._run_ms(run.steps_left(), run.guided_left(), run.size, n) / 1000 <= run.job.deadline

        savable = [r for r in budgeted if meets(r, len(budgeted))]
        keep = len(free)
        while keep and not all(meets(r, len(budgeted) + keep) for r in savable):
            keep -= 1
        return self.active if keep == len(free) else budgeted + free[:keep]

    def _iterate(self):
        """One step of every active request that is not paused (`_stepping`), then retire the
        finished ones."""
        self.iterations += 1
        stepping = self._stepping()
        start, n = time.monotonic(), len(stepping)
        groups = {}
        for run in stepping:
            groups.setdefault(run.size, []).append(run)
        with self.sg.capture() as capture:
            for (height, width), runs in groups.items():
                plain = [r for r in runs if not r.at_guided_step]
                guided = [r for r in runs if r.at_guided_step]
                if plain:
                    # The guided runs' unconditional rows ride in the plain call: one UNet call fewer.
                    self._step(unguided_step, plain, capture, "plain", height * width, uncond_for=guided)
                if guided:
                    self._step(guided_step, guided, capture, "guided", height * width)
        self.cost.observe("iteration", n, max(h * w for h, w in groups), (time.monotonic() - start) * 1000)
        done = [r for r in self.active if r.finished or r.failed]
        self.active = [r for r in self.active if r not in done]
        self._finish([r for r in done if not r.failed])

    def _step(self, step, runs, capture, kind, pixels, uncond_for=()):
        """Run `step` on `runs` together; if it fails, on each alone, so one bad request fails alone."""
        for run in runs:
            run.peak = max(run.peak, len(runs) + len(uncond_for))
        borrowed = any(r.uncond_noise[:2] == (r.phase, r.i) for r in runs if r.do_cfg)
        start = time.monotonic()
        try:
            finished = step(runs, capture, uncond_for=uncond_for) if uncond_for else step(runs, capture)
        except Exception as error:
            if len(runs) == 1 and not uncond_for:
                runs[0].failed = True
                runs[0].job.answer(error=error)
                self.log(f"request failed: {type(error).__name__}: {error}")
                return
            for run in runs:
                self._step(step, [run], capture, kind, pixels)
            return
        # A merged call's extra unconditional rows count as half a request each (a CFG request has two
        # rows); a guided pass that took them from it is not a full guided step and is not timed.
        extra = sum(r.do_cfg for r in uncond_for)
        if kind == "plain" or not borrowed:
            self.cost.observe(kind, len(runs) + math.ceil(extra / 2), pixels, (time.monotonic() - start) * 1000)
        if self.metrics is not None:
            self.metrics.batch_done(len(runs), len(runs), len(runs) if kind == "guided" else 0, 0)
        for run, trace in finished or []:  # reference passes that just ended: later edits reuse them
            self.cache.put(run.job.trace_key(self.model), trace)

    def _finish(self, runs):
        """Decode the finished runs (one VAE call per image size; alone if that fails) and answer them."""
        by_size = {}
        for run in runs:
            by_size.setdefault(run.size, []).append(run)
        for group in by_size.values():
            try:
                images = decode(group)
            except Exception:
                images = [None] * len(group)
            for run, image in zip(group, images):
                self._deliver_run(run, image)

    def _deliver_run(self, run, image=None):
        job = run.job
        try:
            image = image if image is not None else run.image()
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
