"""HTTP server: `python -m sgfast serve --model tiny --host 127.0.0.1 --port 8000`.

    POST /v1/images   {"prompt": ..., "edits": [{"type": "move", "word": "circle", "dx": 0.25}],
                       "seed": 0, "steps": 20, "guidance_scale": 7.5, "size": 64, "budget_ms": 2000}
                      -> JSON with the PNG in base64, the plan run, timings and any degradation;
                         the PNG itself with `Accept: image/png` or `"format": "png"`
    POST /v1/edits    {"photo": "<PNG or JPEG, base64>", "prompt": "a red circle and a blue square",
                       "edits": [{"type": "move", "word": "circle", "dx": -0.2}], "strength": 1.0, "steps": 25}
                      -> the photo, inverted (sgfast.invert) and edited; the same answer as /v1/images
                         plus `inversion` (the reconstruction's PSNR, and the VAE's own)
    GET  /v1/words    ?prompt=... -> the words edits can name
    GET  /healthz     liveness, queue depth, policy, cost model
    GET  /metrics     Prometheus text format
    GET  /            a small page: generate, click a word then a point to move it there, resize

Edits (by word of the prompt): move (dx, dy), place (x, y in [0, 1]), resize (scale), keep_shape and
keep_appearance (words); each takes an optional `weight`, the object edits `keep_others` and the
keep terms' weights (`keep_shape_weight`, `keep_appearance_weight`, `keep_centroid_weight`, `keep_size_weight`),
move and place their own holds (`keep_own_shape_weight`, `keep_own_size_weight`, `keep_own_appearance_weight`)
and `shape_centroid_weight`, resize its own (`keep_own_centroid_weight`, `keep_own_shape_weight`,
`keep_own_shape_centroid_weight`); weights are numbers >= 0, an unknown field is a 422. Other fields:
negative_prompt, self_guidance_scale, normalize_gradient, size (a side, or [width, height]), format
("json" or "png").

Answers: 200 with `steps`, `guided_steps`, `reference_steps` (0 when the unedited trace was cached),
`degraded`/`degradation`, `timings` (queue_ms, run_ms, total_ms, predicted_ms), `deadline_missed`,
`cache_hit`, `batch_size`, `words`. Every other answer has one schema (`sgfast.serve.errors`):
`{"detail": {"status", "type", "message", ...}}`: 400 for a Host header this server does not answer
to, a request with both Content-Length and Transfer-Encoding (the connection is closed), or one the
HTTP parser refuses (`sgfast.serve.http`); 404 for a path with no route (no redirect for a trailing
slash); 406 when Accept takes neither JSON nor PNG; 408 for a body not received in time; 413 for a
body over the cap (declared or chunked); 415 for a body not sent as application/json, or not UTF-8;
422 for bad input (schema, caps, unknown words naming the prompt's words, an edit with no word to hold
or no guided step, a budget no plan can ever meet: `errors` lists the schema's complaints). Photos
(/v1/edits, `sgfast.serve.photo`): base64, wrapped or not, with or without a `data:image/...;base64,`
head; a PNG, JPEG or multi-picture JPEG (its first picture), turned upright by its EXIF orientation;
413 over `--max-photo-kb` or for a file that decompresses past what the server takes; 415 for a file
that is not a readable PNG or JPEG (whatever Pillow raised), or not 8 bits a channel (CMYK, 16-bit);
422 for a photo that is not base64 or whose upright sides are not multiples of the model's size step
up to `--max-size`. 503 with Retry-After when the request would miss its budget under `--policy
reject` (or make queued requests miss theirs), the queue is full, its deadline passed while queued,
or the server is stopping; 500 when generation failed, or for any error nobody expected (logged; the
server carries on). A client that goes away cancels its request. /docs and /openapi.json only with
`docs=True` (`--docs`).

The engine (`sgfast.serve.engine`, with the per-step scheduler of `sgfast.serve.iteration`) does the
work: admission against the budget, EDF queue, one worker thread owning the model, batching and the
reference-trace cache. Flags: `python -m sgfast serve --help`. Needs the `serve` extra:
`pip install -e '.[serve]'`.
"""

import asyncio
import base64
import io
import json
import os

from sgfast.serve.admission import Rejected
from sgfast.serve.errors import error_detail, retry_after
from sgfast.serve.guard import Guard
from sgfast.serve.metrics import Metrics
from sgfast.serve.schema import ImageRequest, InvalidRequest, PhotoEditRequest, photo_of, to_photo_spec, to_spec

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


def preferred_type(accept, offered=("application/json", "image/png")):
    """The offered media type the Accept header ranks highest (q-values, then specificity; ties go to
    the first offered), or None when it accepts none of them. No header: the first offered."""
    if not accept or not accept.strip():
        return offered[0]
    ranges = []
    for part in accept.split(","):
        media, *params = [p.strip() for p in part.split(";")]
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if media:
            ranges.append((media.lower(), q if 0.0 <= q <= 1.0 else 0.0))

    def quality(media_type):
        kind = media_type.split("/")[0]
        best = None  # (specificity, q) of the most specific matching range
        for media, q in ranges:
            specificity = 2 if media == media_type else 1 if media == kind + "/*" else 0 if media == "*/*" else None
            if specificity is not None and (best is None or specificity > best[0]):
                best = (specificity, q)
        return 0.0 if best is None else best[1]

    scored = [(quality(t), -i, t) for i, t in enumerate(offered)]
    q, _, chosen = max(scored)
    return chosen if q > 0 else None


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


def create_app(
    engine, *, drain_on_shutdown=True, shutdown_timeout=None, start=True, allowed_hosts=LOOPBACK_NAMES, body_timeout_s=10.0,
    docs=False,
):
    """The FastAPI app in front of `engine`, inside its guard (`sgfast.serve.guard`: host names,
    JSON bodies, size cap, body read deadline, outcome counting). The engine's worker starts with the
    app (lifespan) unless it is already running; on shutdown every request gets an answer within
    `shutdown_timeout` seconds (queued ones run when `drain_on_shutdown`, else 503). `docs`: serve
    the OpenAPI schema and its page (/openapi.json, /docs; the serve command's --docs)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, Response
    from starlette.exceptions import HTTPException

    metrics = engine.metrics
    if metrics is None:
        metrics = engine.metrics = Metrics(lambda: engine)

    @asynccontextmanager
    async def lifespan(app):
        if start and not engine.alive:
            await asyncio.get_running_loop().run_in_executor(None, engine.start)
        yield
        await asyncio.get_running_loop().run_in_executor(None, lambda: engine.shutdown(drain_on_shutdown, shutdown_timeout))

    app = FastAPI(
        title="sgfast", version="0.1.0", lifespan=lifespan, redoc_url=None, docs_url="/docs" if docs else None,
        openapi_url="/openapi.json" if docs else None,
        redirect_slashes=False,  # "/v1/images/" is a 404 in the schema, not a bodiless 307 a POST may not follow
    )
    app.state.engine = engine

    def error(status, message, type=None, headers=None, **extra):
        detail = error_detail(status, message, type, **extra)
        if status == 503:
            headers = {**(headers or {}), "Retry-After": retry_after(detail)}
        return JSONResponse({"detail": detail}, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc):
        errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
        where = ".".join(str(p) for p in errors[0]["loc"]) if errors else "body"
        return error(422, f"{where}: {errors[0]['msg']}" if errors else "invalid request", errors=errors)

    @app.exception_handler(HTTPException)
    async def _http(request, exc):
        message = str(exc.detail)
        path = request.url.path
        if exc.status_code == 404:
            near = path.rstrip("/")
            routes = {getattr(r, "path", None) for r in app.routes}
            message = f"no route {path}" + (f"; did you mean {near}?" if near != path and near in routes else "")
        return error(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request, exc):
        # Starlette answers with this before it re-raises to the guard (which logs it and counts it once).
        return error(500, f"internal error: {type(exc).__name__}; the server carries on")

    def words_of(prompt):
        return engine.sg.words(prompt)

    def set_outcome(request, outcome):
        request.scope.setdefault("sgfast", {})["outcome"] = outcome

    async def until_disconnected(request):
        """Returns when the client has gone (the body was already read: only a disconnect comes)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def answer_of(job, request):
        """The job's result, or None when the client went away first (the job is then cancelled)."""
        waiting = asyncio.ensure_future(asyncio.wrap_future(job.future))
        gone = asyncio.ensure_future(until_disconnected(request))
        try:
            await asyncio.wait([waiting, gone], return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if waiting.done():
            return waiting.result()  # raises the job's error
        waiting.cancel()
        engine.cancel(job)
        return None

    @app.post("/v1/images")
    async def images(body: ImageRequest, request: Request):
        async def spec_of(body, engine):
            return to_spec(body, engine)

        return await answer(body, request, spec_of)

    @app.post("/v1/edits")
    async def photo_edits(body: PhotoEditRequest, request: Request):
        async def spec_of(body, engine):
            # Decoding the photo reads its pixels: off the event loop.
            photo = await asyncio.get_running_loop().run_in_executor(None, photo_of, body, engine.limits)
            return to_photo_spec(body, engine, photo)

        return await answer(body, request, spec_of)

    async def answer(body, request, spec_of):
        """Check the request (`spec_of`), run it on the engine, answer JSON or PNG."""
        media = "image/png" if body.format == "png" else preferred_type(request.headers.get("accept", ""))
        if media is None:
            return error(406, f"Accept {request.headers.get('accept')!r} takes neither application/json nor image/png")
        try:
            spec = await spec_of(body, engine)
        except InvalidRequest as e:
            return error(e.status, str(e), errors=e.errors, **e.extra)
        try:
            job = engine.submit(spec)
            result = await answer_of(job, request)
        except Rejected as e:
            set_outcome(request, e.outcome)
            detail = dict(e.detail)
            return error(e.status, detail.pop("message"), e.outcome, **detail)
        except ValueError as e:
            return error(422, f"invalid request: {e}")
        except Exception as e:
            return error(500, f"generation failed: {type(e).__name__}: {e}")
        if result is None:
            set_outcome(request, "cancelled")
            return error(499, "the client closed the connection", "cancelled")
        set_outcome(request, "degraded" if result.degradation else "ok")
        payload = result_payload(result, words_of(spec.prompt))
        if spec.photo is not None:
            del payload["seed"]
            payload["strength"] = spec.strength
            payload["inversion"] = job.inversion
        png = await asyncio.get_running_loop().run_in_executor(None, png_bytes, result.image)  # off the event loop
        if media == "image/png":
            headers = {
                "X-Sgfast-Timings": json.dumps(result.timings),
                "X-Sgfast-Plan": json.dumps({k: payload[k] for k in ("steps", "guided_steps", "reference_steps")}),
                "X-Sgfast-Degradation": json.dumps(result.degradation),
                "X-Sgfast-Cache-Hit": str(result.cache_hit).lower(),
                "X-Sgfast-Deadline-Missed": str(result.deadline_missed).lower(),
            }
            if spec.photo is not None:
                headers["X-Sgfast-Inversion"] = json.dumps(job.inversion)
            return Response(png, media_type="image/png", headers=headers)
        payload["image"] = base64.b64encode(png).decode()
        payload["format"] = "png"
        return payload

    @app.get("/v1/words")
    async def words(prompt: str):
        cap = engine.limits.max_prompt_chars
        if not prompt.strip() or len(prompt) > cap:
            return error(422, f"prompt must be non-blank and at most {cap} characters (got {len(prompt)})")
        return {"prompt": prompt, "words": words_of(prompt)}

    @app.get("/healthz")
    async def healthz():
        ok = engine.alive and not engine.closing
        body = {
            "status": "ok" if ok else ("shutting down" if engine.closing else "worker not running"),
            "model": engine.model,
            "replica": engine.replica,
            "policy": engine.policy,
            "scheduler": getattr(engine, "scheduler", "request"),
            "queue_depth": engine.depth(),
            "native_size": engine.native,
            "limits": {k: getattr(engine.limits, k) for k in vars(engine.limits)},
            "cost_ms": engine.cost.snapshot() if engine.cost is not None else None,
            "trace_cache": {"entries": len(engine.cache), "bytes": engine.cache.bytes, "hits": engine.cache.hits},
        }
        return JSONResponse(body, status_code=200 if ok else 503, headers=None if ok else {"Retry-After": "5"})

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/")
    async def index():
        return FileResponse(os.path.join(STATIC, "index.html"), media_type="text/html")

    limits = engine.limits
    encoded = 4 * ((limits.max_photo_bytes + 2) // 3)
    # base64 of the photo, wrapped at 76 columns (each line break "\r\n" escaped in JSON: 4 bytes), + the rest
    photo_body = encoded + 4 * -(-encoded // 76) + limits.max_body_bytes
    return Guard(
        app, metrics, limits.max_body_bytes, body_timeout_s, allowed_hosts, stop_at=lambda: engine.stop_at, photo_body_bytes=photo_body
    )


def app_of(asgi):
    """The FastAPI app inside the guard."""
    return getattr(asgi, "app", asgi)
