"""The ASGI layer in front of the FastAPI app: the checks every request passes before a route sees it,
and the one place that counts how each request ended.

- framing: Content-Length together with Transfer-Encoding -> 400, connection closed (RFC 9112 6.1:
  the two disagree on where the body ends, and the rest would run as a smuggled request);
- Host: only the configured host names (DNS rebinding: a page on another name that resolves to
  loopback must not reach the server), parsed strictly (no userinfo, no path) -> 400;
- POST bodies: JSON only -> 415; at most `max_body_bytes` (`photo_body_bytes` for /v1/edits, whose
  body carries a photo), declared or streamed (chunked) -> 413;
  read in full within `body_timeout_s` -> 408; in UTF-8, the only encoding of JSON over HTTP (RFC
  8259) -> 415. The route then gets the body already read, so a body error is answered here and
  never becomes the framework's "error parsing the body";
- the last resort: an exception nobody caught is logged and answered 500 in the schema (when no
  answer has started), counted once as "error";
- outcomes: each request to /v1/images ends in exactly one `sgfast_requests_total{outcome}` count, each
  to /v1/edits in one `sgfast_photo_edits_total{outcome}` count (the routes name finer outcomes such
  as degraded, expired or cancelled in `scope["sgfast"]`); every other route counts in
  `sgfast_other_requests_total{path,status}`.
"""

import asyncio
import ipaddress
import logging
import math
import re
import time

from sgfast.serve.errors import outcome_of, send_error

log = logging.getLogger("sgfast.serve")

IMAGES = "/v1/images"
EDITS = "/v1/edits"
KNOWN_PATHS = ("/v1/images", "/v1/edits", "/v1/words", "/healthz", "/metrics", "/")


# RFC 9110 7.2 / RFC 3986 3.2.2: Host = a name or IPv4 address, or an [IPv6] literal, then an optional :port.
# Anything else (userinfo "a:1@b", paths, spaces) names no host: such a header is never taken for ours.
_HOST = re.compile(r"(?P<name>[a-z0-9._~%!$&'()*+,;=-]*|\[(?P<literal>[0-9a-f:.]+)\])(?::[0-9]*)?")


def host_name(value):
    """The name in a Host header, without its port ("[::1]:8000" -> "::1"), or None when the header is
    not a host and port ("127.0.0.1:8000@evil.example")."""
    value = value.strip().lower()
    if value.count(":") > 1 and not value.startswith("["):  # a bare IPv6 address, as some clients send
        try:
            return str(ipaddress.IPv6Address(value))
        except ValueError:
            return None
    match = _HOST.fullmatch(value)
    if match is None:
        return None
    return match.group("literal") or match.group("name")


def is_json(content_type):
    media = content_type.split(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def charset_of(content_type):
    """The charset parameter of a content type, lowercased (None without one)."""
    for param in content_type.split(";")[1:]:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            return value.strip().strip('"').lower()
    return None


def is_utf8(body):
    """Whether a body is UTF-8 JSON could be: valid UTF-8 without NUL bytes (JSON has none outside
    escapes, while UTF-16 and UTF-32 text of ASCII is full of them, and Python's json takes those)."""
    if b"\x00" in body:
        return False
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class _BodyError(Exception):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


class Guard:
    """ASGI middleware: host check, JSON-only bodies with a size cap and a read deadline, outcome
    counting. `allowed_hosts`: names without ports (None: any)."""

    def __init__(
        self, app, metrics, max_body_bytes=64 * 1024, body_timeout_s=10.0, allowed_hosts=("127.0.0.1", "localhost", "::1"),
        stop_at=lambda: None, photo_body_bytes=None,
    ):
        self.app = app
        self.stop_at = stop_at  # -> time.monotonic() of the shutdown deadline, or None
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes or math.inf
        self.photo_body_bytes = photo_body_bytes or self.max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.allowed_hosts = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.monotonic()
        state = scope.setdefault("sgfast", {"outcome": None})
        status = None

        async def recorded(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._handle(scope, receive, recorded)
        except Exception as e:  # the last resort, a bug below: still one schema, one count, the connection kept sane
            log.exception("unexpected error answering %s %s", scope.get("method"), scope.get("path"))
            state["outcome"] = "error"  # whatever the route had noted before it failed
            if status is None:
                status = 500
                await send_error(send, 500, f"internal error: {type(e).__name__}; the server carries on", close=True)
        finally:
            self._count(scope, state, status, time.monotonic() - start)

    async def _handle(self, scope, receive, send):
        raw = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope.get("headers") or []]
        headers = dict(raw)
        names = {k for k, _ in raw}
        if "transfer-encoding" in names and "content-length" in names:
            # RFC 9112 6.1: the two disagree on where the body ends (request smuggling); a server that
            # does not reject such a request must still close the connection after it. We do both.
            return await send_error(
                send, 400, "a request may carry Content-Length or Transfer-Encoding, not both; send one", close=True
            )
        if self.allowed_hosts is not None and host_name(headers.get("host", "")) not in self.allowed_hosts:
            allowed = ", ".join(sorted(self.allowed_hosts))
            return await send_error(send, 400, f"host {headers.get('host', '')!r} is not served here; allowed host names: {allowed}", close=True)
        if scope["method"] != "POST":
            return await self.app(scope, receive, send)
        content_type = headers.get("content-type")
        if content_type is None or not is_json(content_type):
            what = "no content-type" if content_type is None else f"content-type {content_type!r}"
            return await send_error(send, 415, f"{what}: the body must be JSON, sent as content-type application/json", close=True)
        charset = charset_of(content_type)
        if charset not in (None, "utf-8", "utf8"):
            return await send_error(send, 415, f"charset {charset!r}: JSON over HTTP is UTF-8 (RFC 8259); send the body in UTF-8", close=True)
        cap = self.photo_body_bytes if scope.get("path") == EDITS else self.max_body_bytes
        declared = headers.get("content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > cap:
            return await send_error(send, 413, f"request body of {int(declared)} bytes is over the cap of {cap} bytes", close=True)
        try:
            body = await self._read_body(receive, cap)
        except _BodyError as e:
            extra = {"retry_after_s": 5} if e.status == 503 else {}
            return await send_error(send, e.status, str(e), "shutting_down" if e.status == 503 else None, close=True, **extra)
        if body is None:  # the client went away while sending (or the connection layer answered it)
            scope["sgfast"]["outcome"] = scope["sgfast"].get("outcome") or "cancelled"
            return
        if not is_utf8(body):
            return await send_error(
                send, 415, "the body is not UTF-8 (UTF-16 or UTF-32?): JSON over HTTP is UTF-8 (RFC 8259); send it in UTF-8"
            )
        await self.app(scope, _replay(body, receive), send)

    async def _read_body(self, receive, cap):
        """The whole body (None if the client disconnected), or _BodyError (413 over `cap` bytes, 408)."""
        deadline = time.monotonic() + self.body_timeout_s
        chunks, size = [], 0
        while True:
            try:
                # In slices, so that a shutdown is seen; a cancelled receive loses nothing.
                message = await asyncio.wait_for(receive(), min(max(deadline - time.monotonic(), 0.001), 0.25))
            except asyncio.TimeoutError:
                stop_at = self.stop_at()
                if stop_at is not None and time.monotonic() >= stop_at:
                    raise _BodyError(503, "the server stopped before the request body arrived") from None
                if time.monotonic() >= deadline:
                    raise _BodyError(408, f"the request body was not received within {self.body_timeout_s:g} s") from None
                continue
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > cap:
                raise _BodyError(413, f"request body over the cap of {cap} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _count(self, scope, state, status, elapsed_s):
        if self.metrics is None:
            return
        path = scope.get("path", "")
        if path not in (IMAGES, EDITS):
            self.metrics.other_request(path if path in KNOWN_PATHS else "other", status or 0)
            return
        outcome = state.get("outcome") or (outcome_of(status) if status is not None else "cancelled")
        if path == EDITS:
            self.metrics.photo_edit_done(outcome, elapsed_s)
        else:
            self.metrics.request_done(outcome, elapsed_s)


def _replay(body, receive):
    """An ASGI receive that gives the read body once, then the connection's own messages (disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
