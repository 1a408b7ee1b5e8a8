"""The server's promises under faults, over real HTTP (uvicorn on an ephemeral loopback port, the
server `python -m sgfast serve` runs): shutdown within its deadline with every request answered,
abandoned requests cancelled, stalled and slow clients bounded, one error schema, outcomes that add
up. The tiny pipeline on CPU; no assertion depends on how fast the model runs."""

import json
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from sgfast import SelfGuidancePipeline  # noqa: E402
from sgfast.serve.admission import Limits  # noqa: E402
from sgfast.serve.app import create_app  # noqa: E402
from sgfast.serve.cost import CostModel  # noqa: E402
from sgfast.serve.engine import Engine  # noqa: E402
from sgfast.serve.http import server as http_server  # noqa: E402
from sgfast.testing import tiny_pipeline  # noqa: E402

WAIT = 60
PROMPT = "a red circle and a blue square"


@pytest.fixture(scope="module")
def tiny_sg():
    return SelfGuidancePipeline.from_pipe(tiny_pipeline(seed=0))


class Held:
    """A SelfGuidancePipeline whose calls wait for `go`, recording the prompts of every call."""

    def __init__(self, sg):
        self.sg, self.pipe, self.go, self.entered = sg, sg.pipe, threading.Event(), threading.Event()
        self.calls = []

    def words(self, prompt):
        return self.sg.words(prompt)

    def __call__(self, prompts, **kw):
        self.calls.append(list(prompts))
        self.entered.set()
        assert self.go.wait(WAIT)
        return self.sg(prompts, **kw)


class Running:
    """An engine behind the real HTTP server (sgfast.serve.http) in a thread."""

    def __init__(self, sg, drain=True, drain_timeout_s=WAIT, header_timeout_s=10.0, body_timeout_s=10.0, max_connections=64, **limits):
        limits = {"min_steps": 1, "default_steps": 3, "max_batch": 1, **limits}
        self.engine = Engine(sg, model="tiny", cost=CostModel.fixed(20, 50, 10), limits=Limits(**limits), threads=1)
        app = create_app(self.engine, drain_on_shutdown=drain, shutdown_timeout=drain_timeout_s, body_timeout_s=body_timeout_s)
        self.server = http_server(
            app, self.engine, port=0, drain=drain, drain_timeout_s=drain_timeout_s, header_timeout_s=header_timeout_s,
            max_connections=max_connections, log_level="warning",
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + WAIT
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True  # what uvicorn's SIGTERM/SIGINT handler does
        self.thread.join(WAIT)

    def metrics(self):
        return outcomes(httpx.get(self.url + "/metrics", timeout=WAIT).text)


def outcomes(text):
    """{outcome: count} of sgfast_requests_total in a /metrics page."""
    found = {}
    for line in text.splitlines():
        if line.startswith("sgfast_requests_total{"):
            label, value = line.split("} ")
            found[label.split('"')[1]] = float(value)
    return found


def wait_for(condition, what):
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def post_in_thread(url, body, answers, headers=None):
    def run():
        try:
            with httpx.Client(timeout=WAIT) as c:
                answers.append(c.post(url + "/v1/images", json=body, headers=headers))
        except httpx.HTTPError as e:
            answers.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def assert_error_schema(response, status):
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    detail = response.json()["detail"]
    assert detail["status"] == status and isinstance(detail["type"], str) and isinstance(detail["message"], str)
    return detail


def raw_request(port, data, read=True, timeout=WAIT):
    """Send raw bytes on a new connection; returns (status, parsed JSON body or None, socket)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(data)
    if not read:
        return None, None, sock
    reply = b""
    while b"\r\n\r\n" not in reply or len(reply.split(b"\r\n\r\n", 1)[1]) < _length(reply):
        chunk = sock.recv(65536)
        if not chunk:
            break
        reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    status = int(head.split()[1]) if head else None
    return status, (json.loads(body) if body else None), sock


def _length(reply):
    for line in reply.split(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


# ----------------------------------------------------------------------------------------------
# 1. Shutdown


@pytest.mark.parametrize("drain", [True, False])
def test_shutdown_answers_every_request_503_json_within_the_deadline(tiny_sg, drain):
    sg = Held(tiny_sg)
    run = Running(sg, drain=drain, drain_timeout_s=2.0)
    answers, clients = [], []
    try:
        clients.append(post_in_thread(run.url, {"prompt": "a cat", "steps": 3}, answers))
        assert sg.entered.wait(WAIT)  # the worker holds the first request; the rest queue behind it
        for i in range(4):
            clients.append(post_in_thread(run.url, {"prompt": f"a dog {i}", "steps": 3}, answers))
        wait_for(lambda: run.engine.depth() == 4, "4 queued requests")
        stopping = time.monotonic()
        stopper = threading.Thread(target=run.stop)
        stopper.start()
        # Without draining the queued requests are answered at once, not at the deadline.
        if not drain:
            wait_for(lambda: len(answers) >= 4, "the queued requests' answers")
            assert time.monotonic() - stopping < 1.5
        stopper.join(WAIT)
        stopped = time.monotonic() - stopping
        for t in clients:
            t.join(WAIT)
    finally:
        sg.go.set()
        run.server.should_exit = True
    assert stopped < 2.0 + 2.5, f"stopped after {stopped:.1f} s with a 2 s deadline"
    assert len(answers) == 5
    for r in answers:  # the held one included: nothing finished by the deadline
        detail = assert_error_schema(r, 503)
        assert detail["type"] == "shutting_down" and int(r.headers["retry-after"]) >= 1
    assert not run.thread.is_alive()


def test_a_stalled_upload_does_not_hold_the_shutdown(tiny_sg):
    run = Running(tiny_sg, drain_timeout_s=1.5, body_timeout_s=30.0)
    head = f"POST /v1/images HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n"
    _, _, sock = raw_request(run.port, head.encode() + b'{"prompt": "a', read=False)
    half = socket.create_connection(("127.0.0.1", run.port))
    half.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # headers never finished
    try:
        time.sleep(0.2)
        stopping = time.monotonic()
        run.stop()
        assert not run.thread.is_alive() and time.monotonic() - stopping < 1.5 + 2.5
    finally:
        sock.close()
        half.close()


@pytest.mark.slow
def test_sigterm_on_the_command_line_server(tmp_path):
    """`python -m sgfast serve` itself: SIGTERM with more queued work than the deadline allows; every
    client gets a 200 or a JSON 503 with Retry-After and the process exits within the deadline."""
    import os
    import signal
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "server.log", "w")
    command = [sys.executable, "-m", "sgfast", "serve", "--model", "tiny", "--port", str(port), "--max-batch", "1",
               "--threads", "1", "--drain-timeout", "3", "--max-steps", "100", "--log-level", "warning"]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None and time.monotonic() < deadline, open(tmp_path / "server.log").read()
            try:
                if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert "/" not in httpx.get(url + "/healthz", timeout=5).json()["model"]  # no machine path
        answers = []
        clients = [post_in_thread(url, {"prompt": f"a cat {i}", "steps": 100}, answers) for i in range(12)]
        time.sleep(2.0)
        stopping = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(WAIT)
        stopped = time.monotonic() - stopping
        for t in clients:
            t.join(WAIT)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
    assert stopped < 3 + 3, f"exited {stopped:.1f} s after SIGTERM with a 3 s deadline"
    assert len(answers) == 12
    late = [r for r in answers if not isinstance(r, Exception) and r.status_code == 503]
    assert late and all(r.status_code in (200, 503) for r in answers), [getattr(r, "text", r) for r in answers]
    for r in late:
        assert_error_schema(r, 503)
        assert "retry-after" in r.headers


# ----------------------------------------------------------------------------------------------
# 2. Abandoned requests


def test_abandoned_requests_are_cancelled_queued_and_running(tiny_sg):
    sg = Held(tiny_sg)
    run = Running(sg)
    try:
        body = json.dumps({"prompt": "a cat", "steps": 3}).encode()
        request = (f"POST /v1/images HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        _, _, running = raw_request(run.port, request, read=False)
        assert sg.entered.wait(WAIT)
        queued = [raw_request(run.port, request.replace(b"a cat", b"a dog"), read=False)[2] for _ in range(3)]
        wait_for(lambda: run.engine.depth() == 3, "3 queued requests")
        for sock in queued + [running]:
            sock.close()
        wait_for(lambda: run.engine.depth() == 0, "the abandoned requests to leave the queue")
        sg.go.set()  # the held call resumes and stops at its next UNet call: nobody is waiting for it
        wait_for(lambda: run.metrics().get("cancelled") == 4, "4 cancelled requests")
        assert run.engine.batches == 0 and sg.calls == [["a cat"]]  # none of the queued ones ran
        ok = httpx.post(run.url + "/v1/images", json={"prompt": "a bird", "steps": 2}, timeout=WAIT)
        assert ok.status_code == 200 and run.metrics() == {"cancelled": 4, "ok": 1}
    finally:
        sg.go.set()
        run.stop()


# ----------------------------------------------------------------------------------------------
# 4 and 6. Bodies, headers and connections


def test_chunked_body_over_the_cap_is_413(tiny_sg):
    run = Running(tiny_sg, max_body_bytes=1024)
    try:
        def chunks():
            yield b'{"prompt": "'
            for _ in range(20):
                yield b"a" * 100
            yield b'"}'

        r = httpx.post(run.url + "/v1/images", content=chunks(), headers={"content-type": "application/json"}, timeout=WAIT)
        assert "over the cap of 1024 bytes" in assert_error_schema(r, 413)["message"]
        declared = httpx.post(run.url + "/v1/images", json={"prompt": "a" * 2000}, timeout=WAIT)
        assert_error_schema(declared, 413)
        assert run.metrics() == {"too_large": 2}
    finally:
        run.stop()


def test_slow_headers_and_bodies_are_cut_and_connections_capped(tiny_sg):
    run = Running(tiny_sg, header_timeout_s=0.5, body_timeout_s=0.5, max_connections=4)
    try:
        # Headers never finished: the connection is closed after the header deadline.
        _, _, sock = raw_request(run.port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n", read=False)
        sock.settimeout(WAIT)
        started = time.monotonic()
        assert sock.recv(100) == b"" and time.monotonic() - started < 5
        sock.close()
        # A body that stops halfway: 408 in the error schema after the body deadline.
        head = b"POST /v1/images HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        status, body, sock = raw_request(run.port, head + b'{"prompt"')
        sock.close()
        assert status == 408 and body["detail"]["type"] == "timeout" and "within 0.5 s" in body["detail"]["message"]
        # More connections than the cap: the extra one is answered 503 JSON and closed.
        held = [raw_request(run.port, b"", read=False)[2] for _ in range(4)]
        status, body, sock = raw_request(run.port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert status == 503 and "too many connections" in body["detail"]["message"]
        for s in held + [sock]:
            s.close()
        wait_for(lambda: httpx.get(run.url + "/healthz", timeout=WAIT).status_code == 200, "the server to serve again")
        assert run.metrics() == {"timeout": 1}
        assert refused(httpx.get(run.url + "/metrics", timeout=WAIT).text) == {("too_many_connections", "503"): 1.0}
    finally:
        run.stop()


def test_host_header_must_name_this_server(tiny_sg):
    run = Running(tiny_sg)
    try:
        for host in ("127.0.0.1", f"127.0.0.1:{run.port}", "localhost", f"localhost:{run.port}"):
            assert httpx.get(run.url + "/healthz", headers={"host": host}, timeout=WAIT).status_code == 200
        r = httpx.post(run.url + "/v1/images", json={"prompt": "a cat"}, headers={"host": "rebound.example"}, timeout=WAIT)
        assert "rebound.example" in assert_error_schema(r, 400)["message"]
        assert run.metrics() == {"bad_request": 1}
    finally:
        run.stop()


def test_a_second_server_on_a_busy_port_fails_before_loading_the_model():
    import subprocess
    import sys

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "sgfast", "serve", "--model", "tiny", "--port", str(port)],
            capture_output=True, text=True, timeout=WAIT,
        )
    assert done.returncode != 0 and f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "model:" not in done.stdout and "calibrated" not in done.stdout + done.stderr
    assert time.monotonic() - started < WAIT


# ----------------------------------------------------------------------------------------------
# Below the app: request smuggling, the HTTP parser's refusals, the last resort


def refused(text):
    """{(reason, status): count} of sgfast_refused_connections_total in a /metrics page."""
    found = {}
    for line in text.splitlines():
        if line.startswith("sgfast_refused_connections_total{"):
            label, value = line.split("} ")
            parts = label.split('"')
            found[(parts[1], parts[3])] = float(value)
    return found


def closed_after(sock):
    """Whether the server closes the connection (nothing more is answered on it)."""
    sock.settimeout(WAIT)
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True
    finally:
        sock.close()


def test_content_length_with_transfer_encoding_is_400_and_closes_the_connection(tiny_sg):
    """RFC 9112 6.1: the bytes after the chunked body's end would otherwise run as a second request."""
    run = Running(tiny_sg)
    try:
        smuggled = b"0\r\n\r\nGET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        head = ("POST /v1/images HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(smuggled)}\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
        status, body, sock = raw_request(run.port, head + smuggled)
        assert status == 400 and "not both" in body["detail"]["message"] and body["detail"]["type"] == "bad_request"
        assert closed_after(sock)  # the smuggled GET got no answer
        page = httpx.get(run.url + "/metrics", timeout=WAIT).text
        assert run.metrics() == {"bad_request": 1}
        assert 'path="/metrics"' not in page  # this page is counted after it is made: the smuggled GET never ran
    finally:
        run.stop()


MALFORMED = {
    "garbage request line": (b"\x16\x03\x01\x02\x00 hello\r\n\r\n", 400),
    "bad header name": (b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Name: x\r\n\r\n", 400),
    "two content-lengths": (b"POST /v1/images HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}", 400),
    "NUL in a header": (b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: a\x00b\r\n\r\n", 400),
    "a transfer coding not chunked": (b"POST /v1/images HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
}


def test_the_parsers_refusals_are_answered_in_the_schema_and_counted(tiny_sg):
    run = Running(tiny_sg)
    try:
        for case, (data, expected) in MALFORMED.items():
            status, body, sock = raw_request(run.port, data)
            assert status == expected, case
            assert body["detail"]["status"] == expected and "malformed HTTP/1.1 request" in body["detail"]["message"], case
            assert closed_after(sock), case
        # A chunked body that breaks off into garbage, after the request reached the app: counted there.
        head = b"POST /v1/images HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        status, body, sock = raw_request(run.port, head + b"4\r\n{\"pr\r\nzz\r\n")
        assert status == 400 and body["detail"]["type"] == "bad_request" and closed_after(sock)
        wait_for(lambda: run.metrics() == {"bad_request": 1}, "the broken body to be counted")
        page = httpx.get(run.url + "/metrics", timeout=WAIT).text
        assert refused(page) == {("malformed_request", "400"): 4.0, ("malformed_request", "501"): 1.0}
        # No WebSocket routes: an upgrade request is a plain HTTP request, answered and counted as one.
        upgrade = (b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                   b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        status, body, sock = raw_request(run.port, upgrade)
        sock.close()
        assert status == 200 and body["status"] == "ok"
        assert 'sgfast_other_requests_total{path="/healthz",status="200"} 1.0' in httpx.get(run.url + "/metrics", timeout=WAIT).text
    finally:
        run.stop()


def test_an_unexpected_exception_over_http_is_json_and_keeps_the_connection(tiny_sg, monkeypatch):
    run = Running(tiny_sg)
    try:
        monkeypatch.setattr(run.engine.sg, "words", lambda prompt: {}["boom"])
        with httpx.Client(timeout=WAIT) as c:
            r = c.get(run.url + "/v1/words", params={"prompt": PROMPT})
            assert "internal error: KeyError" in assert_error_schema(r, 500)["message"]
            monkeypatch.undo()
            assert c.get(run.url + "/v1/words", params={"prompt": PROMPT}).status_code == 200
            page = c.get(run.url + "/metrics").text
        assert 'sgfast_other_requests_total{path="/v1/words",status="500"} 1.0' in page
    finally:
        run.stop()
