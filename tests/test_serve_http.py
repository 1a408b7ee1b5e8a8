"""The server over real HTTP: uvicorn on an ephemeral loopback port, concurrent clients, and a
graceful shutdown while requests are queued (every one is answered)."""

import threading
import time

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from sgfast import SelfGuidancePipeline  # noqa: E402
from sgfast.serve.admission import Limits  # noqa: E402
from sgfast.serve.app import create_app  # noqa: E402
from sgfast.serve.cost import CostModel  # noqa: E402
from sgfast.serve.engine import Engine  # noqa: E402
from sgfast.testing import tiny_pipeline  # noqa: E402

WAIT = 60


def start_server(engine):
    config = uvicorn.Config(create_app(engine), host="127.0.0.1", port=0, log_level="warning", timeout_graceful_shutdown=WAIT)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, thread, f"http://127.0.0.1:{port}"


class Held:
    """A SelfGuidancePipeline whose calls wait for `go` (so that requests pile up in the queue)."""

    def __init__(self, sg):
        self.sg, self.pipe, self.go = sg, sg.pipe, threading.Event()

    def words(self, prompt):
        return self.sg.words(prompt)

    def __call__(self, *args, **kw):
        assert self.go.wait(WAIT)
        return self.sg(*args, **kw)


def test_concurrent_clients_and_graceful_shutdown_with_a_queue():
    sg = Held(SelfGuidancePipeline.from_pipe(tiny_pipeline(seed=0)))
    engine = Engine(sg, model="tiny", cost=CostModel.fixed(20, 50, 10), limits=Limits(min_steps=2, default_steps=4), threads=1)
    server, thread, url = start_server(engine)
    answers, lock = [], threading.Lock()

    def client(i):
        body = {"prompt": ["a red circle", "a blue square", "a red circle and a blue square"][i % 3], "seed": i % 2, "steps": 4}
        if i % 2:
            body["edits"] = [{"type": "move", "word": "circle" if i % 3 != 1 else "square", "dx": 0.2}]
        with httpx.Client(timeout=WAIT) as c:
            r = c.post(url + "/v1/images", json=body)
        with lock:
            answers.append(r)

    try:
        with httpx.Client(timeout=WAIT) as c:
            assert c.get(url + "/healthz").json()["status"] == "ok"
        clients = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in clients:
            t.start()
        deadline = time.monotonic() + WAIT
        while engine.admitted < 8 and time.monotonic() < deadline:
            time.sleep(0.005)
        queued = engine.depth()
        server.should_exit = True  # as on SIGINT/SIGTERM: stop accepting, answer what is in flight, drain
        time.sleep(0.2)
        sg.go.set()
        for t in clients:
            t.join(WAIT)
        thread.join(WAIT)
    finally:
        sg.go.set()
        server.should_exit = True
        engine.shutdown(drain=False, timeout=WAIT)
    assert queued > 0  # requests were still waiting (the rest held in the running batch) when shutdown began
    assert len(answers) == 8
    assert [r.status_code for r in answers] == [200] * 8, [r.text[:200] for r in answers if r.status_code != 200]
    assert not engine.alive and engine.depth() == 0
