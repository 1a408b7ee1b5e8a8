"""Admission and degradation: plan a request against its time budget, or reject it.

Every request is planned when it arrives (`admit`): predicted completion = the predicted work queued
ahead of it (earlier deadlines) + its own cost from the cost model. A request that would miss is
rejected (policy "reject": `Rejected`, HTTP 503, with the predicted time and what would fit) or
degraded (policy "degrade": guidance on fewer steps, then fewer steps). A budget that no plan can meet
even on an idle server is `Rejected` with status 422. Pure: no timing, no threads, no model.
"""

import math
from dataclasses import dataclass

from sgfast.sampler import default_schedule, resolve_schedule

POLICIES = ("degrade", "reject")


class Rejected(Exception):
    """A request the engine will not run. `status`: 503 (overloaded, shutting down, deadline passed
    while queued) or 422 (can never be met); `detail`: a JSON-able dict (message, predictions, what fits);
    `outcome`: how the request ended (the error's `type`)."""

    outcome = None

    def __init__(self, status, message, **detail):
        super().__init__(message)
        self.status = status
        self.detail = {"message": message, **detail}
        if self.outcome is None:
            self.outcome = "rejected" if status == 503 else "invalid"


class ShuttingDown(Rejected):
    outcome = "shutting_down"

    def __init__(self, message="the server is shutting down", retry_after_s=5):
        super().__init__(503, message, retry_after_s=retry_after_s)


class Expired(Rejected):
    """Its deadline passed while it was queued."""

    outcome = "expired"

    def __init__(self, message, **detail):
        super().__init__(503, message, **detail)


# A budget is "never met" (422) only when even an idle server is predicted to take this many times
# longer: the cost model is refreshed from live timings and moves as the server runs, so a budget just
# under today's estimate may well fit tomorrow's (503 with Retry-After instead).
NEVER_MARGIN = 2.0


@dataclass(frozen=True)
class Plan:
    """What a request will run: `steps` denoising steps with self-guidance on `guided_steps` of them
    (`schedule`: step indices, or None for the library's default schedule), plus an unedited
    reference pass of `reference_steps` steps when its trace is not cached."""

    steps: int
    guided_steps: int
    schedule: tuple = None
    reference_steps: int = 0

    def as_dict(self):
        return {"steps": self.steps, "guided_steps": self.guided_steps, "reference_steps": self.reference_steps}


def paper_guided(steps):
    """The guided step indices of the paper's schedule at `steps` steps (a model without settings)."""
    return tuple(i for i, on in enumerate(default_schedule(steps)) if on)


def model_guided(settings, spec):
    """steps -> the step indices the pipeline guides for `spec` at that many steps when the plan
    leaves the schedule alone: the model's own schedule (its self_guidance.json), else the paper's."""
    if settings is None:
        return paper_guided

    def guided(steps):
        _, (_, _, schedule) = settings.resolve([list(spec.edits)], steps, spec.self_guidance_scale, spec.normalize_gradient)
        return tuple(i for i, on in enumerate(resolve_schedule(schedule, steps)) if on)

    return guided


def thinned_schedule(steps, guided, full=None):
    """`guided` of the full schedule's guided steps at `steps` (`full`: its step indices; default the
    paper's), evenly spaced from the first; None when that is the full schedule."""
    full = list(paper_guided(steps) if full is None else full)
    if guided >= len(full):
        return None
    if guided <= 0:
        return ()
    return tuple(full[math.floor(k * len(full) / guided)] for k in range(guided))


def full_guided(steps, has_edits, guided_for=paper_guided):
    return len(guided_for(steps)) if has_edits else 0


@dataclass
class Limits:
    """Caps on what a request may ask for, and the floor of degradation."""

    max_steps: int = 100
    default_steps: int = 20
    min_steps: int = 10  # degradation never goes below min(this, the requested steps)
    min_guided_fraction: float = 0.25  # nor below this fraction of the schedule's guided steps
    max_size: int = None  # pixels per side; default: twice the model's native size
    max_edits: int = 8
    max_batch: int = 4
    max_queue: int = 64
    max_body_bytes: int = 64 * 1024
    max_photo_bytes: int = 4 * 2**20  # POST /v1/edits: the photo file (its body may be 4/3 of it, base64)
    max_prompt_chars: int = 1000


def candidate_plans(steps, has_edits, reference_steps_for, limits, guided_for=paper_guided):
    """Plans from best to worst: the full request, then guidance on fewer steps, then fewer steps.
    `reference_steps_for(steps)` gives the reference pass a plan at `steps` would need;
    `guided_for(steps)` the step indices the model's own schedule guides at `steps`."""
    lowest = min(limits.min_steps, steps)
    for s in range(steps, lowest - 1, -1):
        schedule = guided_for(s) if has_edits else ()
        full = len(schedule)
        floor = max(1, math.ceil(full * limits.min_guided_fraction)) if full else 0
        for g in range(full, floor - 1, -1):
            yield Plan(s, g, None if g == full else thinned_schedule(s, g, schedule), reference_steps_for(s))


@dataclass
class Decision:
    plan: Plan
    predicted_ms: float  # predicted time to completion from now, queue included
    degraded: bool


def admit(
    cost, *, steps, has_edits, pixels, ahead_ms, budget_ms, policy, limits, reference_steps_for=lambda s: 0, batch=1,
    slack_ms=math.inf, guided_for=paper_guided, photo=False,
):
    """Plan one request. Returns a Decision or raises Rejected (422: no plan meets the budget even on
    an idle server; 503: not with the work queued ahead of it now). `slack_ms`: how much work can be
    put ahead of the queued requests due after this one before one of them is predicted to miss its
    deadline (a plan costing more is not admitted either). `photo`: a photo edit (the cost model's
    photo factor applies). Pure: no timing, no engine."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")

    def predict(plan):
        return cost.call_ms(batch, pixels, plan.steps, plan.guided_steps, plan.reference_steps, photo=photo)

    def fits(plan):
        ms = predict(plan)
        return ms <= slack_ms and (budget_ms is None or ahead_ms + ms <= budget_ms)

    candidates = list(candidate_plans(steps, has_edits, reference_steps_for, limits, guided_for))
    full = candidates[0]
    full_ms = predict(full)
    if budget_ms is None or fits(full):
        return Decision(full, ahead_ms + full_ms, False)
    allowed = candidates if policy == "degrade" else [full]
    idle_best = min(allowed, key=predict)
    idle_ms = predict(idle_best)
    if idle_ms > NEVER_MARGIN * budget_ms:
        what = "the request" if policy == "reject" else "the most degraded plan"
        raise Rejected(
            422,
            f"budget_ms={budget_ms:g} can never be met: {what} takes about {idle_ms:.0f} ms on an idle server "
            f"(more than {NEVER_MARGIN:g}x the budget)",
            predicted_ms=round(idle_ms, 1),
            min_budget_ms=math.ceil(idle_ms),
            plan=idle_best.as_dict(),
        )
    # From here on, a plan may fit later (a quieter server, a faster live estimate): 503, never 422.
    fitting = next((p for p in candidates if fits(p)), None)
    if policy == "degrade" and fitting is not None:
        return Decision(fitting, ahead_ms + predict(fitting), True)
    detail = dict(
        predicted_ms=round(ahead_ms + full_ms, 1),
        queue_ms=round(ahead_ms, 1),
        min_budget_ms=math.ceil(ahead_ms + full_ms),
        would_fit=fitting.as_dict() if fitting is not None else None,
        retry_after_s=max(1, math.ceil(max(ahead_ms + full_ms - budget_ms, full_ms - slack_ms) / 1000)),
    )
    if idle_ms > budget_ms:  # within the margin of the estimate: maybe later, not now
        detail["min_budget_ms"] = math.ceil(idle_ms)
        message = (
            f"budget_ms={budget_ms:g} is under the {idle_ms:.0f} ms the live cost model predicts for the fastest "
            f"allowed plan even on an idle server; ask for at least {math.ceil(idle_ms)} ms, or retry"
        )
    elif ahead_ms + full_ms <= budget_ms:  # it would meet its own budget, but make queued requests miss theirs
        detail["slack_ms"] = round(slack_ms, 1)
        message = (
            f"overloaded: running it ({full_ms:.0f} ms) would make queued requests miss their deadlines "
            f"(they can wait {slack_ms:.0f} ms more)"
        )
        if fitting is not None:
            message += f"; {fitting.steps} steps with guidance on {fitting.guided_steps} would fit"
    elif fitting is None:
        message = f"overloaded: completion predicted in {ahead_ms + full_ms:.0f} ms ({ahead_ms:.0f} ms queued ahead), budget {budget_ms:g} ms; nothing fits now"
    else:
        message = (
            f"predicted completion {ahead_ms + full_ms:.0f} ms ({ahead_ms:.0f} ms queued ahead) misses the budget of "
            f"{budget_ms:g} ms; {fitting.steps} steps with guidance on {fitting.guided_steps} would fit"
        )
    raise Rejected(503, message, **detail)


def degradation_of(spec, plan, guided_for=paper_guided):
    """What was cut, for the response (None if nothing)."""
    full = full_guided(spec.steps, bool(spec.edits), guided_for)
    if plan.steps == spec.steps and plan.guided_steps == full:
        return None
    return {
        "requested_steps": spec.steps,
        "steps": plan.steps,
        "requested_guided_steps": full,
        "guided_steps": plan.guided_steps,
        "guided_step_indices": None if plan.schedule is None else list(plan.schedule),
    }
