"""Iteration-level batching (`sgfast.serve.iteration`): requests joining and leaving between steps,
each at its own timestep in a shared UNet call, give the library's image for each request alone; the
engine's promises (EDF, cache, cancellation, failures, shutdown) hold under it. Tiny pipeline, CPU."""

import threading
import time
from concurrent.futures import CancelledError

import numpy as np
import pytest
import torch

from sgfast import SelfGuidancePipeline, move, resize
from sgfast.edits import Edit
from sgfast.serve.admission import Limits, Plan, ShuttingDown
from sgfast.serve.cost import CostModel
from sgfast.serve.iteration import IterationEngine
from sgfast.serve.jobs import Job, Spec
from sgfast.serve.steps import Run, guided_step, unguided_step
from sgfast.testing import tiny_pipeline

PROMPT = "a red circle and a blue square"
WAIT = 60


@pytest.fixture(scope="module")
def tiny_sg():
    return SelfGuidancePipeline.from_pipe(tiny_pipeline(seed=0))


class Pause:
    """Holds the worker inside its next UNet call until `go` (a forward pre-hook on the UNet)."""

    def __init__(self, unet):
        self.entered, self.go, self.calls = threading.Event(), threading.Event(), 0
        self.armed = False
        self.hook = unet.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.calls += 1
        if self.armed:
            self.armed = False
            self.entered.set()
            assert self.go.wait(WAIT)

    def hold(self):
        self.entered.clear()
        self.go.clear()
        self.armed = True

    def remove(self):
        self.go.set()
        self.hook.remove()


@pytest.fixture
def engine(tiny_sg):
    engine = IterationEngine(tiny_sg, model="tiny", cost=CostModel.fixed(1, 2, 1), limits=Limits(min_steps=1, max_batch=4), threads=1)
    engine.start()
    pause = Pause(tiny_sg.pipe.unet)
    engine.pause = pause
    yield engine
    pause.remove()
    engine.shutdown(drain=False, timeout=WAIT)


def library_image(sg, prompt, seed, steps, **kw):
    return sg(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), **kw).images[0]


def assert_same_image(a, b):
    # Equal up to float summation order (rows batched with others, timesteps as a tensor).
    diff = np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))
    assert diff.max() <= 2, diff.max()


def test_requests_joining_mid_run_match_the_library_alone(engine, tiny_sg):
    pause = engine.pause
    pause.hold()
    first = engine.submit(Spec(prompt=PROMPT, seed=1, steps=6))
    assert pause.entered.wait(WAIT)  # the first request is inside its first step
    specs = [
        Spec(prompt="a red circle", seed=2, steps=4),
        Spec(prompt=PROMPT, seed=3, steps=5, edits=[move("circle", dx=0.25)]),
        Spec(prompt="a blue square", seed=4, steps=4, guidance_scale=1.0),  # no classifier-free guidance
        Spec(prompt=PROMPT, seed=5, steps=4, edits=[resize("square", 1.5)], normalize_gradient=True, self_guidance_scale=0.8),
    ]
    later = [engine.submit(s) for s in specs]
    pause.go.set()
    results = [j.future.result(WAIT) for j in [first] + later]
    # They ran together, at different steps of their own schedules.
    assert results[0].batch_size >= 2 and max(r.batch_size for r in results[1:]) >= 2
    assert_same_image(results[0].image, library_image(tiny_sg, PROMPT, 1, 6))
    for spec, result in zip(specs, results[1:]):
        kw = dict(guidance_scale=spec.guidance_scale)
        if spec.edits:
            kw.update(edits=spec.edits, normalize_gradient=spec.normalize_gradient, self_guidance_scale=spec.self_guidance_scale)
        assert_same_image(result.image, library_image(tiny_sg, spec.prompt, spec.seed, spec.steps, **kw))
        assert result.plan.reference_steps == (spec.steps if spec.edits else 0)


def test_trace_cache_and_degraded_schedules(engine, tiny_sg):
    edit = [move("circle", dx=-0.2)]
    first = engine.submit(Spec(prompt=PROMPT, seed=7, steps=4, edits=edit)).future.result(WAIT)
    assert not first.cache_hit and engine.cache.peek(("tiny", PROMPT, None, 7, 4, 64, 64, 7.5))
    second = engine.submit(Spec(prompt=PROMPT, seed=7, steps=4, edits=[resize("circle", 2.0)])).future.result(WAIT)
    assert second.cache_hit and second.plan.reference_steps == 0
    assert_same_image(second.image, library_image(tiny_sg, PROMPT, 7, 4, edits=[resize("circle", 2.0)]))
    plain = engine.submit(Spec(prompt="a red circle", seed=8, steps=3)).future.result(WAIT)
    assert plain.image.size == (64, 64) and engine.cache.peek(("tiny", "a red circle", None, 8, 3, 64, 64, 7.5))
    # The plain generation's own recorded trace is a good reference: editing that image matches the library.
    edited = engine.submit(Spec(prompt="a red circle", seed=8, steps=3, edits=[move("circle", dx=0.3)])).future.result(WAIT)
    assert edited.cache_hit
    assert_same_image(edited.image, library_image(tiny_sg, "a red circle", 8, 3, edits=[move("circle", dx=0.3)]))


def run_of(sg, spec, reference=None):
    return Run(sg, Job(spec, Plan(spec.steps, 0), 0.0, 0.0, 0.0, False, 0), reference)


def test_a_batched_guided_step_gives_each_request_its_result_alone(tiny_sg):
    # Three edited requests at different guided steps (one without classifier-free guidance) and a
    # plain one: run together (the guided runs' unconditional rows in the plain call, one guided pass
    # for the three) and each alone, from the same state; every request's latents agree.
    steps = 6
    recorder = run_of(tiny_sg, Spec(prompt=PROMPT, seed=3, steps=steps))
    with tiny_sg.capture() as capture:
        while not recorder.finished:
            unguided_step([recorder], capture)
    specs = [
        Spec(prompt=PROMPT, seed=3, steps=steps, edits=[move("circle", dx=0.25)]),
        Spec(prompt=PROMPT, seed=3, steps=steps, edits=[resize("square", 1.5)]),
        Spec(prompt=PROMPT, seed=3, steps=steps, edits=[move("square", dy=-0.2)], guidance_scale=1.0),
        Spec(prompt="a blue square", seed=4, steps=steps),
    ]
    at = [0, 1, 3, 2]  # guided steps of the default schedule at 6 steps: 0, 1 and 3

    def runs():
        out = [run_of(tiny_sg, spec, recorder.trace if spec.edits else None) for spec in specs]
        for run, i in zip(out, at):
            run.i, run.trace = i, None
        return out

    together = runs()
    *guided, plain = together
    assert all(r.at_guided_step for r in guided) and not plain.at_guided_step
    with tiny_sg.capture() as capture:
        unguided_step([plain], capture, uncond_for=guided)
        guided_step(guided, capture)
    alone = runs()
    with tiny_sg.capture() as capture:
        for run in alone:
            (guided_step if run.at_guided_step else unguided_step)([run], capture)
    for a, b in zip(together, alone):
        assert a.i == b.i == at[together.index(a)] + 1
        torch.testing.assert_close(a.latents, b.latents, rtol=1e-4, atol=1e-4)


class NotFinite(Edit):
    """An edit whose energy is NaN: its request must fail alone."""

    def needed_words(self, prompt_words):
        return ["circle"]

    def energy(self, current, reference, timestep):
        return current.centroid("circle").sum() * float("nan")


def test_a_failing_request_fails_alone(engine):
    pause = engine.pause
    pause.hold()
    blocker = engine.submit(Spec(prompt="a cat", steps=3))
    assert pause.entered.wait(WAIT)
    good = engine.submit(Spec(prompt=PROMPT, seed=1, steps=4, edits=[move("circle", dx=0.2)]))
    bad = engine.submit(Spec(prompt=PROMPT, seed=2, steps=4, edits=[NotFinite()]))
    pause.go.set()
    assert blocker.future.result(WAIT).image is not None
    assert good.future.result(WAIT).image is not None
    with pytest.raises(FloatingPointError):
        bad.future.result(WAIT)
    assert engine.alive and engine.submit(Spec(prompt="a dog", steps=2)).future.result(WAIT).image is not None


def test_a_cancelled_request_leaves_its_batch_at_the_next_step(engine, tiny_sg):
    pause = engine.pause
    pause.hold()
    leaving = engine.submit(Spec(prompt="a cat", steps=40))
    staying = engine.submit(Spec(prompt="a dog", seed=3, steps=4))
    assert pause.entered.wait(WAIT)
    assert engine.cancel(leaving) == "running"
    calls = pause.calls
    pause.go.set()
    result = staying.future.result(WAIT)
    assert_same_image(result.image, library_image(tiny_sg, "a dog", 3, 4))
    with pytest.raises(CancelledError):  # answered, so that nothing waits on it forever
        leaving.future.result(WAIT)
    assert pause.calls - calls < 10  # the 40-step request did not run on (4 steps of the other, a few of slack)
    assert engine.active == []


def test_shutdown_deadline_answers_running_requests(tiny_sg):
    engine = IterationEngine(tiny_sg, model="tiny", cost=CostModel.fixed(1, 2, 1), limits=Limits(min_steps=1, max_batch=2), threads=1)
    engine.start()
    pause = Pause(tiny_sg.pipe.unet)
    try:
        pause.hold()
        running = engine.submit(Spec(prompt="a cat", steps=100))
        assert pause.entered.wait(WAIT)
        queued = [engine.submit(Spec(prompt=f"a dog {i}", steps=100)) for i in range(3)]
        stopper = threading.Thread(target=engine.shutdown, kwargs=dict(drain=True, timeout=0.5))
        stopper.start()
        stopper.join(0.3)
        pause.go.set()
        stopper.join(WAIT)
        for job in [running] + queued:
            with pytest.raises(ShuttingDown):
                job.future.result(WAIT)
        assert not engine.alive
    finally:
        pause.remove()


def test_a_request_waits_rather_than_make_a_running_one_miss_its_deadline(tiny_sg):
    # Predicted: a second per step alone, 101 s per step in a batch of two: the first request's budget
    # holds alone, never with a second beside it (the real steps are far faster than predicted).
    cost = CostModel.fixed(1000, 3000, 1, batch_factor=100.0)
    engine = IterationEngine(tiny_sg, model="tiny", cost=cost, limits=Limits(min_steps=1, max_batch=4), threads=1)
    engine.start()
    pause = Pause(tiny_sg.pipe.unet)
    try:
        pause.hold()
        due = engine.submit(Spec(prompt="a cat", steps=20, budget_ms=cost.call_ms(1, 64 * 64, 20, 0) * 1.5))
        assert pause.entered.wait(WAIT)
        later = engine.submit(Spec(prompt="a dog", steps=4))
        pause.go.set()
        assert due.future.result(WAIT).batch_size == 1 and later.future.result(WAIT).batch_size == 1
        # Without a budget to protect, the next one joins the running one.
        pause.hold()
        first = engine.submit(Spec(prompt="a cat", steps=20))
        assert pause.entered.wait(WAIT)
        second = engine.submit(Spec(prompt="a dog", steps=4))
        pause.go.set()
        assert first.future.result(WAIT).batch_size == 2 and second.future.result(WAIT).batch_size == 2
    finally:
        pause.remove()
        engine.shutdown(timeout=WAIT)


def test_a_pipeline_with_trainable_weights(tiny_sg):
    """Weights loaded with from_pretrained require grad (the tiny pipeline's do not): no step may
    leave a graph on what it returns (the decoded image, the prompt embeddings)."""
    sg = SelfGuidancePipeline.from_pipe(tiny_pipeline(seed=0))
    for module in (sg.pipe.unet, sg.pipe.vae, sg.pipe.text_encoder):
        module.requires_grad_(True)
    engine = IterationEngine(sg, model="tiny", cost=CostModel.fixed(1, 2, 1), limits=Limits(min_steps=1), threads=1)
    engine.start()
    try:
        edits = [move("circle", dx=0.25)]
        result = engine.submit(Spec(prompt=PROMPT, seed=2, steps=4, edits=edits)).future.result(WAIT)
    finally:
        engine.shutdown(timeout=WAIT)
    assert_same_image(result.image, library_image(tiny_sg, PROMPT, 2, 4, edits=edits))


def test_step_times_take_the_timed_iterations(tiny_sg):
    # A run waits for the whole iteration: once iterations of that many runs are timed, its steps are
    # predicted at no less; larger batches than any timed keep the per-kind step times.
    engine = IterationEngine(tiny_sg, model="tiny", cost=CostModel.fixed(10, 30, 1), limits=Limits(max_batch=8))
    assert engine._step_times(4, 64 * 64) == (pytest.approx(40), pytest.approx(120))
    engine.cost.observe("iteration", 4, 64 * 64, 500.0)
    assert engine._step_times(4, 64 * 64) == (pytest.approx(500), pytest.approx(500))
    assert engine._step_times(8, 64 * 64) == (pytest.approx(80), pytest.approx(240))


def test_runs_without_a_budget_pause_while_a_budgeted_one_would_miss(tiny_sg):
    # Predicted: a second per step alone, 101 s per step beside another run.
    engine = IterationEngine(tiny_sg, model="tiny", cost=CostModel.fixed(1000, 3000, 1, batch_factor=100.0), limits=Limits(min_steps=1, max_batch=4))
    now = time.monotonic()

    def run(budget_ms, due_in_s):
        spec = Spec(prompt=PROMPT, steps=4, budget_ms=budget_ms)
        r = Run(tiny_sg, Job(spec, Plan(4, 0), now, now + due_in_s, 0.0, False, 0), None)
        r.peak = 1  # set by the engine's _start
        return r

    # 4 s alone, 404 s beside the unbudgeted run: the unbudgeted run waits.
    free, due = run(None, 3600), run(60_000, 60)
    engine.active = [free, due]
    engine._iterate()
    engine._iterate()
    assert (free.i, due.i) == (0, 2)
    # Beside two unbudgeted runs, with time for one of them: only the later admitted one waits.
    first, second, due = run(None, 3600), run(None, 3600), run(600_000, 600)
    engine.active = [first, second, due]
    engine._iterate()
    assert (first.i, second.i, due.i) == (1, 0, 1)
    # Met beside it, or missed even alone (no pause saves it), or two budgeted runs: everyone steps.
    for runs in ([run(None, 3600), run(600_000, 600)], [run(None, 3600), run(1000, 1)], [run(60_000, 60), run(60_000, 60)]):
        engine.active = list(runs)
        engine._iterate()
        assert [r.i for r in runs] == [1, 1]
