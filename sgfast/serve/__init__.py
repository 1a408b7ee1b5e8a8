"""The server: `python -m sgfast serve` (HTTP) and `python -m sgfast serve-ray` (Ray Serve).

- `app`: the FastAPI app (routes, answers); `guard`: the ASGI layer before it (Host names, JSON bodies,
  size cap, body read deadline, one counted outcome per request); `errors`: the one error schema;
  `schema`: the request schema and its checks; `photo`: the photo of a photo edit as phones and tools
  send it; `metrics`: Prometheus metrics; `static/`: the page at `/`;
- `http`: the uvicorn server under the app (header deadline, connection cap, shutdown deadline told
  to the engine at once, bind before the model loads);
- `engine`: the worker that owns the model, its earliest-deadline-first queue, request-level batching,
  cancellation and shutdown; `iteration` and `steps`: the iteration-level scheduler (batching per
  denoising step, requests joining and leaving between steps);
- `cost`: the cost model and its calibration; `admission`: planning a request against its budget
  (degradation, rejection); `cache`: the reference-trace cache; `jobs`: requests, jobs and results;
- `cli`: the serve command's flags and the engine they build; `ray_serve`: the Ray Serve deployment.

Only `app`, `http`, `schema`, `metrics` and `ray_serve` need the web stack (the
`serve` and `ray` extras); importing this package imports none of them.
"""
