"""The server's one error schema, for every non-2xx answer of every route and layer (the app, its ASGI
guard, the connection cap below the app):

    {"detail": {"status": 422, "type": "invalid", "message": "what was wrong and what is allowed", ...}}

`type` names the outcome (it is also the `outcome` label of `sgfast_requests_total`); `message` is one
readable sentence; extra fields carry specifics: `errors` (schema errors: loc, msg, type), `words`
(the prompt's words), predictions and what would fit (503), `retry_after_s`. No web dependency.
"""

import json
import re

# status -> the outcome a request answered with it ends in (handlers may say more: degraded, expired...)
OUTCOMES = {
    200: "ok",
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    408: "timeout",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid",
    431: "headers_too_large",
    500: "error",
    501: "not_implemented",
    503: "rejected",
}

# "<_io.BytesIO object at 0x7fe...>": a heap address says nothing to a client and something to an attacker.
_AT_ADDRESS = re.compile(r"<([^<>]*?) at 0x[0-9a-fA-F]+>")


def outcome_of(status):
    return OUTCOMES.get(status, "ok" if 200 <= status < 300 else f"http_{status}")


def without_addresses(text):
    """`text` with every repr's heap address left out ("<_io.BytesIO object at 0x7f...>" ->
    "<_io.BytesIO object>")."""
    return _AT_ADDRESS.sub(r"<\1>", text)


def error_detail(status, message, type=None, **extra):
    """The `detail` object of an error answer (its message without heap addresses)."""
    return {"status": status, "type": type or outcome_of(status), "message": without_addresses(message), **extra}


def error_body(status, message, type=None, **extra):
    return json.dumps({"detail": error_detail(status, message, type, **extra)}).encode()


def retry_after(detail):
    """The Retry-After header of a 503 (seconds), from its detail."""
    return str(max(1, int(detail.get("retry_after_s") or 1)))


async def send_error(send, status, message, type=None, close=False, **extra):
    """Answer an ASGI request with the error schema (for layers below the FastAPI app)."""
    body = error_body(status, message, type, **extra)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 503:
        headers.append((b"retry-after", retry_after(extra).encode()))
    if close:  # the request's body was not read to its end: this connection cannot carry another request
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def raw_response(status, reason, message, type=None, **extra):
    """A whole HTTP/1.1 answer as bytes, for a connection refused before any request was parsed."""
    body = error_body(status, message, type, **extra)
    head = [f"HTTP/1.1 {status} {reason}", "content-type: application/json", f"content-length: {len(body)}", "connection: close"]
    if status == 503:
        head.append(f"retry-after: {retry_after(extra)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body
