"""The server: admission from a fixed cost model, EDF order, batching, the trace cache, bad input,
failures and shutdown. Runs on the tiny pipeline (CPU); no assertion depends on how fast it runs."""

import base64
import io
import math
import threading
import time

import numpy as np
import PIL.Image
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from sgfast import SelfGuidancePipeline, move  # noqa: E402
from sgfast.sampler import default_schedule  # noqa: E402
from sgfast.serve.admission import Limits, Rejected, ShuttingDown, admit, thinned_schedule  # noqa: E402
from sgfast.serve.cache import TraceCache  # noqa: E402
from sgfast.serve.cost import CostModel  # noqa: E402
from sgfast.serve.engine import Engine  # noqa: E402
from sgfast.serve.jobs import Spec  # noqa: E402
from sgfast.testing import tiny_pipeline  # noqa: E402
from sgfast.trace import Trace  # noqa: E402

PROMPT = "a red circle and a blue square"
STEPS = 4
WAIT = 60  # seconds: a generous bound on any single wait; never reached when things work


# ----------------------------------------------------------------------------------------------
# Admission and the cost model: pure functions, fixed numbers


def fixed_cost():
    # 10 ms per plain step, 30 ms per guided step, 5 ms per call, batches of 2 cost 1.5x.
    return CostModel.fixed(plain_ms=10, guided_ms=30, overhead_ms=5, batch_factor=0.5)


LIMITS = Limits(min_steps=10, min_guided_fraction=0.25)


def plan_of(**kw):
    args = dict(steps=20, has_edits=True, pixels=64 * 64, ahead_ms=0.0, budget_ms=None, policy="degrade", limits=LIMITS)
    args.update(kw)
    return admit(fixed_cost(), **args)


def test_cost_model_prediction_and_scaling():
    cost = fixed_cost()
    guided = sum(default_schedule(20))
    assert cost.call_ms(1, 64 * 64, 20, guided) == pytest.approx(5 + (20 - guided) * 10 + guided * 30)
    assert cost.ms("plain", 2) == pytest.approx(15)
    assert cost.ms("plain", 3) == pytest.approx(20)  # extrapolated linearly from batches 1 and 2
    assert cost.ms("plain", 1, pixels=128 * 128) == pytest.approx(40)  # scaled by pixels
    assert cost.call_ms(1, 64 * 64, 10, 0, reference_steps=10) == pytest.approx(5 + 20 * 10)


def test_cost_model_refreshes_from_live_timings():
    cost = fixed_cost()
    cost.observe_call(1, 64 * 64, steps=10, guided=0, reference_steps=0, elapsed_ms=5 + 10 * 20)  # 20 ms/step seen
    assert cost.ms("plain") == pytest.approx(0.8 * 10 + 0.2 * 20)
    cost.observe("guided", 4, 64 * 64, 100.0)  # a new batch size becomes a measured point
    assert cost.ms("guided", 4) == pytest.approx(100.0)
    cost.observe("plain", 1, 64 * 64, float("nan"))  # ignored
    assert np.isfinite(cost.ms("plain"))


def test_a_calibration_gives_way_to_live_timings_within_a_few_requests():
    """A calibrated point counts as one timing (a calibration on a busy machine must not outlive it),
    a fixed constant as a settled value; photo edits learn their own factor and leave step times alone."""
    cost = fixed_cost()
    cost.counts[("plain", 64 * 64, 1)] = 1  # as CostModel.calibrate leaves it
    for seen, expected in ((20, 15), (20, 10 / 3 + 40 / 3), (20, 0.75 * (10 / 3 + 40 / 3) + 5)):
        cost.observe("plain", 1, 64 * 64, seen)
        assert cost.ms("plain") == pytest.approx(expected)  # weights 1/2, 1/3, 1/4 ...
    for _ in range(50):
        cost.observe("plain", 1, 64 * 64, 20)
    assert cost.ms("plain") == pytest.approx(20, rel=1e-3)
    before = cost.snapshot()
    plan = dict(batch=1, pixels=64 * 64, steps=8, guided=3, reference_steps=16)
    predicted = cost.call_ms(**plan, photo=True)
    assert predicted == pytest.approx(cost.call_ms(**plan))  # no photo edit seen yet: the step model
    cost.observe_call(**plan, elapsed_ms=predicted / 2, photo=True)
    assert cost.call_ms(**plan, photo=True) == pytest.approx(0.75 * predicted)  # the step model's guess counts once
    assert cost.snapshot() == {**before, "photo_factor": {64 * 64: 0.75}}  # step times untouched


def test_an_edited_call_scales_its_step_times_and_a_stall_moves_them_at_most_4x():
    cost = fixed_cost()  # settled constants: each timing weighs 0.2
    predicted = cost.call_ms(1, 64 * 64, 20, 9)
    cost.observe_call(1, 64 * 64, 20, 9, 0, elapsed_ms=2 * predicted)
    # Both kinds scaled by 2 (not 2x the difference charged to the 9 guided steps: 30 -> 0.8 * 30 + 0.2 * 133).
    assert (cost.ms("plain"), cost.ms("guided")) == (pytest.approx(12), pytest.approx(36))
    cost = fixed_cost()
    cost.observe_call(1, 64 * 64, 20, 0, 0, elapsed_ms=1e6)  # a stall
    assert cost.ms("plain") == pytest.approx(0.8 * 10 + 0.2 * 40)


def test_admission_plans_photo_edits_with_their_factor():
    cost = fixed_cost()
    cost.photo_factor[64 * 64] = (0.5, 5)
    args = dict(steps=20, has_edits=True, pixels=64 * 64, ahead_ms=0.0, budget_ms=None, policy="degrade", limits=LIMITS)
    assert admit(cost, photo=True, **args).predicted_ms == pytest.approx(admit(cost, **args).predicted_ms / 2)


def test_admission_accepts_what_fits():
    d = plan_of(budget_ms=10_000, ahead_ms=100)
    assert not d.degraded and d.plan.steps == 20 and d.plan.guided_steps == sum(default_schedule(20))
    assert d.plan.schedule is None
    assert d.predicted_ms == pytest.approx(100 + fixed_cost().call_ms(1, 64 * 64, 20, d.plan.guided_steps))
    assert not plan_of(budget_ms=None, ahead_ms=1e9).degraded  # no budget: never degraded


def test_admission_degrades_guidance_first_then_steps():
    full = sum(default_schedule(20))  # 9 guided steps at 20
    full_ms = fixed_cost().call_ms(1, 64 * 64, 20, full)
    # Just short of the full plan: one guided step less fits.
    d = plan_of(budget_ms=full_ms - 1)
    assert d.degraded and d.plan.steps == 20 and d.plan.guided_steps == full - 1
    assert d.plan.schedule == thinned_schedule(20, full - 1) and len(d.plan.schedule) == full - 1
    # Tighter than the guidance floor at 20 steps: fewer steps.
    floor_ms = fixed_cost().call_ms(1, 64 * 64, 20, 3)
    d = plan_of(budget_ms=floor_ms - 1)
    assert d.plan.steps < 20 and d.plan.steps >= LIMITS.min_steps
    assert d.predicted_ms <= floor_ms - 1
    # Queue time counts: the same budget with work queued ahead degrades further.
    assert plan_of(budget_ms=full_ms + 50, ahead_ms=100).degraded


def test_admission_rejects_under_reject_policy_with_what_would_fit():
    full_ms = fixed_cost().call_ms(1, 64 * 64, 20, sum(default_schedule(20)))
    with pytest.raises(Rejected) as e:
        plan_of(policy="reject", budget_ms=full_ms + 10, ahead_ms=200)
    assert e.value.status == 503
    assert e.value.detail["predicted_ms"] == pytest.approx(full_ms + 200, abs=0.1)
    assert e.value.detail["queue_ms"] == pytest.approx(200)
    fit = e.value.detail["would_fit"]
    assert fit["steps"] <= 20 and fixed_cost().call_ms(1, 64 * 64, fit["steps"], fit["guided_steps"]) + 200 <= full_ms + 10


def test_admission_protects_queued_requests_due_later():
    full_ms = fixed_cost().call_ms(1, 64 * 64, 20, sum(default_schedule(20)))
    # Its own budget is ample, but queued requests due after it can only wait 200 ms more.
    d = plan_of(budget_ms=10_000, slack_ms=200)
    assert d.degraded and fixed_cost().call_ms(1, 64 * 64, d.plan.steps, d.plan.guided_steps) <= 200
    with pytest.raises(Rejected) as e:
        plan_of(budget_ms=10_000, slack_ms=100, policy="reject")
    assert e.value.status == 503 and "miss their deadlines" in e.value.detail["message"]
    assert e.value.detail["slack_ms"] == 100
    assert not plan_of(budget_ms=10_000, slack_ms=full_ms).degraded
    assert not plan_of(budget_ms=None, slack_ms=1).degraded  # no budget: queued last, never degraded


def test_admission_budget_that_can_never_be_met_is_422():
    with pytest.raises(Rejected) as e:
        plan_of(budget_ms=1)
    assert e.value.status == 422 and "never" in e.value.detail["message"]
    floor = math.ceil(sum(default_schedule(10)) * LIMITS.min_guided_fraction)  # the guidance floor at 10 steps
    minimal = fixed_cost().call_ms(1, 64 * 64, 10, floor)
    assert e.value.detail["min_budget_ms"] == pytest.approx(minimal, abs=1)
    with pytest.raises(Rejected) as e:  # reject policy: the request itself on an idle server
        plan_of(budget_ms=1, policy="reject")
    assert e.value.status == 422


def test_admission_counts_the_reference_pass_of_an_uncached_trace():
    cached = plan_of(budget_ms=None)
    uncached = plan_of(budget_ms=None, reference_steps_for=lambda s: s)
    assert uncached.plan.reference_steps == 20 and cached.plan.reference_steps == 0
    assert uncached.predicted_ms - cached.predicted_ms == pytest.approx(20 * 10)


def test_thinned_schedule_is_an_even_subset_of_the_default():
    full = [i for i, on in enumerate(default_schedule(50)) if on]
    thin = thinned_schedule(50, 5)
    assert len(thin) == 5 and set(thin) <= set(full) and thin[0] == full[0] and list(thin) == sorted(thin)
    assert thinned_schedule(50, len(full)) is None


# A model whose settings guide steps 1 <= i < 0.8 * steps (the built-in model's schedule).
MODEL_SCHEDULE = {"format": 1, "defaults": {"guidance_schedule": {"from_step": 1, "to_share": 0.8}}}


def test_admission_counts_the_models_own_guided_steps():
    def model_guided(steps):
        return tuple(i for i in range(steps) if 1 <= i < 0.8 * steps)

    full = len(model_guided(20))  # 15 guided steps, where the paper's schedule has 9
    d = plan_of(budget_ms=None, guided_for=model_guided)
    assert d.plan.guided_steps == full != sum(default_schedule(20)) and d.plan.schedule is None
    assert d.predicted_ms == pytest.approx(fixed_cost().call_ms(1, 64 * 64, 20, full))
    # Degraded: a thinned subset of the model's own guided steps.
    d = plan_of(budget_ms=fixed_cost().call_ms(1, 64 * 64, 20, full) - 1, guided_for=model_guided)
    assert d.plan.guided_steps == full - 1 and set(d.plan.schedule) <= set(model_guided(20))


def test_engine_plans_with_the_models_own_schedule():
    sg = SelfGuidancePipeline.from_pipe(tiny_pipeline(seed=0), settings=MODEL_SCHEDULE)
    engine = Engine(sg, model="tiny", cost=CostModel.fixed(1, 2, 1), limits=Limits(min_steps=2), threads=1).start()
    try:
        edit = spec(steps=10, edits=[move("circle", dx=0.2)])
        assert engine.guided_steps_for(edit)(10) == tuple(range(1, 8))
        job = engine.submit(edit)
        assert job.plan.guided_steps == 7 and job.predicted_ms == pytest.approx(engine.cost.call_ms(1, 64 * 64, 10, 7, 10))
        result = job.future.result(WAIT)
        assert not result.degraded and result.degradation is None and result.plan.guided_steps == 7
    finally:
        engine.shutdown(drain=False, timeout=WAIT)


def make_trace(prompt, steps=3):
    trace = Trace(prompt, prompt.split(), latents=torch.zeros(1, 4, 16, 16))
    for t in range(steps):
        trace.add(t, {"up_blocks.0": torch.rand(len(trace.words), 8, 8)}, torch.rand(len(trace.words), 32))
    return trace


def test_trace_cache_is_lru_bounded_in_bytes():
    a, b = make_trace("a red circle"), make_trace("a blue square")
    size = TraceCache.size_of(a)
    cache = TraceCache(max_bytes=int(size * 1.5))
    cache.put("a", a)
    assert cache.get("a").steps.keys() == a.steps.keys() and cache.hits == 1
    cache.put("b", b)  # over the bound: "a" (least recently used) goes
    assert cache.get("a") is None and cache.get("b") is not None and cache.misses == 1
    assert cache.bytes == TraceCache.size_of(b) and len(cache) == 1
    assert not TraceCache(max_bytes=10).put("x", a)  # a trace larger than the bound is not kept


# ----------------------------------------------------------------------------------------------
# The engine on the tiny pipeline


@pytest.fixture(scope="module")
def tiny_sg():
    return SelfGuidancePipeline.from_pipe(tiny_pipeline(seed=0))


class Gate:
    """Wraps a SelfGuidancePipeline: records every call's prompts, can hold the worker inside a call
    (until `release()`), and fails any call whose prompts contain "boom"."""

    def __init__(self, sg):
        self.sg = sg
        self.pipe = sg.pipe
        self.calls = []
        self.hold = threading.Event()
        self.entered = threading.Event()
        self.open = threading.Event()
        self.open.set()

    def words(self, prompt):
        return self.sg.words(prompt)

    def close(self):
        self.open.clear()
        self.entered.clear()

    def release(self):
        self.open.set()

    def __call__(self, prompts, **kw):
        self.calls.append((list(prompts), kw))
        self.entered.set()
        assert self.open.wait(WAIT)
        if any("boom" in p for p in prompts):
            raise RuntimeError("boom: an injected failure")
        return self.sg(prompts, **kw)


def spec(prompt=PROMPT, **kw):
    kw.setdefault("steps", STEPS)
    return Spec(prompt=prompt, **kw)


@pytest.fixture
def gate(tiny_sg):
    return Gate(tiny_sg)


@pytest.fixture
def engine(gate):
    engine = Engine(gate, model="tiny", cost=CostModel.fixed(1, 2, 1), limits=Limits(min_steps=2), threads=1)
    engine.start()
    yield engine
    gate.release()
    engine.shutdown(drain=False, timeout=WAIT)


def hold_worker(engine, gate):
    """Occupy the worker with a call that waits for `gate.release()`; returns its job."""
    gate.close()
    blocker = engine.submit(spec("a cat", steps=2, guidance_scale=1.0))
    assert gate.entered.wait(WAIT)
    return blocker


def test_earliest_deadline_first(engine, gate):
    blocker = hold_worker(engine, gate)
    # Different shapes (steps) so that nothing is batched; deadlines not in arrival order.
    jobs = {
        "late": engine.submit(spec("a dog", steps=3, budget_ms=50_000)),
        "none": engine.submit(spec("a red ball", steps=5)),  # no budget: after every budgeted one
        "early": engine.submit(spec("a bird", steps=4, budget_ms=20_000)),
        "middle": engine.submit(spec("a car", steps=2, budget_ms=30_000)),
    }
    assert engine.depth() == 4
    gate.release()
    for job in [blocker, *jobs.values()]:
        job.future.result(WAIT)
    order = [prompts[0] for prompts, _ in gate.calls[1:]]
    assert order == ["a bird", "a car", "a dog", "a red ball"]


def test_same_shape_requests_are_batched_and_match_single_runs(engine, gate, tiny_sg):
    blocker = hold_worker(engine, gate)
    prompts = ["a red circle", "a blue square", "a green tree"]
    same = [engine.submit(spec(p, seed=i)) for i, p in enumerate(prompts)]
    other = engine.submit(spec("a red circle", seed=0, steps=STEPS + 1))  # another shape
    gate.release()
    results = [j.future.result(WAIT) for j in same]
    blocker.future.result(WAIT)
    other.future.result(WAIT)
    assert [r.batch_size for r in results] == [3, 3, 3]
    assert sorted(map(len, (p for p, _ in gate.calls[1:]))) == [1, 3]
    # A request's image does not depend on what it was batched with: same as a batch-of-one run.
    alone = engine.submit(spec("a blue square", seed=1)).future.result(WAIT)
    assert alone.batch_size == 1
    np.testing.assert_allclose(np.asarray(alone.image, np.float32), np.asarray(results[1].image, np.float32), atol=2)


def test_normalize_gradient_reaches_the_pipeline_and_splits_batches(engine, gate):
    blocker = hold_worker(engine, gate)
    edit = dict(edits=[move("circle", dx=0.25)])
    jobs = [engine.submit(spec(seed=i, normalize_gradient=i == 2, **edit)) for i in range(3)]
    gate.release()
    blocker.future.result(WAIT)
    assert [j.future.result(WAIT).batch_size for j in jobs] == [2, 2, 1]
    guided = [kwargs for _, kwargs in gate.calls[1:] if "edits" in kwargs]
    assert sorted((len(kwargs["edits"]), kwargs["normalize_gradient"]) for kwargs in guided) == [(1, True), (2, False)]


def test_api_object_edits_carry_keep_weights():
    from sgfast.serve.schema import MoveEdit, build_edit

    edit = build_edit(MoveEdit(type="move", word="circle", dx=0.1, keep_appearance_weight=0.0, keep_centroid_weight=2.0))
    assert (edit.keep_shape_weight, edit.keep_appearance_weight, edit.keep_centroid_weight) == (move("c").keep_shape_weight, 0.0, 2.0)
    assert not edit.needs_features  # no appearance held: no features captured


def test_a_seed_gives_the_library_image(engine, tiny_sg):
    result = engine.submit(spec(seed=5)).future.result(WAIT)
    expected = tiny_sg(PROMPT, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(5)).images[0]
    # Equal up to float summation order (the worker runs one CPU thread).
    np.testing.assert_allclose(np.asarray(result.image, np.float32), np.asarray(expected, np.float32), atol=2)


def test_second_edit_of_the_same_image_hits_the_trace_cache(engine, gate):
    edit = dict(edits=[move("circle", dx=0.25)], edit_specs=[{"type": "move", "word": "circle", "dx": 0.25}])
    first = engine.submit(spec(seed=7, **edit)).future.result(WAIT)
    assert not first.cache_hit and first.plan.reference_steps == STEPS
    second = engine.submit(spec(seed=7, edits=[move("circle", dx=-0.25)])).future.result(WAIT)
    assert second.cache_hit and second.plan.reference_steps == 0
    assert "trace" not in gate.calls[0][1] and gate.calls[1][1]["trace"] is not None  # the reference pass was skipped
    # A plain generation also seeds the cache: editing it next is a hit.
    engine.submit(spec(seed=8)).future.result(WAIT)
    assert engine.submit(spec(seed=8, **edit)).future.result(WAIT).cache_hit
    assert engine.cache.hits == 2
    # Another seed is another image: a miss.
    assert not engine.submit(spec(seed=9, **edit)).future.result(WAIT).cache_hit


def test_a_failing_request_does_not_take_the_worker_down(engine, gate):
    with pytest.raises(RuntimeError, match="boom"):
        engine.submit(spec("a boom")).future.result(WAIT)
    assert engine.alive
    # Batched with good requests: only the bad one fails.
    blocker = hold_worker(engine, gate)
    good = engine.submit(spec("a red circle"))
    bad = engine.submit(spec("a boom circle"))
    also_good = engine.submit(spec("a blue square"))
    gate.release()
    blocker.future.result(WAIT)
    assert good.future.result(WAIT).image.size == (64, 64)
    assert also_good.future.result(WAIT).image.size == (64, 64)
    with pytest.raises(RuntimeError, match="boom"):
        bad.future.result(WAIT)
    assert engine.alive and engine.submit(spec()).future.result(WAIT).image is not None


@pytest.mark.parametrize("drain", [True, False])
def test_shutdown_answers_every_queued_request(engine, gate, drain):
    blocker = hold_worker(engine, gate)
    queued = [engine.submit(spec(f"a {w}", steps=STEPS + i % 2)) for i, w in enumerate(["cat", "dog", "bird", "car"])]
    stopper = threading.Thread(target=engine.shutdown, kwargs=dict(drain=drain, timeout=WAIT))
    stopper.start()
    deadline = time.monotonic() + WAIT
    while not engine.closing and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(ShuttingDown):  # closed to new requests
        engine.submit(spec())
    gate.release()
    stopper.join(WAIT)
    assert blocker.future.result(WAIT).image is not None  # the running one always completes
    for job in queued:
        assert job.future.done()
        if drain:
            assert job.future.result().image is not None
        else:
            with pytest.raises(ShuttingDown):
                job.future.result()
    assert not engine.alive


def test_queue_cap_and_expired_deadlines(gate):
    # A cost model that badly underestimates: admitted, then the deadline passes while queued.
    engine = Engine(gate, model="tiny", cost=CostModel.fixed(0.01, 0.02, 0.01), limits=Limits(max_queue=2, min_steps=1), threads=1)
    engine.start()
    try:
        blocker = hold_worker(engine, gate)
        short = engine.submit(spec(budget_ms=30))
        engine.submit(spec(steps=3))
        with pytest.raises(Rejected) as e:
            engine.submit(spec())
        assert e.value.status == 503 and "queue is full" in str(e.value)
        time.sleep(0.1)
        gate.release()
        blocker.future.result(WAIT)
        with pytest.raises(Rejected) as e:
            short.future.result(WAIT)
        assert e.value.status == 503 and "deadline passed" in str(e.value)
    finally:
        gate.release()
        engine.shutdown(timeout=WAIT)


# ----------------------------------------------------------------------------------------------
# HTTP API (FastAPI TestClient)


@pytest.fixture(scope="module")
def client():
    from fastapi.testclient import TestClient

    from sgfast.serve.app import create_app

    sg = Gate(SelfGuidancePipeline.from_pipe(tiny_pipeline(seed=0)))
    # Fixed costs: plain 20 ms, guided 60 ms, 10 ms per call (no timing in any assertion).
    engine = Engine(
        sg, model="tiny", cost=CostModel.fixed(20, 60, 10),
        limits=Limits(max_steps=12, default_steps=STEPS, min_steps=2, max_edits=3, max_body_bytes=4096), threads=1,
    )
    with TestClient(create_app(engine), base_url="http://localhost") as c:
        c.engine = engine
        yield c


def decode(data):
    return PIL.Image.open(io.BytesIO(base64.b64decode(data["image"])))


def test_api_round_trip_generate_then_edit(client):
    r = client.post("/v1/images", json={"prompt": PROMPT, "seed": 3})
    assert r.status_code == 200, r.text
    data = r.json()
    assert decode(data).size == (64, 64)
    assert data["steps"] == STEPS and data["guided_steps"] == 0 and not data["degraded"]
    assert set(data["timings"]) >= {"queue_ms", "run_ms", "total_ms", "predicted_ms"}
    assert data["words"] == ["a", "red", "circle", "and", "a", "blue", "square"]
    r = client.post("/v1/images", json={"prompt": PROMPT, "seed": 3, "edits": [{"type": "move", "word": "circle", "dx": 0.25}]})
    data = r.json()
    assert r.status_code == 200 and data["cache_hit"] and data["guided_steps"] == sum(default_schedule(STEPS))
    assert data["edits"] == [{"type": "move", "word": "circle", "dx": 0.25, "dy": 0.0, "keep_others": True}]
    held = {"keep_shape_weight": 4.0, "keep_appearance_weight": 0.0, "keep_centroid_weight": 2.0}
    r = client.post("/v1/images", json={"prompt": PROMPT, "seed": 3, "normalize_gradient": True, "self_guidance_scale": 0.8,
                                        "edits": [{"type": "move", "word": "circle", "dx": 0.25, **held}]})
    assert r.status_code == 200 and r.json()["cache_hit"], r.text
    assert r.json()["edits"] == [{"type": "move", "word": "circle", "dx": 0.25, "dy": 0.0, "keep_others": True, **held}]
    # The PNG itself, asked for by header or by field.
    for kwargs in (dict(headers={"Accept": "image/png"}), dict(extra={"format": "png"})):
        body = {"prompt": PROMPT, "seed": 3, "edits": [{"type": "resize", "word": "square", "scale": 1.5}]}
        body.update(kwargs.get("extra", {}))
        r = client.post("/v1/images", json=body, headers=kwargs.get("headers"))
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert PIL.Image.open(io.BytesIO(r.content)).size == (64, 64)
        assert r.headers["x-sgfast-cache-hit"] == "true" and "run_ms" in r.headers["x-sgfast-timings"]


def test_api_degrades_to_meet_a_budget(client):
    full = sum(default_schedule(8))
    full_ms = client.engine.cost.call_ms(1, 64 * 64, 8, full, 8)
    body = {"prompt": PROMPT, "seed": 11, "steps": 8, "edits": [{"type": "place", "word": "square", "x": 0.2, "y": 0.8}]}
    r = client.post("/v1/images", json={**body, "budget_ms": full_ms - 30})
    data = r.json()
    assert r.status_code == 200, r.text
    assert data["degraded"] and data["degradation"]["requested_guided_steps"] == full
    assert data["guided_steps"] < full and data["degradation"]["guided_step_indices"] is not None
    _, kwargs = client.engine.sg.calls[-1]
    assert kwargs["guidance_schedule"] == data["degradation"]["guided_step_indices"]


def test_api_words_health_metrics_and_page(client):
    assert client.get("/v1/words", params={"prompt": "a red cat"}).json()["words"] == ["a", "red", "cat"]
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["model"] == "tiny" and health["policy"] == "degrade"
    text = client.get("/metrics").text
    for name in (
        "sgfast_queue_depth", "sgfast_request_latency_seconds_bucket", "sgfast_deadline_misses_total",
        "sgfast_steps_per_second", "sgfast_trace_cache_hits_total", 'sgfast_requests_total{outcome="ok"}',
    ):
        assert name in text
    page = client.get("/")
    assert page.status_code == 200 and "<script>" in page.text and "/v1/images" in page.text


@pytest.mark.parametrize(
    "body, needle",
    [
        ({}, "prompt"),
        ({"prompt": "   "}, "blank"),
        ({"prompt": PROMPT, "stepz": 3}, "stepz"),
        ({"prompt": PROMPT, "seed": "x"}, "seed"),
        ({"prompt": PROMPT, "seed": -1}, "seed"),
        ({"prompt": PROMPT, "steps": 0}, "steps"),
        ({"prompt": PROMPT, "steps": 13}, "cap of 12"),
        ({"prompt": PROMPT, "size": 60}, "multiples of 8"),
        ({"prompt": PROMPT, "size": 256}, "between 8 and 128"),
        ({"prompt": PROMPT, "size": [64, 0]}, "height=0"),
        ({"prompt": PROMPT, "budget_ms": -5}, "budget_ms"),
        ({"prompt": PROMPT, "guidance_scale": 1e9}, "guidance_scale"),
        ({"prompt": PROMPT, "edits": [{"type": "teleport", "word": "circle"}]}, "teleport"),
        ({"prompt": PROMPT, "edits": [{"type": "place", "word": "circle", "x": 1.5}]}, "x"),
        ({"prompt": PROMPT, "edits": [{"type": "resize", "word": "circle", "scale": 0}]}, "scale"),
        ({"prompt": PROMPT, "edits": [{"type": "move", "word": "circle", "dx": 0.1}] * 4}, "at most 3"),
        ({"prompt": PROMPT, "edits": [{"type": "move", "word": "triangle", "dx": 0.1}]}, "its words are"),
        ({"prompt": PROMPT, "edits": [{"type": "keep_shape", "words": ["cat"]}]}, "its words are"),
        ({"prompt": PROMPT, "budget_ms": 1}, "never be met"),
    ],
)
def test_api_bad_input_is_422_with_a_clear_message(client, body, needle):
    r = client.post("/v1/images", json=body)
    assert r.status_code == 422, r.text
    assert needle in r.text


def test_api_unknown_word_names_the_prompt_words(client):
    r = client.post("/v1/images", json={"prompt": PROMPT, "edits": [{"type": "move", "word": "cat", "dx": 0.1}]})
    detail = r.json()["detail"]
    assert detail["errors"][0]["loc"] == ["body", "edits", 0] and detail["words"] == ["a", "red", "circle", "and", "a", "blue", "square"]


def test_api_body_size_cap_and_malformed_json(client):
    r = client.post("/v1/images", json={"prompt": "a " * 3000})
    assert r.status_code == 413
    r = client.post("/v1/images", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422


def test_api_failure_is_500_and_the_server_keeps_serving(client):
    r = client.post("/v1/images", json={"prompt": "a boom"})
    assert r.status_code == 500 and "boom" in r.json()["detail"]["message"]
    assert client.post("/v1/images", json={"prompt": "a cat"}).status_code == 200
    assert client.get("/healthz").json()["status"] == "ok"


def test_api_reject_policy_answers_503_with_the_prediction(client):
    engine = client.engine
    gate = engine.sg
    blocker = hold_worker(engine, gate)
    engine.policy = "reject"
    try:
        # Work queued ahead with an earlier deadline, then a budget that only an idle server would meet.
        px = 64 * 64
        dog, cat, running = (engine.cost.call_ms(1, px, s, 0) for s in (10, STEPS, 2))
        engine.submit(spec("a dog", steps=10, budget_ms=dog + running + 10))
        r = client.post("/v1/images", json={"prompt": "a cat", "budget_ms": dog + running + 11})
        assert r.status_code == 503, r.text
        detail = r.json()["detail"]
        assert detail["predicted_ms"] > dog + cat and detail["queue_ms"] >= dog and "Retry-After" in r.headers
        assert "budget" in detail["message"]
    finally:
        engine.policy = "degrade"
        gate.release()
        blocker.future.result(WAIT)


def test_cli_has_the_serve_command(capsys):
    from sgfast.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--host", "--port", "--policy", "--max-batch", "--cache-mb"):
        assert flag in out
