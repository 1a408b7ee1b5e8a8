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


MAX_RATIO = 4.0  # a call measured more than 4x off its prediction (a stall, a swap) moves the model as 4x


class CostModel:
    """Milliseconds per denoising step ("plain": a classifier-free-guidance step; "guided": a step
    with the self-guidance gradient; "iteration": one step of every active request under
    iteration-level batching, measured only) and per pipeline call ("overhead": prompt encoding, VAE decode),
    by batch size and resolution (pixels). Calibrated on the loaded model, refreshed from live
    timings by an exponential moving average. An unmeasured resolution is scaled from the nearest
    measured one by the ratio of pixels; an unmeasured batch size is interpolated.

    A calibrated point counts as one timing: the first live timings are averaged with it (weights 1/2,
    1/3, ... down to `alpha`), so a calibration made while the machine was busy (or idle) gives way
    within a few requests, not a few dozen. Photo edits (inversion, regeneration, edit and their VAE
    calls) are predicted from the step times times a factor learnt from their own timings, and never
    refresh the step times themselves (their steps are not the generations' steps)."""

    KINDS = ("plain", "guided", "overhead")

    def __init__(self, table=None, alpha=0.2):
        self.table = {}  # {(kind, pixels): {batch: ms}}
        self.alpha = alpha
        self.counts = {}  # {(kind, pixels, batch): timings folded in}; absent: a settled value (weight alpha)
        self.photo_factor = {}  # {pixels: (measured / predicted of photo edits, timings folded in)}
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

    def call_ms(self, batch, pixels, steps, guided, reference_steps=0, photo=False):
        """Predicted milliseconds of one pipeline call: `steps` steps of which `guided` carry
        self-guidance, plus `reference_steps` steps of an unedited reference pass (`photo`: a photo
        edit, whose reference is the inversion and the regeneration)."""
        plain = self.ms("plain", batch, pixels)
        ms = self.ms("overhead", batch, pixels) + (steps - guided + reference_steps) * plain + guided * self.ms(
            "guided", batch, pixels
        )
        return ms * self._photo_factor(pixels) if photo else ms

    def _photo_factor(self, pixels):
        with self.lock:
            if not self.photo_factor:
                return 1.0
            nearest = min(self.photo_factor, key=lambda p: (abs(math.log(p / pixels)), p))
            return self.photo_factor[nearest][0]

    def _weight(self, key):
        """The weight of a new timing at `key`: 1/(n+1) after n timings, never below alpha."""
        n = self.counts.get(key)
        if n is None:
            return self.alpha
        self.counts[key] = n + 1
        return max(self.alpha, 1.0 / (n + 1))

    def observe(self, kind, batch, pixels, ms):
        """Fold a live measurement into the table (a running mean, then an EWMA, at measured points;
        a new point otherwise)."""
        if not (math.isfinite(ms) and ms > 0):
            return
        with self.lock:
            by_batch = self.table.setdefault((kind, int(pixels)), {})
            old = by_batch.get(batch)
            if old is None:
                by_batch[batch] = ms
                self.counts[(kind, int(pixels), batch)] = 1
                return
            weight = self._weight((kind, int(pixels), batch))
            by_batch[batch] = (1 - weight) * old + weight * ms

    def observe_call(self, batch, pixels, steps, guided, reference_steps, elapsed_ms, photo=False):
        """Fold a measured call into the step times: a call without guided steps refreshes the plain
        step time (the overhead taken from the model); a call with them scales the plain and the
        guided step times by measured / predicted (what the call says is how far its total was off,
        not which part: charging the whole difference to the guided steps, a few of many, multiplied
        a plain step mis-timed at calibration into guided steps several times too long). A photo
        edit refreshes the photo factor alone. One call moves the times by at most MAX_RATIO."""
        predicted = self.call_ms(batch, pixels, steps, guided, reference_steps)
        ratio = min(max(elapsed_ms / predicted, 1 / MAX_RATIO), MAX_RATIO) if predicted > 0 else math.nan
        if photo:
            return self._observe_photo(pixels, ratio)
        if guided == 0:
            plain_steps = steps + reference_steps
            if plain_steps:
                plain = (elapsed_ms - self.ms("overhead", batch, pixels)) / plain_steps
                now = self.ms("plain", batch, pixels)
                self.observe("plain", batch, pixels, min(max(plain, now / MAX_RATIO), now * MAX_RATIO))
        else:
            for kind in ("plain", "guided"):
                self.observe(kind, batch, pixels, self.ms(kind, batch, pixels) * ratio)

    def _observe_photo(self, pixels, ratio):
        if not (math.isfinite(ratio) and ratio > 0):
            return
        with self.lock:
            factor, n = self.photo_factor.get(int(pixels), (1.0, 1))  # the step model's own guess counts once
            weight = max(self.alpha, 1.0 / (n + 1))
            self.photo_factor[int(pixels)] = ((1 - weight) * factor + weight * ratio, n + 1)

    def snapshot(self):
        """{kind: {pixels: {batch: ms}}}, and "photo_factor": {pixels: factor} once photo edits ran
        (for /metrics, /healthz and logs)."""
        with self.lock:
            out = {}
            for (kind, pixels), by_batch in sorted(self.table.items()):
                out.setdefault(kind, {})[pixels] = dict(sorted(by_batch.items()))
            if self.photo_factor:
                out["photo_factor"] = {pixels: round(f, 3) for pixels, (f, _) in sorted(self.photo_factor.items())}
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
                    model.counts[(kind, pixels, batch)] = 1  # one timing: live ones soon outweigh it
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
