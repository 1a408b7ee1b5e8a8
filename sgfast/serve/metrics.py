"""The server's Prometheus metrics: image requests and photo edits by outcome, latency, deadline misses, steps, batch sizes,
the trace cache, queue depth and the live cost model's step rates."""


class Metrics:
    """Prometheus metrics of one server (own registry, so several servers can live in one process)."""

    def __init__(self, engine_ref=lambda: None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.engine_ref = engine_ref
        self.requests = Counter("sgfast_requests", "Image requests (POST /v1/images) by how they ended: one count each", ["outcome"], registry=r)
        self.photo_edits = Counter("sgfast_photo_edits", "Photo edits (POST /v1/edits) by how they ended: one count each", ["outcome"], registry=r)
        self.photo_latency = Histogram(
            "sgfast_photo_edit_latency_seconds",
            "Time from arrival to answer of photo edits answered 200 (inversion included)",
            buckets=(0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.refused = Counter(
            "sgfast_refused_connections",
            "Requests answered below the app, by reason: malformed HTTP (the parser's 400/501) or over --max-connections (503)",
            ["reason", "status"], registry=r,
        )
        self.other = Counter("sgfast_other_requests", "Requests to the other routes, by path and status", ["path", "status"], registry=r)
        self.latency = Histogram(
            "sgfast_request_latency_seconds",
            "Time from arrival to answer of image requests answered 200",
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

    def photo_edit_done(self, outcome, latency_s=None):
        self.photo_edits.labels(outcome).inc()
        if latency_s is not None and outcome in ("ok", "degraded"):
            self.photo_latency.observe(latency_s)

    def other_request(self, path, status):
        self.other.labels(path, str(status)).inc()

    def refused_connection(self, reason, status):
        self.refused.labels(reason, str(status)).inc()

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
