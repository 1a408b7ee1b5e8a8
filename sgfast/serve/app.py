"""HTTP server: `python -m sgfast serve --model tiny --host 127.0.0.1 --port 8000`.

    POST /v1/images   {"prompt": ..., "edits": [{"type": "move", "word": "circle", "dx": 0.25}],
                       "seed": 0, "steps": 20, "guidance_scale": 7.5, "size": 64, "budget_ms": 2000}
                      -> JSON with the PNG in base64, the plan run, timings and any degradation;
                         the PNG itself with `Accept: image/png` or `"format": "png"`
    GET  /v1/words    ?prompt=... -> the words edits can name
    GET  /healthz     liveness, queue depth, policy, cost model
    GET  /metrics     Prometheus text format
    GET  /            a small page: generate, click a word then a point to move it there, resize

Edits (by word of the prompt): move (dx, dy), place (x, y in [0, 1]), resize (scale), keep_shape and
keep_appearance (words); each takes an optional `weight`, the object edits `keep_others` and the
keep terms' weights (`keep_shape_weight`, `keep_appearance_weight`, `keep_centroid_weight`). Other fields:
negative_prompt, self_guidance_scale, normalize_gradient, size (a side, or [width, height]), format
("json" or "png").

Answers: 200 with `steps`, `guided_steps`, `reference_steps` (0 when the unedited trace was cached),
`degraded`/`degradation`, `timings` (queue_ms, run_ms, total_ms, predicted_ms), `deadline_missed`,
`cache_hit`, `batch_size`, `words`; 422 for bad input (schema, caps, unknown words naming the prompt's
words, a budget no plan can ever meet); 413 for a body over the cap; 503 when the request would miss
its budget under `--policy reject` (or would make queued requests miss theirs), the queue is full, its
deadline passed while queued, or the server is shutting down (`detail` says which, with the predicted
time and what would fit, and Retry-After); 500 when generation failed (the worker carries on).

The engine (`sgfast.serve.engine`) does the work: admission against the budget, EDF queue, one worker
thread owning the model, batching of same-shape requests and the reference-trace cache. Flags:
`python -m sgfast serve --help`. Needs the `serve` extra: `pip install -e '.[serve]'`.
"""

import asyncio
import base64
import io
import json
import os

from sgfast.serve.admission import Rejected
from sgfast.serve.metrics import Metrics
from sgfast.serve.schema import ImageRequest, InvalidRequest, to_spec

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


class BodyLimit:
    """ASGI middleware: answer 413 to a request body over `max_bytes` (declared or streamed)."""

    def __init__(self, app, max_bytes):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(send)
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._too_large(send)

    async def _too_large(self, send):
        body = json.dumps({"detail": f"request body over {self.max_bytes} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


def result_payload(result, words):
    """The JSON answer without the image."""
    plan = result.plan
    return {
        "seed": result.spec.seed,
        "width": result.spec.width,
        "height": result.spec.height,
        "steps": plan.steps,
        "guided_steps": plan.guided_steps,
        "reference_steps": plan.reference_steps,
        "degraded": result.degradation is not None,
        "degradation": result.degradation,
        "timings": result.timings,
        "deadline_missed": result.deadline_missed,
        "cache_hit": result.cache_hit,
        "batch_size": result.batch_size,
        "edits": result.spec.edit_specs,
        "words": words,
    }


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def create_app(engine, *, drain_on_shutdown=True, shutdown_timeout=None, start=True):
    """The FastAPI app in front of `engine`. The engine's worker starts with the app (lifespan) unless
    it is already running; on shutdown it drains (or cancels) the queue so every request is answered."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, Response

    metrics = engine.metrics
    if metrics is None:
        metrics = engine.metrics = Metrics(lambda: engine)

    @asynccontextmanager
    async def lifespan(app):
        if start and not engine.alive:
            await asyncio.get_running_loop().run_in_executor(None, engine.start)
        yield
        await asyncio.get_running_loop().run_in_executor(None, lambda: engine.shutdown(drain_on_shutdown, shutdown_timeout))

    app = FastAPI(title="sgfast", version="0.1.0", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.engine = engine

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc):
        metrics.request_done("invalid")
        errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    def words_of(prompt):
        return engine.sg.words(prompt)

    @app.post("/v1/images")
    async def images(body: ImageRequest, request: Request):
        try:
            spec = to_spec(body, engine)
        except InvalidRequest as e:
            metrics.request_done("invalid")
            return JSONResponse({"detail": e.detail}, status_code=422)
        try:
            job = engine.submit(spec)
        except Rejected as e:
            metrics.request_done("rejected" if e.status == 503 else "invalid")
            return rejected(e)
        try:
            result = await asyncio.wrap_future(job.future)
        except Rejected as e:
            return rejected(e)
        except ValueError as e:
            return JSONResponse({"detail": f"invalid request: {e}"}, status_code=422)
        except Exception as e:
            return JSONResponse({"detail": f"generation failed: {type(e).__name__}: {e}"}, status_code=500)
        payload = result_payload(result, words_of(spec.prompt))
        png = await asyncio.get_running_loop().run_in_executor(None, png_bytes, result.image)  # off the event loop
        accept = request.headers.get("accept", "")
        if body.format == "png" or ("image/png" in accept and "application/json" not in accept):
            headers = {
                "X-Sgfast-Timings": json.dumps(result.timings),
                "X-Sgfast-Plan": json.dumps({k: payload[k] for k in ("steps", "guided_steps", "reference_steps")}),
                "X-Sgfast-Degradation": json.dumps(result.degradation),
                "X-Sgfast-Cache-Hit": str(result.cache_hit).lower(),
                "X-Sgfast-Deadline-Missed": str(result.deadline_missed).lower(),
            }
            return Response(png, media_type="image/png", headers=headers)
        payload["image"] = base64.b64encode(png).decode()
        payload["format"] = "png"
        return payload

    def rejected(e):
        headers = {}
        if e.status == 503:
            headers["Retry-After"] = str(e.detail.get("retry_after_s", 1))
        return JSONResponse({"detail": e.detail}, status_code=e.status, headers=headers)

    @app.get("/v1/words")
    async def words(prompt: str):
        if not prompt.strip() or len(prompt) > engine.limits.max_prompt_chars:
            return JSONResponse({"detail": "prompt must be non-blank and within the length cap"}, status_code=422)
        return {"prompt": prompt, "words": words_of(prompt)}

    @app.get("/healthz")
    async def healthz():
        ok = engine.alive and not engine.closing
        body = {
            "status": "ok" if ok else ("shutting down" if engine.closing else "worker not running"),
            "model": engine.model,
            "replica": engine.replica,
            "policy": engine.policy,
            "queue_depth": engine.depth(),
            "native_size": engine.native,
            "limits": {k: getattr(engine.limits, k) for k in vars(engine.limits)},
            "cost_ms": engine.cost.snapshot() if engine.cost is not None else None,
            "trace_cache": {"entries": len(engine.cache), "bytes": engine.cache.bytes, "hits": engine.cache.hits},
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/")
    async def index():
        return FileResponse(os.path.join(STATIC, "index.html"), media_type="text/html")

    return BodyLimit(app, engine.limits.max_body_bytes) if engine.limits.max_body_bytes else app


def app_of(asgi):
    """The FastAPI app inside the body-limit middleware."""
    return getattr(asgi, "app", asgi)
