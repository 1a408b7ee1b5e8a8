"""The server passes every option through to the image, keys its trace cache on everything that
changes a trace, and accounts deadlines by the clock (checked with a fake one)."""

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from sgfast import SelfGuidancePipeline, move  # noqa: E402
from sgfast.serve import engine as serve_engine  # noqa: E402
from sgfast.serve.admission import Limits, Plan  # noqa: E402
from sgfast.serve.cost import CostModel  # noqa: E402
from sgfast.serve.engine import Engine  # noqa: E402
from sgfast.serve.jobs import Job, Spec, seeded_latents  # noqa: E402
from sgfast.testing import tiny_pipeline  # noqa: E402

PROMPT = "a red circle and a blue square"
STEPS = 4
WAIT = 60


@pytest.fixture(scope="module")
def tiny_sg():
    return SelfGuidancePipeline.from_pipe(tiny_pipeline(seed=0))


@pytest.fixture(scope="module")
def engine(tiny_sg):
    engine = Engine(tiny_sg, model="tiny", cost=CostModel.fixed(1, 2, 1), limits=Limits(min_steps=2), threads=1)
    engine.start()
    yield engine
    engine.shutdown(drain=False, timeout=WAIT)


def direct(sg, seed=0, edits=(), **options):
    """The library's image for what a request asks (the server draws each seed's noise alone)."""
    kwargs = dict(num_inference_steps=STEPS, guidance_scale=7.5)
    kwargs.update(options)
    if kwargs.get("negative_prompt") is not None:
        kwargs["negative_prompt"] = [kwargs["negative_prompt"]]  # as the server passes it (a list per batch)
    latents = seeded_latents(sg.pipe, [seed], 64, 64)
    return np.asarray(sg([PROMPT], edits=list(edits) or None, latents=latents, **kwargs).images[0], np.float32)


def served(engine, **fields):
    spec = Spec(prompt=PROMPT, steps=STEPS, **fields)
    result = engine.submit(spec).future.result(WAIT)
    assert not result.degraded  # the image is the one asked for, not a cheaper one
    return np.asarray(result.image, np.float32), result


EDIT = lambda: [move("circle", dx=0.3, keep_others=False)]  # noqa: E731


@pytest.mark.parametrize("option", [
    dict(self_guidance_scale=300.0),
    dict(normalize_gradient=True, self_guidance_scale=3.0),
    dict(guidance_scale=2.0),
    dict(negative_prompt="green triangle"),
    dict(seed=3),
])
def test_every_option_reaches_the_image(engine, tiny_sg, option):
    # Against the library called with the same option, and unlike the image without it: the
    # option has an effect and the server applies it.
    seed = option.get("seed", 0)
    library_options = {k: v for k, v in option.items() if k != "seed"}
    expected = direct(tiny_sg, seed, EDIT(), **library_options)
    without = direct(tiny_sg, 0, EDIT())
    assert np.abs(expected - without).max() > 8
    image, _ = served(engine, edits=EDIT(), **option)
    np.testing.assert_allclose(image, expected, atol=2)


def test_trace_cache_key_covers_what_changes_a_trace(engine, tiny_sg):
    # A cached trace of guidance 7.5 must not serve an edit at guidance 2: the reference differs.
    _, first = served(engine, seed=11, edits=EDIT(), edit_specs=[{"type": "move"}])
    _, again = served(engine, seed=11, edits=EDIT(), edit_specs=[{"type": "move"}])
    assert (first.cache_hit, again.cache_hit) == (False, True)
    image, other = served(engine, seed=11, guidance_scale=2.0, edits=EDIT(), edit_specs=[{"type": "move"}])
    assert not other.cache_hit
    np.testing.assert_allclose(image, direct(tiny_sg, 11, EDIT(), guidance_scale=2.0), atol=2)


@pytest.mark.parametrize("field, value", [
    ("prompt", "a blue square"), ("negative_prompt", "green"), ("seed", 1), ("height", 128), ("width", 128),
    ("guidance_scale", 3.0), ("steps", STEPS + 1),
])
def test_trace_key_changes_with_every_trace_input(field, value):
    base = Spec(prompt=PROMPT, steps=STEPS)
    changed = Spec(**{**base.__dict__, field: value})
    key = lambda spec: Job(spec, Plan(spec.steps, 0), 0, 0, 0, False, 0).trace_key("tiny")  # noqa: E731
    assert key(Spec(**base.__dict__)) == key(base)
    assert key(changed) != key(base)
    assert Job(base, Plan(STEPS, 0), 0, 0, 0, False, 0).trace_key("other") != key(base)


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def monotonic(self):
        return self.now


@pytest.mark.parametrize("budget_ms, run_ms, missed", [(100, 150, True), (200, 150, False), (None, 10_000, False), (100, 79, False), (100, 81, True)])
def test_deadline_accounting_with_a_fake_clock(monkeypatch, tiny_sg, budget_ms, run_ms, missed):
    clock = FakeClock()
    monkeypatch.setattr(serve_engine, "time", clock)
    engine = Engine(tiny_sg, model="tiny", cost=CostModel.fixed(1, 2, 1), limits=Limits(min_steps=2))
    spec = Spec(prompt=PROMPT, steps=STEPS, budget_ms=budget_ms)
    arrival = clock.now
    deadline = arrival + (budget_ms if budget_ms is not None else serve_engine.NO_BUDGET_MS) / 1000
    job = Job(spec, Plan(STEPS, 0), arrival, deadline, 50.0, False, 0)
    clock.now += 0.02  # 20 ms in the queue

    def call(batch):
        clock.now += run_ms / 1000
        return ["image"], [False]

    monkeypatch.setattr(engine, "_call", call)
    engine._run_batch([job])
    result = job.future.result(0)
    assert result.deadline_missed is missed
    assert result.timings["queue_ms"] == pytest.approx(20.0)
    assert result.timings["run_ms"] == pytest.approx(run_ms)
    assert result.timings["total_ms"] == pytest.approx(20.0 + run_ms)
