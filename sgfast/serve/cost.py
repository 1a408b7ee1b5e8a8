"""The serving cost model: milliseconds per plain step, per guided step and per pipeline call, by
batch size and resolution, calibrated on the loaded model at start-up and refreshed from live timings.
Admission (`sgfast.serve.admission`) predicts each request's completion from it."""

import math
import threading
import time

from sgfast.serve.families import native_size
from sgfast.serve.jobs import seeded_latents


def _interpolate(table, batch):
    """Linear interpolation of {batch: ms} at `batch`, extrapolated from the two nearest points."""
    sizes = sorted(table)
    if batch in table:
        return table[batch]
    if len(sizes) == 1:
        return table[sizes[0]] * batch / sizes[0]
    if batch < sizes[0]:
        lo, hi = sizes[0], sizes[1]
    elif batch > sizes[-1]:
        lo, hi = sizes[-2], sizes[-1]
    else:
        hi = next(s for s in sizes if s > batch)
        lo = max(s for s in sizes if s < batch)
    value = table[lo] + (table[hi] - table[lo]) * (batch - lo) / (hi - lo)
    return max(value, min(table.values()) * 0.5)


class CostModel:
    """Milliseconds per denoising step ("plain": a classifier-free-guidance step; "guided": a step
    with the self-guidance gradient; "iteration": one step of every active request under
    iteration-level batching, measured only) and per pipeline call ("overhead": prompt encoding, VAE decode),
    by batch size and resolution (pixels). Calibrated on the loaded model, refreshed from live
    timings by an exponential moving average. An unmeasured resolution is scaled from the nearest
    measured one by the ratio of pixels; an unmeasured batch size is interpolated."""

    KINDS = ("plain", "guided", "overhead")

    def __init__(self, table=None, alpha=0.2):
        self.table = {}  # {(kind, pixels): {batch: ms}}
        self.alpha = alpha
        self.lock = threading.Lock()
        for (kind, pixels), by_batch in (table or {}).items():
            self.table[(kind, int(pixels))] = {int(b): float(ms) for b, ms in by_batch.items()}

    @classmethod
    def fixed(cls, plain_ms, guided_ms, overhead_ms=0.0, pixels=64 * 64, batch_factor=1.0):
        """A cost model from constants (for tests and dry runs): a batch of b costs
        ms * (1 + batch_factor * (b - 1)) per step."""
        table = {}
        for kind, ms in (("plain", plain_ms), ("guided", guided_ms), ("overhead", overhead_ms)):
            table[(kind, pixels)] = {1: ms, 2: ms * (1 + batch_factor)}
        return cls(table)

    def ms(self, kind, batch=1, pixels=64 * 64):
        with self.lock:
            measured = sorted(p for (k, p) in self.table if k == kind)
            if not measured:
                raise KeyError(f"the cost model has no {kind!r} timings")
            nearest = min(measured, key=lambda p: (abs(math.log(p / pixels)), p))
            return _interpolate(self.table[(kind, nearest)], batch) * pixels / nearest

    def largest_batch(self, kind):
        """The largest batch size with a timing of `kind` (0 if none)."""
        with self.lock:
            return max((b for (k, _), by_batch in self.table.items() if k == kind for b in by_batch), default=0)

    def call_ms(self, batch, pixels, steps, guided, reference_steps=0):
        """Predicted milliseconds of one pipeline call: `steps` steps of which `guided` carry
        self-guidance, plus `reference_steps` steps of an unedited reference pass."""
        plain = self.ms("plain", batch, pixels)
        return self.ms("overhead", batch, pixels) + (steps - guided + reference_steps) * plain + guided * self.ms(
            "guided", batch, pixels
        )

    def observe(self, kind, batch, pixels, ms):
        """Fold a live measurement into the table (EWMA at measured points, a new point otherwise)."""
        if not (math.isfinite(ms) and ms > 0):
            return
        with self.lock:
            by_batch = self.table.setdefault((kind, int(pixels)), {})
            old = by_batch.get(batch)
            by_batch[batch] = ms if old is None else (1 - self.alpha) * old + self.alpha * ms

    def observe_call(self, batch, pixels, steps, guided, reference_steps, elapsed_ms):
        """Attribute a measured call to its step kind: a call without guided steps refreshes the plain
        step time, a call with them the guided one (the rest taken from the model)."""
        overhead = self.ms("overhead", batch, pixels)
        if guided == 0:
            plain_steps = steps + reference_steps
            if plain_steps:
                self.observe("plain", batch, pixels, (elapsed_ms - overhead) / plain_steps)
        else:
            plain = self.ms("plain", batch, pixels)
            self.observe("guided", batch, pixels, (elapsed_ms - overhead - (steps - guided + reference_steps) * plain) / guided)

    def snapshot(self):
        """{kind: {pixels: {batch: ms}}} (for /metrics, /healthz and logs)."""
        with self.lock:
            out = {}
            for (kind, pixels), by_batch in sorted(self.table.items()):
                out.setdefault(kind, {})[pixels] = dict(sorted(by_batch.items()))
            return out

    @classmethod
    def calibrate(cls, sg, sizes=None, batches=(1, 2), prompt=None, log=None, repeats=3):
        """Measure the loaded model: for each resolution and batch size, plain calls of 2 and 6 steps
        (their difference: ms per plain step; the rest: the per-call overhead) and an edited call of 4
        guided steps on a recorded trace (ms per guided step), each the fastest of `repeats` (on a
        shared CPU a single timing can be off several-fold). Takes a few seconds on the tiny model."""
        from sgfast.edits import move

        pipe = sg.pipe
        native = native_size(pipe)
        sizes = sizes or [(native, native)]
        prompt = prompt or calibration_prompt(sg)
        word = next((w for w in sg.words(prompt)[::-1] if w.isalpha()), sg.words(prompt)[-1])
        model = cls()
        for height, width in sizes:
            pixels = height * width
            for batch in batches:
                prompts = [prompt] * batch
                common = dict(height=height, width=width, guidance_scale=7.5)

                def timed(**kw):
                    start = time.perf_counter()
                    out = sg(prompts, **common, **kw)
                    return (time.perf_counter() - start) * 1000, out

                seeded = seeded_latents(pipe, [0] * batch, height, width)
                timed(num_inference_steps=2, latents=seeded.clone())  # warm-up
                _, out = timed(num_inference_steps=6, latents=seeded.clone())
                traces = out.trace if batch > 1 else [out.trace]
                t2 = t6 = tg = math.inf
                for _ in range(repeats):
                    t2 = min(t2, timed(num_inference_steps=2, latents=seeded.clone())[0])
                    t6 = min(t6, timed(num_inference_steps=6, latents=seeded.clone())[0])
                    tg = min(tg, timed(
                        num_inference_steps=6,
                        edits=[move(word, dx=0.1)],
                        trace=traces if batch > 1 else traces[0],
                        guidance_schedule=[0, 1, 2, 3],
                    )[0])
                plain = max((t6 - t2) / 4, 1e-3)
                overhead = max(t2 - 2 * plain, 0.0)
                guided = max((tg - overhead - 2 * plain) / 4, plain)
                for kind, ms in (("plain", plain), ("guided", guided), ("overhead", overhead)):
                    model.table.setdefault((kind, pixels), {})[batch] = ms
                if log:
                    log(
                        f"calibrated {height}x{width} batch {batch}: {plain:.1f} ms/plain step, "
                        f"{guided:.1f} ms/guided step, {overhead:.1f} ms/call"
                    )
            model._monotone(pixels)
        return model

    def _monotone(self, pixels):
        """A larger batch never takes less time per step than a smaller one (what timing noise can show)."""
        for kind in ("plain", "guided"):
            by_batch = self.table.get((kind, pixels), {})
            floor = 0.0
            for batch in sorted(by_batch):
                floor = by_batch[batch] = max(by_batch[batch], floor)


def calibration_prompt(sg):
    """A short prompt with at least one word the tokenizer keeps whole."""
    return "a red circle and a blue square"
