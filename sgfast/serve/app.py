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

The engine (`sgfast.serve_engine`) does the work: admission against the budget, EDF queue, one worker
thread owning the model, batching of same-shape requests and the reference-trace cache. Flags:
`python -m sgfast serve --help`. Needs the `serve` extra: `pip install -e '.[serve]'`.
"""

import asyncio
import base64
import io
import json
import os
from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sgfast.serve_engine import Rejected, Spec

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


# ----------------------------------------------------------------------------------------------
# Request schema


class _Edit(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _ObjectEdit(_Edit):
    word: str = Field(min_length=1, max_length=100)
    weight: Optional[float] = Field(None, ge=0, le=1000)
    keep_others: bool = True
    keep_shape_weight: Optional[float] = Field(None, ge=0, le=1000)
    keep_appearance_weight: Optional[float] = Field(None, ge=0, le=1000)
    keep_centroid_weight: Optional[float] = Field(None, ge=0, le=1000)


class MoveEdit(_ObjectEdit):
    type: Literal["move"]
    dx: float = Field(0.0, ge=-1, le=1)
    dy: float = Field(0.0, ge=-1, le=1)


class PlaceEdit(_ObjectEdit):
    type: Literal["place"]
    x: float = Field(0.5, ge=0, le=1)
    y: float = Field(0.5, ge=0, le=1)


class ResizeEdit(_ObjectEdit):
    type: Literal["resize"]
    scale: float = Field(gt=0, le=16)


class KeepShapeEdit(_Edit):
    type: Literal["keep_shape"]
    words: Optional[list[Annotated[str, Field(min_length=1, max_length=100)]]] = Field(None, max_length=77)
    weight: Optional[float] = Field(None, ge=0, le=1000)


class KeepAppearanceEdit(KeepShapeEdit):
    type: Literal["keep_appearance"]


EditSpec = Annotated[
    Union[MoveEdit, PlaceEdit, ResizeEdit, KeepShapeEdit, KeepAppearanceEdit], Field(discriminator="type")
]


class ImageRequest(BaseModel):
    """The body of POST /v1/images. Server caps (steps, size, edits, prompt length) are checked after
    this schema, against the server's flags."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=10_000)
    negative_prompt: Optional[str] = Field(None, max_length=10_000)
    edits: list[EditSpec] = Field(default_factory=list, max_length=1000)
    seed: int = Field(0, ge=0, le=2**63 - 1)
    steps: Optional[int] = Field(None, ge=1, le=10_000)
    guidance_scale: float = Field(7.5, ge=0, le=50)
    self_guidance_scale: float = Field(1.0, ge=0, le=100)
    normalize_gradient: bool = Field(False, description="scale each image's guidance gradient to unit RMS (see the library)")
    size: Optional[Union[int, tuple[int, int]]] = Field(None, description="square side, or [width, height], in pixels")
    budget_ms: Optional[float] = Field(None, gt=0, le=3_600_000, description="time to the answer, queue included")
    format: Literal["json", "png"] = "json"

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value):
        if not value.strip():
            raise ValueError("prompt is blank")
        return value


def build_edit(spec):
    """A request edit -> an sgfast edit object (its own argument checks raise ValueError)."""
    from sgfast import edits as E

    data = spec.model_dump(exclude_none=True)
    kind = data.pop("type")
    factory = {
        "move": E.move,
        "place": E.place,
        "resize": E.resize,
        "keep_shape": E.keep_shape,
        "keep_appearance": E.keep_appearance,
    }[kind]
    return factory(**data)


class InvalidRequest(Exception):
    """A request the schema accepted but the server's caps or the prompt do not: HTTP 422."""

    def __init__(self, loc, message, **extra):
        super().__init__(message)
        self.detail = [{"loc": ["body", *loc], "msg": message, "type": "value_error", **extra}]


def to_spec(request, engine):
    """Check a parsed request against the server's caps and the prompt's words; build the Spec."""
    from sgfast.trace import PromptWords

    limits = engine.limits
    if len(request.prompt) > limits.max_prompt_chars:
        raise InvalidRequest(["prompt"], f"prompt is {len(request.prompt)} characters; at most {limits.max_prompt_chars}")
    steps = request.steps if request.steps is not None else limits.default_steps
    if steps > limits.max_steps:
        raise InvalidRequest(["steps"], f"steps={steps} is over this server's cap of {limits.max_steps}")
    if len(request.edits) > limits.max_edits:
        raise InvalidRequest(["edits"], f"{len(request.edits)} edits; at most {limits.max_edits} per request")
    size = request.size if request.size is not None else engine.native
    width, height = (size, size) if isinstance(size, int) else size
    multiple = size_multiple(engine.pipe)
    for name, value in (("width", width), ("height", height)):
        if not (multiple <= value <= limits.max_size) or value % multiple:
            raise InvalidRequest(
                ["size"],
                f"{name}={value}: sizes must be multiples of {multiple} between {multiple} and {limits.max_size} pixels",
            )
    words = PromptWords.from_tokenizer(engine.pipe.tokenizer, request.prompt)
    edits = []
    for i, edit_spec in enumerate(request.edits):
        try:
            edit = build_edit(edit_spec)
            edit.validate(words)
        except ValueError as e:
            raise InvalidRequest(["edits", i], str(e), words=words.words) from None
        edits.append(edit)
    return Spec(
        prompt=request.prompt,
        edits=edits,
        edit_specs=[e.model_dump(exclude_none=True) for e in request.edits],
        seed=request.seed,
        steps=steps,
        guidance_scale=request.guidance_scale,
        self_guidance_scale=request.self_guidance_scale,
        normalize_gradient=request.normalize_gradient,
        height=height,
        width=width,
        negative_prompt=request.negative_prompt,
        budget_ms=request.budget_ms,
    )


def size_multiple(pipe):
    """Pixel sizes must divide down through the VAE and every UNet downsampling."""
    downs = len(pipe.unet.config.block_out_channels) - 1
    return pipe.vae_scale_factor * 2**downs


# ----------------------------------------------------------------------------------------------
# Metrics


class Metrics:
    """Prometheus metrics of one server (own registry, so several servers can live in one process)."""

    def __init__(self, engine_ref=lambda: None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.engine_ref = engine_ref
        self.requests = Counter("sgfast_requests", "Requests by outcome", ["outcome"], registry=r)
        self.latency = Histogram(
            "sgfast_request_latency_seconds",
            "Time from arrival to answer of requests that ran",
            buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.misses = Counter("sgfast_deadline_misses", "Requests answered after their budget or expired in the queue", registry=r)
        self.steps = Counter("sgfast_steps", "Denoising steps run (per image)", ["kind"], registry=r)
        self.batch_size = Histogram("sgfast_batch_size", "Images per pipeline call", buckets=(1, 2, 3, 4, 6, 8, 16), registry=r)
        self.cache_hits = Counter("sgfast_trace_cache_hits", "Edits that reused a cached reference trace", registry=r)
        self.cache_misses = Counter("sgfast_trace_cache_misses", "Edits that had to run the reference pass", registry=r)
        self.queue_depth = Gauge("sgfast_queue_depth", "Requests waiting", registry=r)
        self.queue_depth.set_function(lambda: (self.engine_ref().depth() if self.engine_ref() else 0))
        self.cache_bytes = Gauge("sgfast_trace_cache_bytes", "Bytes held by the reference-trace cache", registry=r)
        self.cache_bytes.set_function(lambda: (self.engine_ref().cache.bytes if self.engine_ref() else 0))
        self.cache_entries = Gauge("sgfast_trace_cache_entries", "Traces held by the cache", registry=r)
        self.cache_entries.set_function(lambda: (len(self.engine_ref().cache) if self.engine_ref() else 0))
        self.worker_alive = Gauge("sgfast_worker_alive", "1 while the model worker runs", registry=r)
        self.worker_alive.set_function(lambda: (1 if self.engine_ref() and self.engine_ref().alive else 0))
        r.register(_StepRateCollector(self))

    def request_done(self, outcome, latency_s=None):
        self.requests.labels(outcome).inc()
        if latency_s is not None and outcome in ("ok", "degraded"):
            self.latency.observe(latency_s)

    def deadline_miss(self):
        self.misses.inc()

    def batch_done(self, size, steps, guided, reference):
        self.batch_size.observe(size)
        self.steps.labels("plain").inc(steps - guided + reference)
        self.steps.labels("guided").inc(guided)

    def cache(self, hits, misses):
        self.cache_hits.inc(hits)
        self.cache_misses.inc(misses)

    def render(self):
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class _StepRateCollector:
    """Plain and guided steps per second (images x steps), from the live cost model, by batch size
    and resolution."""

    def __init__(self, metrics):
        self.metrics = metrics

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily(
            "sgfast_steps_per_second", "Image-steps per second from the live cost model", labels=["kind", "batch", "pixels"]
        )
        engine = self.metrics.engine_ref()
        if engine is not None and engine.cost is not None:
            snapshot = engine.cost.snapshot()
            for kind in ("plain", "guided"):
                for pixels, by_batch in snapshot.get(kind, {}).items():
                    for batch, ms in by_batch.items():
                        family.add_metric([kind, str(batch), str(pixels)], batch * 1000.0 / ms if ms > 0 else 0.0)
        yield family

    def describe(self):
        return []


# ----------------------------------------------------------------------------------------------
# App


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
