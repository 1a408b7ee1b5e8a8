"""The Ray Serve deployment on the CPU: a local Ray instance, two CPU replicas of the tiny model
behind Ray's HTTP proxy on loopback, the same API as `python -m sgfast serve`.

Slow (Ray starts in tens of seconds); skipped when Ray Serve is not installed (`pip install -e '.[ray]'`)."""

import socket
import time

import pytest

pytestmark = pytest.mark.slow

WAIT = 300


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_url():
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    pytest.importorskip("fastapi")
    from sgfast.serve.ray_serve import deployment

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = deployment({"model": "tiny", "default_steps": 6, "max_batch": 2}, replicas=2, cpus_per_replica=1)
        serve.run(app, name="sgfast", route_prefix="/")
        yield f"http://127.0.0.1:{port}", serve
    finally:
        serve.shutdown()
        ray.shutdown()


def test_option_parsing():
    pytest.importorskip("ray.serve")
    from sgfast.serve.ray_serve import engine_arguments

    args = engine_arguments({"model": "tiny", "max_batch": "3", "no_drain": "true", "policy": "reject"})
    assert (args.model, args.max_batch, args.no_drain, args.policy) == ("tiny", 3, True, "reject")
    with pytest.raises(ValueError, match="unknown option"):
        engine_arguments({"modle": "tiny"})


def test_two_cpu_replicas_serve_the_same_api(ray_url):
    import httpx

    url, serve = ray_url
    status = serve.status().applications["sgfast"]
    replicas = status.deployments["sgfast"].replica_states
    assert replicas.get("RUNNING") == 2, replicas
    with httpx.Client(timeout=WAIT) as client:
        seen = set()
        deadline = time.monotonic() + 60
        while len(seen) < 2 and time.monotonic() < deadline:  # Ray spreads requests over both replicas
            health = client.get(url + "/healthz").json()
            assert health["status"] == "ok" and health["model"] == "tiny random-weight pipeline"
            seen.add(health["replica"])
        assert len(seen) == 2, seen
        r = client.post(url + "/v1/images", json={"prompt": "a red circle and a blue square", "seed": 1})
        assert r.status_code == 200, r.text
        data = r.json()
        assert data["steps"] == 6 and data["image"]
        r = client.post(url + "/v1/images", json={"prompt": "a red circle", "edits": [{"type": "move", "word": "circle", "dx": 0.2}]})
        assert r.status_code == 200 and r.json()["guided_steps"] > 0
        r = client.post(url + "/v1/images", json={"prompt": "a red circle", "edits": [{"type": "move", "word": "cat", "dx": 0.2}]})
        assert r.status_code == 422 and "its words are" in r.text
        r = client.post(url + "/v1/images", json={"prompt": "a red circle"}, headers={"Accept": "image/png"})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert "sgfast_queue_depth" in client.get(url + "/metrics").text
