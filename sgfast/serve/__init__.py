"""The server: `python -m sgfast serve` (HTTP) and `python -m sgfast serve-ray` (Ray Serve).

- `app`: the FastAPI app (routes, body limit, answers); `schema`: the request schema and its checks;
  `metrics`: Prometheus metrics; `static/`: the page at `/`;
- `engine`: the worker that owns the model, its earliest-deadline-first queue and same-shape batching;
- `cost`: the cost model and its calibration; `admission`: planning a request against its budget
  (degradation, rejection); `cache`: the reference-trace cache; `jobs`: requests, jobs and results;
- `cli`: the serve command's flags and the engine they build; `ray_serve`: the Ray Serve deployment.

Only `app`, `schema`, `metrics` and `ray_serve` need the web stack (the `serve` and `ray` extras);
importing this package imports none of them.
"""
