"""One row of `python -m benchmarks`, measured in its own process: per-step times interleaved with the
wrapped diffusers pipeline's, peak memory, counted UNet and backward passes, FLOPs, what is kept for
backward. The harness (`benchmarks.speed`) runs

    python -m benchmarks.speed_row SPEC.json OUT.json

once per row, so that each row's peak memory is its own.
"""

import json
import sys
import time
from pathlib import Path


class Counts:
    """UNet calls (with and without gradients) and backward passes (`torch.autograd.grad` calls)
    while active, plus Attend-and-Excite's refinements when it is given."""

    def __init__(self, unet, ae=None):
        import torch

        self.torch, self.unet, self.ae = torch, unet, ae
        self.forward = self.forward_grad = self.backward = 0
        self.refinements = self.refinement_forwards = 0
        self._refining = False

    def _pre_hook(self, module, args, kwargs):
        self.forward += 1
        if self.torch.is_grad_enabled():
            self.forward_grad += 1
            if self._refining:
                self.refinement_forwards += 1

    def __enter__(self):
        torch = self.torch
        self._hook = self.unet.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        self._grad = torch.autograd.grad

        def grad(*args, **kwargs):
            self.backward += 1
            return self._grad(*args, **kwargs)

        torch.autograd.grad = grad
        if self.ae is not None:
            refine = self.ae._perform_iterative_refinement_step

            def counted_refine(*args, **kwargs):
                self.refinements += 1
                self._refining = True
                try:
                    return refine(*args, **kwargs)
                finally:
                    self._refining = False

            self.ae._perform_iterative_refinement_step = counted_refine
        return self

    def __exit__(self, *exc):
        self._hook.remove()
        self.torch.autograd.grad = self._grad
        if self.ae is not None:
            del self.ae._perform_iterative_refinement_step
        return False

    def to_dict(self):
        out = dict(unet_forward=self.forward, unet_forward_grad=self.forward_grad, backward=self.backward)
        if self.ae is not None:
            # Each refinement runs iterations (forward + backward) and one last forward.
            out.update(refinement_steps=self.refinements, refinement_iterations=self.refinement_forwards - self.refinements)
        return out


def _setup(spec):
    import torch

    from benchmarks.flops import quiet
    from benchmarks.models import build_pipeline

    quiet()
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    dtype = getattr(torch, spec["dtype"])
    return build_pipeline(spec["model"], spec.get("resolution"), spec["device"], dtype, spec.get("arch_dir"))


class Memory:
    """Peak memory of a phase: CUDA max_memory_allocated over what was allocated before it, or the
    process's peak RSS over its RSS before it (Linux resets the peak per phase)."""

    def __init__(self, device):
        import torch

        self.torch, self.cuda = torch, torch.device(device).type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
            self.before = self.torch.cuda.memory_allocated()
        else:
            from benchmarks.measure import reset_peak_rss

            self.before = reset_peak_rss()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.torch.cuda.synchronize()
            self.peak = self.torch.cuda.max_memory_allocated()
        else:
            from benchmarks.measure import peak_rss_bytes

            self.peak = peak_rss_bytes()
        return False

    def to_dict(self):
        kind = "CUDA max_memory_allocated" if self.cuda else "peak RSS"
        return dict(peak_bytes=self.peak, peak_over_resident_bytes=self.peak - self.before, memory_kind=kind)


def run_row(spec):
    """Measure one row; `spec` is the dict the orchestrator passes. Returns a JSON-able dict.

    Every process also times the wrapped diffusers pipeline's plain steps and images, interleaved
    with the row's own, so that each ratio comes from one process on one machine state."""
    import torch

    from benchmarks import measure
    from benchmarks.flops import floor_step
    from benchmarks.models import PROMPT
    from benchmarks.rows import PlainRunner, Row, runner

    device = spec["device"]
    row = Row(**spec["row"])
    steps, batch, repeats = spec["steps"], spec["batch"], spec["repeats"]
    n = spec.get("step_call") or steps  # steps per timed call for per-step costs
    cuda = torch.device(device).type == "cuda"
    result = dict(row=row.to_dict(), name=row.name, key=row.key, step_call=n)

    def timed(fn):
        return measure.timed(fn, device)[0]

    start = time.perf_counter()
    pipe = _setup(spec)
    run = runner(pipe, row, steps, n)
    if row.kind == "plain":
        plain = run
    elif row.compile:
        # compile=True compiles the wrapped pipeline's UNet forward in place: the unit stays the eager
        # diffusers pipeline, so it gets its own copy (same seed, same weights).
        plain = PlainRunner(_setup(spec), Row("plain"), steps)
    else:
        plain = PlainRunner(pipe, Row("plain"), steps)
    result["setup_s"] = time.perf_counter() - start
    result["image_size"] = pipe.unet.config.sample_size * pipe.vae_scale_factor

    # Warm-up (compiles a compiled row), then per-step costs: n-step calls, interleaved, divided by n.
    start = time.perf_counter()
    for _ in range(spec["warmup"]):
        plain.unguided(n)
        if run is not plain:
            run.unguided(n)
        if run.guided_available:
            run.guided(n)
    result["warmup_s"] = time.perf_counter() - start
    times = {"plain": [], "unguided": [], "guided": []}
    for _ in range(repeats):
        times["plain"].append(timed(lambda: plain.unguided(n)) / n)
        if run is not plain:
            times["unguided"].append(timed(lambda: run.unguided(n)) / n)
        if run.guided_available:
            times["guided"].append(timed(lambda: run.guided(n)) / n)
    for name, samples in times.items():
        if samples:
            result[f"{name}_step_s"] = measure.summary(samples)
    plain_median = result["plain_step_s"]["median"]
    if "unguided_step_s" in result:
        result["unguided_over_plain"] = result["unguided_step_s"]["median"] / plain_median
    if "guided_step_s" in result:
        result["guided_over_plain"] = result["guided_step_s"]["median"] / plain_median

    # Peak memory of a batch-1 call of n steps, every one guided where the row guides.
    with Memory(device) as memory:
        (run.guided if run.guided_available else run.unguided)(n)
    result.update(memory.to_dict())

    if not spec.get("steps_only"):
        # One image with the method's own schedule, counted: UNet passes, backward passes, guided
        # steps, refinements, and FLOPs (this is also the images' warm-up).
        ae = getattr(run, "ae", None)
        with measure.eager(), measure.math_attention(device), Counts(pipe.unet, ae) as counts, measure.CountFlops() as flops:
            out = run.image(steps)
        result["image_flops"] = flops.total
        result["counts"] = counts.to_dict()
        if getattr(out, "energies", None) is not None:
            result["counts"]["guided_steps"] = len(out.energies)
        elif ae is not None:
            schedule = run.schedule(steps)
            result["counts"]["guided_steps"] = min(schedule["max_iter_to_alter"], steps)
            result["counts"]["schedule"] = {k: str(v) for k, v in schedule.items()}

        # Whole decoded images, batch 1 (with NVML energy), the plain image interleaved.
        energy = measure.Energy(device)
        run.image(steps)
        if run is not plain:
            plain.image(steps)
        image_times, plain_images, joules = [], [], []
        for _ in range(spec["image_repeats"]):
            if run is not plain:
                plain_images.append(timed(lambda: plain.image(steps)))
            before = energy.read_joules() if energy.available else None
            image_times.append(timed(lambda: run.image(steps)))
            if energy.available:
                joules.append(energy.read_joules() - before)
        result["image_s"] = measure.summary(image_times)
        result["plain_image_s"] = measure.summary(plain_images or image_times)
        result["image_over_plain"] = result["image_s"]["median"] / result["plain_image_s"]["median"]
        result["images_per_s"] = 1.0 / result["image_s"]["median"]
        result["energy_j_per_image"] = (sum(joules) / len(joules)) if joules else None
        result["energy_note"] = "NVML" if joules else energy.reason
        if batch > 1:
            if cuda or row.compile:  # a new batch size recompiles a compiled UNet
                run.image(steps, batch)
            batch_times = [timed(lambda: run.image(steps, batch)) for _ in range(spec["batch_repeats"])]
            result["batch_image_s"] = measure.summary(batch_times)
            result["images_per_s_batch"] = batch / result["batch_image_s"]["median"]

    # Counted work per step, from 1- and 2-step calls (FLOPs do not depend on timing):
    # unguided = F(2 unguided) - F(1 unguided); guided = F(1 guided) - F(1 unguided) + unguided.
    with measure.eager(), measure.math_attention(device):

        def count(fn):
            with measure.CountFlops() as counter:
                fn()
            return counter.total

        f_u1 = count(lambda: run.unguided(1))
        result["unguided_step_flops"] = count(lambda: run.unguided(2)) - f_u1
        if run.guided_available:
            result["guided_step_flops"] = count(lambda: run.guided(1)) - f_u1 + result["unguided_step_flops"]
            if run.layers():
                cond, uncond = pipe.encode_prompt(PROMPT, device, 1, True)
                size, channels = pipe.unet.config.sample_size, pipe.unet.config.in_channels
                latents = torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(0))
                latents = latents.to(device, cond.dtype)
                pipe.scheduler.set_timesteps(steps, device=device)
                timestep = pipe.scheduler.timesteps[1]
                result["floor_flops"] = count(lambda: floor_step(pipe.unet, run.layers(), latents, timestep, cond, uncond))
                result["x_floor"] = result["guided_step_flops"] / result["floor_flops"]
    if run.guided_available:
        with measure.eager(), measure.SavedForBackward(pipe.unet, pipe.vae, pipe.text_encoder) as keeper:
            run.guided(1)
        result["saved_bytes"] = keeper.nbytes
        with measure.eager():
            result["attention_bytes"] = run.attention_bytes()
    result["layers"] = run.layers()
    if cuda:
        result["note"] = "FLOPs: custom Triton ops are not seen by the counter"
    return result


def run_scaling_row(spec):
    """Per-step costs at `spec["resolution"]` and batch `spec["batch_size"]`: n-step calls of that
    batch, every step guided or none; times per step of the whole batch."""
    from benchmarks import measure
    from benchmarks.rows import PlainRunner, Row, runner

    device, row = spec["device"], Row(**spec["row"])
    steps, batch, n = spec["steps"], spec["batch_size"], spec.get("step_call") or spec["steps"]
    pipe = _setup(spec)
    run = runner(pipe, row, steps, n)
    plain = PlainRunner(pipe, Row("plain"), steps)
    plain.unguided(n, batch)
    run.guided(n, batch)
    plain_times, guided_times = [], []
    for _ in range(spec["repeats"]):
        plain_times.append(measure.timed(lambda: plain.unguided(n, batch), device)[0] / n)
        guided_times.append(measure.timed(lambda: run.guided(n, batch), device)[0] / n)
    with Memory(device) as memory:
        run.guided(n, batch)
    with measure.eager(), measure.SavedForBackward(pipe.unet, pipe.vae, pipe.text_encoder) as keeper:
        run.guided(1, batch)
    plain_s, guided_s = measure.summary(plain_times), measure.summary(guided_times)
    return dict(
        name=row.name, key=row.key, image_size=pipe.unet.config.sample_size * pipe.vae_scale_factor,
        batch_size=batch, plain_step_s=plain_s, guided_step_s=guided_s,
        guided_over_plain=guided_s["median"] / plain_s["median"], saved_bytes=keeper.nbytes, **memory.to_dict(),
    )


def main(argv=None):
    spec_path, out_path = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(spec_path).read_text())
    result = run_scaling_row(spec) if spec.get("scaling") else run_row(spec)
    Path(out_path).write_text(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
