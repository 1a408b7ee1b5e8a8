"""The HTTP server under the app (uvicorn), with the promises the app alone cannot keep:

- connections: at most `max_connections` open (one more is answered 503 JSON and closed), and each
  must deliver a request's headers within `header_timeout_s` of opening (or of its previous answer)
  or it is closed: a client that never finishes its headers holds nothing;
- requests the HTTP parser refuses (h11: a garbage request line, a bad header name or value, two
  different Content-Lengths, a transfer coding other than chunked) are answered in the error schema,
  closed and counted (`sgfast_refused_connections_total`), as connections over the cap are;
- shutdown (SIGTERM, SIGINT): the engine hears of it at once, not after uvicorn has waited for every
  handler; it answers every request within `drain_timeout_s` (queued ones run when they fit, the rest
  503 JSON with Retry-After) and the process stops then;
- the port is bound before the model loads, so a busy port fails at once.
"""

import asyncio
import socket

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE, H11Protocol

from sgfast.serve.errors import outcome_of, raw_response


def bind(host, port):
    """A listening socket on (host, port), or OSError naming them."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class _Parser(h11.Connection):
    """h11's connection, keeping the last parse error (uvicorn's protocol drops it for a fixed text)."""

    error = None

    def next_event(self):
        try:
            return super().next_event()
        except h11.RemoteProtocolError as error:
            self.error = error
            raise


def guarded_protocol(header_timeout_s, max_connections, metrics=lambda: None):
    """uvicorn's h11 protocol (pinned: its httptools one parses and answers differently) with a deadline
    on request headers, a cap on open connections, and malformed requests answered in the error
    schema and counted (`metrics()`: the server's Metrics, or None)."""

    class Guarded(H11Protocol):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.conn = _Parser(h11.SERVER, self.config.h11_max_incomplete_event_size or DEFAULT_MAX_INCOMPLETE_EVENT_SIZE)

        def connection_made(self, transport):
            super().connection_made(transport)
            self.header_timer = None
            if len(self.connections) > max_connections:
                transport.write(raw_response(503, "Service Unavailable", f"too many connections (at most {max_connections}); retry", retry_after_s=1))
                transport.close()
                self._count("too_many_connections", 503)
                return
            self._await_headers()

        def _count(self, reason, status):
            if metrics() is not None:
                metrics().refused_connection(reason, status)

        def send_400_response(self, msg):
            """A request h11 cannot parse (request line, header names or values, conflicting lengths, a
            transfer coding other than chunked, a bad chunk): answered in the schema, counted once, closed."""
            error = self.conn.error
            status = getattr(error, "error_status_hint", 400) or 400
            reason = str(error) if error is not None and str(error) else msg
            cycle = self.cycle
            in_flight = cycle is not None and not cycle.response_complete
            if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE) or (in_flight and cycle.response_started):
                self.transport.close()  # its answer is already going out, and counted with it
                return
            phrase = {400: "Bad Request", 431: "Request Header Fields Too Large", 501: "Not Implemented"}.get(status, "Bad Request")
            message = f"malformed HTTP/1.1 request: {reason[:200]}"
            self.transport.write(raw_response(status, phrase, message))
            if in_flight:  # its body was malformed: the guard, reading it, counts the request
                cycle.scope.setdefault("sgfast", {})["outcome"] = outcome_of(status)
            else:
                self._count("malformed_request", status)
            self.transport.close()

        def _await_headers(self):
            if self.header_timer is not None:
                self.header_timer.cancel()
            self.header_timer = self.loop.call_later(header_timeout_s, self._headers_late)

        def _headers_late(self):
            self.header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():  # no request headers yet
                self.transport.close()

        def data_received(self, data):
            super().data_received(data)
            if self.header_timer is not None and self.conn.their_state is not h11.IDLE:
                self.header_timer.cancel()
                self.header_timer = None

        def on_response_complete(self):
            super().on_response_complete()
            if not self.transport.is_closing():
                self._await_headers()  # the next request on this connection has the same deadline

        def connection_lost(self, exc):
            if getattr(self, "header_timer", None) is not None:
                self.header_timer.cancel()
            super().connection_lost(exc)

    return Guarded


class DrainingServer(uvicorn.Server):
    """uvicorn's server, telling the engine of a shutdown as soon as it begins."""

    def __init__(self, config, engine, drain=True, drain_timeout_s=30.0):
        super().__init__(config)
        self.engine = engine
        self.drain = drain
        self.drain_timeout_s = drain_timeout_s

    async def shutdown(self, sockets=None):
        # The engine answers every request by the deadline; uvicorn's own grace period (a little
        # longer) only lets those answers go out before it cancels what is left.
        await asyncio.get_running_loop().run_in_executor(None, self.engine.begin_shutdown, self.drain, self.drain_timeout_s)
        await super().shutdown(sockets)


def server(app, engine, *, host="127.0.0.1", port=0, drain=True, drain_timeout_s=30.0, header_timeout_s=10.0,
           max_connections=256, log_level="info"):
    """A DrainingServer for `app` (uvicorn Config from these settings)."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=guarded_protocol(header_timeout_s, max_connections, lambda: engine.metrics),
        ws="none",  # no WebSocket routes: an upgrade request is an HTTP request, answered and counted as one
        timeout_graceful_shutdown=drain_timeout_s + 2.0,
        timeout_keep_alive=5,
    )
    return DrainingServer(config, engine, drain=drain, drain_timeout_s=drain_timeout_s)
