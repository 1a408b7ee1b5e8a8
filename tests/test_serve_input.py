"""Bad input and bookkeeping of the server (FastAPI TestClient on the tiny pipeline): edits that name
no word, NaN, media types, Accept q-values, edits without a guided step, the one error schema, a
"never" that rests on a margin, outcomes that add up, the trace cache's bytes, and a seeded fuzz of
the request schema."""

import json
import random

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from sgfast import SelfGuidancePipeline  # noqa: E402
from sgfast.serve.admission import Limits, NEVER_MARGIN, Rejected, admit  # noqa: E402
from sgfast.serve.app import create_app, preferred_type  # noqa: E402
from sgfast.serve.cost import CostModel  # noqa: E402
from sgfast.serve.engine import Engine  # noqa: E402
from sgfast.serve.jobs import Spec  # noqa: E402
from sgfast.testing import tiny_pipeline  # noqa: E402

PROMPT = "a red circle and a blue square"
WAIT = 60


@pytest.fixture(scope="module")
def tiny_sg():
    return SelfGuidancePipeline.from_pipe(tiny_pipeline(seed=0))


def make_client(sg, cost=None, **limits):
    from fastapi.testclient import TestClient

    limits = {"max_steps": 6, "default_steps": 3, "min_steps": 1, "max_edits": 3, "max_body_bytes": 4096, **limits}
    engine = Engine(sg, model="tiny", cost=cost or CostModel.fixed(20, 60, 10), limits=Limits(**limits), threads=1)
    client = TestClient(create_app(engine), base_url="http://localhost")
    client.engine = engine
    return client


@pytest.fixture(scope="module")
def client(tiny_sg):
    with make_client(tiny_sg) as c:
        yield c


def error_of(response, status):
    """The one error schema: {"detail": {"status", "type", "message", ...}}."""
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, dict) and detail["status"] == status
    assert isinstance(detail["type"], str) and isinstance(detail["message"], str) and detail["message"]
    return detail


def outcomes(client):
    found = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("sgfast_requests_total{"):
            label, value = line.split("} ")
            found[label.split('"')[1]] = found.get(label.split('"')[1], 0) + float(value)
    return found


def test_keep_edits_that_name_no_word_are_422(client):
    r = client.post("/v1/images", json={"prompt": PROMPT, "edits": [{"type": "keep_shape", "words": []}]})
    assert "names no word" in error_of(r, 422)["message"]
    r = client.post("/v1/images", json={"prompt": "a and the", "edits": [{"type": "keep_appearance"}]})
    detail = error_of(r, 422)
    assert "names no word" in detail["message"] and "['a', 'and', 'the']" in detail["message"]
    # With a word, or by default on a prompt with content words, they run.
    ok = client.post("/v1/images", json={"prompt": PROMPT, "edits": [{"type": "keep_shape"}, {"type": "keep_appearance", "words": ["square"]}]})
    assert ok.status_code == 200, ok.text


def test_nan_and_infinity_are_named_as_such(client):
    for value in ("NaN", "Infinity", "-Infinity"):
        body = '{"prompt": "a red circle", "edits": [{"type": "move", "word": "circle", "dx": %s}]}' % value
        r = client.post("/v1/images", content=body, headers={"content-type": "application/json"})
        detail = error_of(r, 422)
        assert "finite" in detail["message"] and "less than" not in detail["message"], detail


def test_media_types_and_accept_q_values(client):
    r = client.post("/v1/images", content=json.dumps({"prompt": PROMPT}), headers={"content-type": "text/plain"})
    assert "application/json" in error_of(r, 415)["message"]
    assert "no content-type" in error_of(client.post("/v1/images", content=json.dumps({"prompt": PROMPT})), 415)["message"]
    assert client.post("/v1/images", content=json.dumps({"prompt": PROMPT}), headers={"content-type": "application/json; charset=utf-8"}).status_code == 200
    png_last = client.post("/v1/images", json={"prompt": PROMPT}, headers={"accept": "image/png;q=0.5, application/json"})
    assert png_last.headers["content-type"] == "application/json"
    png_first = client.post("/v1/images", json={"prompt": PROMPT}, headers={"accept": "application/json;q=0.2, image/png"})
    assert png_first.headers["content-type"] == "image/png"
    error_of(client.post("/v1/images", json={"prompt": PROMPT}, headers={"accept": "text/html"}), 406)


@pytest.mark.parametrize(
    "accept, expected",
    [
        ("", "application/json"),
        ("*/*", "application/json"),
        ("image/*", "image/png"),
        ("image/png", "image/png"),
        ("image/png, application/json", "application/json"),  # equal q: the default
        ("image/png;q=1, application/json;q=0.9", "image/png"),
        ("*/*;q=0.1, image/png", "image/png"),
        ("application/json;q=0, */*", "image/png"),
        ("image/png;q=0, text/html", None),
        ("application/json;q=oops, image/png", "image/png"),
    ],
)
def test_preferred_type(accept, expected):
    assert preferred_type(accept) == expected


def test_edits_without_a_guided_step_are_422(client):
    r = client.post("/v1/images", json={"prompt": PROMPT, "steps": 1, "edits": [{"type": "move", "word": "circle", "dx": 0.2}]})
    detail = error_of(r, 422)
    assert "no guided step" in detail["message"] and "steps >= 2" in detail["message"]
    assert client.post("/v1/images", json={"prompt": PROMPT, "steps": 1}).status_code == 200  # no edits: fine


def test_every_error_has_the_one_schema(client):
    cases = [
        (client.post("/v1/images", json={}), 422),
        (client.post("/v1/images", content=b"{nope", headers={"content-type": "application/json"}), 422),
        (client.post("/v1/images", json={"prompt": PROMPT, "steps": 99}), 422),
        (client.post("/v1/images", json={"prompt": PROMPT, "edits": [{"type": "move", "word": "cat"}]}), 422),
        (client.post("/v1/images", json={"prompt": "a " * 3000}), 413),
        (client.post("/v1/images", json={"prompt": PROMPT, "budget_ms": 0.001}), 422),
        (client.get("/v1/words", params={"prompt": " "}), 422),
        (client.get("/v1/words"), 422),
        (client.get("/nowhere"), 404),
        (client.put("/v1/images", json={}), 405),
    ]
    for response, status in cases:
        error_of(response, status)


def test_a_budget_within_the_estimates_margin_is_503_not_422():
    cost = CostModel.fixed(10, 30, 5)
    limits = Limits(min_steps=10)
    idle = cost.call_ms(1, 64 * 64, 10, 1)  # the most degraded plan on an idle server
    args = dict(cost=cost, steps=20, has_edits=True, pixels=64 * 64, ahead_ms=0.0, policy="degrade", limits=limits)
    with pytest.raises(Rejected) as e:
        admit(budget_ms=idle * 0.9, **args)  # the live estimate may well move below it
    assert e.value.status == 503 and e.value.detail["min_budget_ms"] >= idle and e.value.detail["retry_after_s"] >= 1
    with pytest.raises(Rejected) as e:
        admit(budget_ms=idle / (NEVER_MARGIN * 1.01), **args)
    assert e.value.status == 422 and "never" in e.value.detail["message"]


def test_outcomes_add_up(tiny_sg):
    """Every request to /v1/images ends in exactly one counted outcome; other routes count apart."""
    with make_client(tiny_sg) as c:
        sent = {
            "ok": [c.post("/v1/images", json={"prompt": PROMPT}) for _ in range(2)],
            "invalid": [c.post("/v1/images", json={"prompt": PROMPT, "steps": 0}), c.post("/v1/images", content=b"{", headers={"content-type": "application/json"})],
            "too_large": [c.post("/v1/images", json={"prompt": "a " * 3000})],
            "unsupported_media_type": [c.post("/v1/images", content=b"x", headers={"content-type": "text/plain"})],
            "bad_request": [c.post("/v1/images", json={"prompt": PROMPT}, headers={"host": "elsewhere.example"})],
            "not_acceptable": [c.post("/v1/images", json={"prompt": PROMPT}, headers={"accept": "text/html"})],
        }
        c.get("/v1/words", params={"prompt": ""})  # a 422 elsewhere: not an image request
        c.get("/healthz")
        counted = outcomes(c)
        other = [line for line in c.get("/metrics").text.splitlines() if line.startswith("sgfast_other_requests_total{")]
    assert counted == {k: float(len(v)) for k, v in sent.items()}
    assert any('path="/v1/words",status="422"' in line for line in other)


def test_cache_counts_the_bytes_it_keeps_alive(tiny_sg):
    """Traces recorded in a batch are views of the batch's tensors: the cache keeps compact copies,
    and the bytes it counts are the bytes its entries hold (every storage they reference)."""
    engine = Engine(tiny_sg, model="tiny", cost=CostModel.fixed(1, 2, 1), limits=Limits(min_steps=1, max_batch=4), threads=1)
    engine.start()
    try:
        hold = engine.submit(Spec(prompt="a cat", steps=2))  # the three below queue behind it and batch
        jobs = [engine.submit(Spec(prompt=p, steps=3, seed=i)) for i, p in enumerate(["a red circle", "a blue square", PROMPT])]
        hold.future.result(WAIT)
        assert {j.future.result(WAIT).batch_size for j in jobs} == {3}
    finally:
        engine.shutdown(timeout=WAIT)
    storages = {}
    for trace, _ in engine.cache.entries.values():
        tensors = [trace.latents] + [m for s in trace.steps.values() for m in s.maps.values()]
        tensors += [s.appearance for s in trace.steps.values() if s.appearance is not None]
        for t in tensors:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    assert len(engine.cache) == 4 and sum(storages.values()) == engine.cache.bytes


# ----------------------------------------------------------------------------------------------
# Fuzz: random bodies from a seeded generator


WORDS = ["circle", "square", "red", "blue", "a", "", " ", "cat", "ÄÖ", "\u0000", "x" * 120]
FIELDS = ["prompt", "negative_prompt", "edits", "seed", "steps", "guidance_scale", "self_guidance_scale",
          "normalize_gradient", "size", "budget_ms", "format", "bogus"]
EDIT_FIELDS = ["type", "word", "words", "dx", "dy", "x", "y", "scale", "weight", "keep_others",
               "keep_shape_weight", "keep_appearance_weight", "keep_centroid_weight", "keep_own_shape_weight",
               "keep_own_size_weight", "keep_own_appearance_weight", "keep_own_centroid_weight", "junk"]
TYPES = ["move", "place", "resize", "keep_shape", "keep_appearance", "teleport", 3, None]


def random_value(rng, depth=0):
    kind = rng.randrange(11 if depth < 2 else 8)
    if kind == 0:
        return rng.choice([0, 1, -1, 2, 3, 7, 8, 64, 65, 128, 2**63, -(2**70), 10**30])
    if kind == 1:
        return rng.choice([0.0, 0.5, -0.5, 1.0, 1.5, 1e-300, 1e300, 0.1, 16.0, 1000.5, float("nan"), float("inf")])
    if kind == 2:
        return rng.choice(WORDS)
    if kind == 3:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randrange(1, 6)))
    if kind in (4, 5):
        return rng.choice([True, False, None])
    if kind == 6:
        return rng.choice(["json", "png", "PNG", "a red circle and a blue square"])
    if kind == 7:
        return [rng.choice([8, 16, 64, 0, -8, "64"]) for _ in range(rng.randrange(0, 4))]
    if kind == 8:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(0, 3))]
    return {rng.choice(EDIT_FIELDS): random_value(rng, depth + 1) for _ in range(rng.randrange(0, 3))}


def random_edit(rng):
    edit = {"type": rng.choice(TYPES)}
    for name in rng.sample(EDIT_FIELDS[1:], rng.randrange(0, 4)):
        edit[name] = random_value(rng, 1)
    if rng.random() < 0.5:
        edit["word"] = rng.choice(["circle", "square", "cat"])
    return edit


def random_body(rng):
    body = {"prompt": rng.choice([PROMPT, "a red circle", "a and the", ""])} if rng.random() < 0.9 else {}
    for name in rng.sample(FIELDS, rng.randrange(0, 5)):
        body[name] = random_value(rng)
    if rng.random() < 0.5:
        body["edits"] = [random_edit(rng) for _ in range(rng.randrange(0, 4))]
    if rng.random() < 0.7:
        body["steps"] = rng.choice([1, 2, 3, 4])  # keep the valid ones quick
    if "budget_ms" in body and isinstance(body["budget_ms"], (int, float)) and body["budget_ms"] > 0:
        body["budget_ms"] = 600_000  # an overload 503 is a server's right; this test is about the schema
    text = json.dumps(body)  # NaN and Infinity go out as the bare tokens Python writes
    if rng.random() < 0.03:
        text = text[: rng.randrange(len(text))]  # cut short: malformed JSON
    return text


def fuzz(client, count, seed):
    rng = random.Random(seed)
    statuses = {}
    for i in range(count):
        text = random_body(rng)
        r = client.post("/v1/images", content=text, headers={"content-type": "application/json"})
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        assert r.status_code < 500, (text, r.text)
        if r.status_code >= 400:
            error_of(r, r.status_code)
        else:
            assert r.json()["image"]
    health = client.get("/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert client.post("/v1/images", json={"prompt": PROMPT, "steps": 2}).status_code == 200
    assert sum(outcomes(client).values()) >= count
    return statuses


def test_fuzz_the_request_schema(tiny_sg):
    with make_client(tiny_sg, cost=CostModel.fixed(0.01, 0.02, 0.01)) as c:
        statuses = fuzz(c, 400, seed=0)
    assert statuses.get(200, 0) >= 20 and statuses.get(422, 0) >= 100, statuses  # both kinds were reached


@pytest.mark.slow
def test_fuzz_the_request_schema_thousands(tiny_sg):
    with make_client(tiny_sg, cost=CostModel.fixed(0.01, 0.02, 0.01)) as c:
        statuses = fuzz(c, 3000, seed=1)
    assert statuses.get(200, 0) >= 100, statuses


def test_health_and_host_names_of_the_command_line(tmp_path):
    import argparse

    from sgfast.serve.cli import add_arguments, allowed_hosts, display_name
    from sgfast.serve.guard import host_name

    folder = tmp_path / "my-model"
    folder.mkdir()
    assert display_name(str(folder), str(folder)) == "my-model"  # a folder's name, not its path
    assert display_name("default", f"built-in model ({tmp_path})") == "built-in model"
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert allowed_hosts(parser.parse_args([])) == ("127.0.0.1", "localhost", "::1")
    assert not parser.parse_args([]).docs and parser.parse_args(["--docs"]).docs  # /docs and /openapi.json: off unless asked
    args = parser.parse_args(["--host", "0.0.0.0", "--allowed-hosts", "gpu-box.lan, Serve.Example"])
    assert allowed_hosts(args) == ("127.0.0.1", "localhost", "::1", "gpu-box.lan", "serve.example")
    assert [host_name(h) for h in ("LocalHost:8000", "[::1]:8000", "::1", "127.0.0.1")] == ["localhost", "::1", "::1", "127.0.0.1"]
    # Userinfo, paths, spaces and stray colons name no host of ours (the last colon is not where the port starts).
    for fooled in ("127.0.0.1:8000@evil.example", "evil.example@127.0.0.1", "127.0.0.1/evil", "127.0.0.1 evil", "127.0.0.1:80:80",
                   "[::1", "::1@evil", "127.0.0.1:8000#x"):
        assert host_name(fooled) is None, fooled


def test_a_host_header_with_userinfo_is_refused(client):
    before = outcomes(client)
    r = client.post("/v1/images", json={"prompt": PROMPT}, headers={"host": "127.0.0.1:8000@evil.example"})
    assert "evil.example" in error_of(r, 400)["message"]
    assert outcomes(client).get("bad_request", 0) == before.get("bad_request", 0) + 1


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le"])
def test_json_bodies_must_be_utf8(client, encoding):
    body = json.dumps({"prompt": PROMPT, "steps": 1}).encode(encoding)
    assert json.loads(body)["prompt"] == PROMPT  # Python's json would take it
    r = client.post("/v1/images", content=body, headers={"content-type": "application/json"})
    assert "UTF-8" in error_of(r, 415)["message"]
    charset = client.post("/v1/images", content=body, headers={"content-type": f"application/json; charset={encoding}"})
    assert encoding in error_of(charset, 415)["message"]


def test_no_redirect_for_a_trailing_slash_and_no_docs_by_default(tiny_sg, client):
    for r in (client.get("/v1/images/", follow_redirects=False), client.post("/v1/images/", json={"prompt": PROMPT}, follow_redirects=False)):
        assert "did you mean /v1/images?" in error_of(r, 404)["message"]
    for path in ("/docs", "/openapi.json"):
        error_of(client.get(path), 404)
    from fastapi.testclient import TestClient

    engine = Engine(tiny_sg, model="tiny", cost=CostModel.fixed(20, 60, 10), threads=1)
    with TestClient(create_app(engine, docs=True), base_url="http://localhost") as c:
        assert c.get("/openapi.json").json()["paths"]["/v1/images"] and c.get("/docs").status_code == 200


def test_an_unexpected_exception_is_answered_in_the_schema_and_counted_once(tiny_sg, monkeypatch):
    from sgfast.serve import app as app_module

    with make_client(tiny_sg) as c:
        monkeypatch.setattr(c.engine.sg, "words", lambda prompt: {}["boom"])  # a bug after the image is made
        r = c.post("/v1/images", json={"prompt": PROMPT, "steps": 1})
        assert "internal error: KeyError" in error_of(r, 500)["message"]
        assert "error" in error_of(c.get("/v1/words", params={"prompt": PROMPT}), 500)["type"]
        monkeypatch.setattr(app_module, "photo_of", lambda body, limits: 1 / 0)
        r = c.post("/v1/edits", json={"photo": "AAAA", "prompt": PROMPT, "edits": [{"type": "move", "word": "circle"}]})
        assert "ZeroDivisionError" in error_of(r, 500)["message"]
        monkeypatch.undo()
        assert c.post("/v1/images", json={"prompt": PROMPT, "steps": 1}).status_code == 200  # it carries on
        assert outcomes(c) == {"error": 1, "ok": 1}
        assert 'sgfast_photo_edits_total{outcome="error"} 1.0' in c.get("/metrics").text


def test_messages_carry_no_heap_addresses():
    from sgfast.serve.errors import error_detail, raw_response

    message = "cannot identify image file <_io.BytesIO object at 0x7fe1c2a3b4d0>; <function f at 0xABCDEF12>"
    assert error_detail(500, message)["message"] == "cannot identify image file <_io.BytesIO object>; <function f>"
    assert b"0x" not in raw_response(400, "Bad Request", message)
