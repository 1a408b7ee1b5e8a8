"""What travels through the server: a validated request (`Spec`), its queued `Job`, the `Result`, and
the initial noise of a seed (the same whatever the request is batched with)."""

from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from sgfast.serve.admission import Plan, degradation_of, paper_guided
from sgfast.serve.families import denoiser, initial_noise, native_size  # noqa: F401 (the engine's too)


@dataclass
class Spec:
    """One validated request. `edits`: sgfast edit objects; `edit_specs`: the same as JSON-able dicts."""

    prompt: str
    edits: list = field(default_factory=list)
    edit_specs: list = field(default_factory=list)
    seed: int = 0
    steps: int = 20
    guidance_scale: float = 7.5
    self_guidance_scale: float = None  # None: the model's setting
    normalize_gradient: bool = None
    height: int = 64
    width: int = 64
    negative_prompt: str = None
    budget_ms: float = None
    photo: object = None  # POST /v1/edits: the RGB PIL photo the edits apply to (inverted first)
    strength: float = 1.0  # its share of edited steps


@dataclass
class Result:
    image: object  # PIL image
    spec: Spec
    plan: Plan
    degraded: bool
    degradation: dict
    timings: dict  # ms: queue, run (the batch's pipeline call), total, predicted
    cache_hit: bool
    batch_size: int
    deadline_missed: bool


@dataclass(eq=False)
class Job:
    spec: Spec
    plan: Plan
    arrival: float  # time.monotonic()
    deadline: float
    predicted_ms: float
    degraded: bool
    seq: int
    future: Future = field(default_factory=Future)
    cost_ms: float = 0.0  # predicted run time alone (for the queue-ahead estimate of later arrivals)
    abandoned: bool = False  # its client went away (or the server stopped): drop it at the next step
    inversion: dict = None  # a photo edit's reconstruction PSNR and the VAE's (set when it ran)
    guided_for: object = paper_guided  # steps -> the step indices the model's schedule guides for it

    def answer(self, result=None, error=None):
        """Resolve the future once; later answers (a batch finishing after its client left or the
        shutdown deadline answered it) are dropped. Returns whether this one was delivered."""
        try:
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)
            return True
        except Exception:  # InvalidStateError: already answered or cancelled
            return False

    @property
    def has_edits(self):
        return bool(self.spec.edits)

    def trace_key(self, model, steps=None):
        s = self.spec
        return (model, s.prompt, s.negative_prompt, s.seed, steps or self.plan.steps, s.height, s.width, s.guidance_scale)


def result_of(job, image, cache_hit, start, run_ms, batch_size, done):
    """The Result of a job that ran from `start` to `done` (time.monotonic())."""
    return Result(
        image=image,
        spec=job.spec,
        plan=job.plan,
        degraded=job.degraded,
        degradation=degradation_of(job.spec, job.plan, job.guided_for),
        timings={
            "queue_ms": round((start - job.arrival) * 1000, 1),
            "run_ms": round(run_ms, 1),
            "total_ms": round((done - job.arrival) * 1000, 1),
            "predicted_ms": round(job.predicted_ms, 1),
            "budget_ms": job.spec.budget_ms,
        },
        cache_hit=cache_hit,
        batch_size=batch_size,
        deadline_missed=job.spec.budget_ms is not None and done > job.deadline,
    )


def seeded_latents(pipe, seeds, height, width, device=None):
    """The initial noise of each seed, as diffusers draws it for a batch of one with a CPU generator,
    so that a request's image does not depend on what it was batched with."""
    noise = [initial_noise(pipe, s, height, width) for s in seeds]
    # diffusers' _execution_device walks every module (milliseconds): a caller that knows it passes it.
    return torch.cat(noise).to(device or pipe._execution_device)


def reference_steps(spec, cache, model):
    """steps -> the reference pass a plan of `steps` steps needs: none without edits or with a cached
    trace; a photo edit's inversion and its regeneration (unguided, `steps` each) are its reference."""
    if spec.photo is not None:
        return lambda steps: 2 * steps
    if not spec.edits or not any(e.needs_reference for e in spec.edits):
        return lambda steps: 0
    probe = Job(spec, None, 0, 0, 0, False, 0)
    return lambda steps: 0 if cache.peek(probe.trace_key(model, steps)) else steps


class Abandoned(Exception):
    """Every request of a running batch has gone (clients left, or the shutdown deadline passed)."""
