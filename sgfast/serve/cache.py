"""The reference-trace cache: an LRU of unedited traces bounded in bytes, and the pipeline call that
reuses them, so that a second edit of the same image skips the unedited pass."""

import threading
from collections import OrderedDict
from dataclasses import replace

from sgfast.serve.jobs import seeded_latents
from sgfast.trace import TraceStep


def compact(trace):
    """A copy of `trace` that owns its tensors. A trace recorded in a batch holds views of the whole
    batch's capture tensors (its maps are rows of [B, S, H, W] tensors, its latents a row of the batch's
    noise): stored as is, it would keep every row alive, many times the bytes it counts."""

    def own(t):
        return None if t is None else t.detach().clone()

    steps = {
        t: TraceStep({layer: own(m) for layer, m in step.maps.items()}, own(step.appearance)) for t, step in trace.steps.items()
    }
    return replace(trace, steps=steps, latents=own(trace.latents))


class TraceCache:
    """LRU of unedited reference traces keyed by (model, prompt, seed, steps, height, width,
    guidance scale), bounded in bytes (`Trace.nbytes()` plus its initial latents)."""

    def __init__(self, max_bytes=256 * 2**20):
        self.max_bytes = max_bytes
        self.entries = OrderedDict()  # key -> (trace, nbytes)
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.lock = threading.Lock()

    @staticmethod
    def size_of(trace):
        latents = trace.latents
        return trace.nbytes() + (0 if latents is None else latents.numel() * latents.element_size())

    def peek(self, key):
        with self.lock:
            return key in self.entries

    def get(self, key):
        with self.lock:
            entry = self.entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self.entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def put(self, key, trace):
        """Keep a compact copy of `trace` (see `compact`); returns whether it was kept."""
        size = self.size_of(trace)
        kept = compact(trace) if size <= self.max_bytes else None
        with self.lock:
            if key in self.entries:
                self.bytes -= self.entries.pop(key)[1]
            if size > self.max_bytes:
                return False
            self.entries[key] = (kept, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, evicted) = self.entries.popitem(last=False)
                self.bytes -= evicted
            return True

    def __len__(self):
        return len(self.entries)


def call_pipeline(sg, cache, model, batch, metrics=None):
    """One pipeline call for a batch of jobs of the same shape, reusing the cached reference traces
    of `model` when every job has one and caching the new ones. Returns (images, cache hit per job)."""
    head = batch[0]
    spec, plan = head.spec, head.plan
    kwargs = dict(
        height=spec.height,
        width=spec.width,
        num_inference_steps=plan.steps,
        guidance_scale=spec.guidance_scale,
        negative_prompt=[j.spec.negative_prompt for j in batch] if spec.negative_prompt is not None else None,
        output_type="pil",
    )
    prompts = [j.spec.prompt for j in batch]
    keys = [j.trace_key(model) for j in batch]
    if not spec.edits:
        out = sg(prompts, latents=seeded_latents(sg.pipe, [j.spec.seed for j in batch], spec.height, spec.width), **kwargs)
        traces = out.trace if isinstance(out.trace, list) else [out.trace]
        for key, trace in zip(keys, traces):
            if trace is not None:
                cache.put(key, trace)
        return out.images, [False] * len(batch)
    needs_reference = any(e.needs_reference for j in batch for e in j.spec.edits)
    traces = [cache.get(k) for k in keys] if needs_reference else [None] * len(batch)
    hits = [t is not None for t in traces]
    if metrics is not None:
        metrics.cache(sum(hits), len(hits) - sum(hits) if needs_reference else 0)
    edit_kwargs = dict(
        edits=[j.spec.edits for j in batch],
        self_guidance_scale=spec.self_guidance_scale,
        normalize_gradient=spec.normalize_gradient,
        guidance_schedule=None if plan.schedule is None else list(plan.schedule),
        guidance_repeats=1,  # the plan's guided steps, each once: what the deadline was costed on
    )
    if needs_reference and all(hits):
        out = sg(prompts, trace=traces if len(batch) > 1 else traces[0], **edit_kwargs, **kwargs)
        return out.images, hits
    # Not every trace is cached: run the reference pass for the whole call (same seeds), keep its traces.
    latents = seeded_latents(sg.pipe, [j.spec.seed for j in batch], spec.height, spec.width)
    out = sg(prompts, latents=latents, **edit_kwargs, **kwargs)
    new = out.trace if isinstance(out.trace, list) else [out.trace]
    if needs_reference:
        for key, trace, hit in zip(keys, new, hits):
            if trace is not None and not hit:
                cache.put(key, trace)
    return out.images, hits


def call_photo_edit(sg, job):
    """A photo edit (POST /v1/edits): invert the photo, then edit it with the plan's steps and guided
    steps (the model's schedule unless degraded). The inversion is the reference: nothing is cached.
    Returns ([image], [False]) as `call_pipeline`; the reconstruction's PSNR goes on `job.inversion`."""
    from sgfast.invert import edit_photo

    spec, plan = job.spec, job.plan
    out, inverted = edit_photo(
        sg, spec.photo, spec.prompt, spec.edits, strength=spec.strength, num_inference_steps=plan.steps,
        guidance_scale=spec.guidance_scale, guidance_schedule=None if plan.schedule is None else list(plan.schedule),
        self_guidance_scale=spec.self_guidance_scale, normalize_gradient=spec.normalize_gradient,
    )
    info = inverted.inversion
    job.inversion = {"psnr": round(info["psnr"], 2), "vae_psnr": round(info["vae_psnr"], 2)}
    return out.images, [False]
