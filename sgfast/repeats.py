"""Repeated guided steps: a guided step run again from its own noise level.

One guided step moves the latents a bounded way (the term is v * sigma_t times a unit-RMS gradient),
and early in sampling the layout is laid down in a few steps: an object asked to move far can run
out of steps before it gets there, and stronger weights tear what the holds keep. A repeated step
takes the step (guidance included), adds back the noise that step removed, so that the latents are
at the step's own noise level again, and runs the step once more: the guidance gets more updates at
the same noise level, and the model re-forms the image around them (the "self-recurrence" of
Bansal et al., Universal Guidance, 2023; Lugmayr et al.'s RePaint resamples the same way).

    z_t = sqrt(ab_t / ab_s) z_s + sqrt(1 - ab_t / ab_s) eps     (variance-preserving latents)
    z_t = z_s + sqrt(sigma_t^2 - sigma_s^2) eps                  (sigma-space latents: Euler and friends)

where s is the noise level the step ended at (the next UNet call's) and t the step's own. The trial
step leaves the scheduler as it found it (its step index, a multistep solver's history, its step
noise's generators): only the last run of a step counts.
"""

import math

import torch
from diffusers.utils.torch_utils import randn_tensor

# Re-noising draws from generators of their own, seeded from the call's: the step noise a traced
# generation replays stays where it was.
REPEAT_SEED_OFFSET = 0x5EED


def resolve_repeats(repeats, num_steps):
    """`None` (every step once), an int n >= 1 (every guided step n times), or one int >= 1 per step.
    Returns one int per step."""
    if repeats is None:
        return [1] * num_steps
    if _is_count(repeats):
        return [repeats] * num_steps
    allowed = f"guidance_repeats must be an int >= 1 or a list of {num_steps} ints >= 1 (one per step)"
    if not isinstance(repeats, (list, tuple)):
        raise ValueError(f"{allowed}, got {repeats!r}")
    repeats = list(repeats)
    if len(repeats) != num_steps or not all(_is_count(n) for n in repeats):
        raise ValueError(f"{allowed}, got {repeats!r}")
    return repeats


def _is_count(n):
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1


def repeats_per_call(repeats, steps):
    """The number of runs of each UNet call: its step's count on the first call of a step, 1 on the
    others (a second-order scheduler's correction, PNDM's warm-up) and on the last call, which has
    no next noise level to step to."""
    runs = []
    for i, step in enumerate(steps):
        first = i == 0 or steps[i - 1] != step
        runs.append(repeats[step] if first and i < len(steps) - 1 else 1)
    return runs


def renoise(latents, ended, level, sigma_space, noise):
    """`latents` at the noise level `ended` (sigma_t, alpha_bar) taken back to `level`, the step's
    own, with `noise` (the formulas above). A level that is not noisier than `ended` adds nothing."""
    if sigma_space:
        variance = max(level[0] ** 2 - ended[0] ** 2, 0.0)
        return latents + math.sqrt(variance) * noise
    ratio = min(level[1] / ended[1], 1.0)
    return math.sqrt(ratio) * latents + math.sqrt(1.0 - ratio) * noise


def repeat_generators(generator, device):
    """Generators for the re-noising noise, one per given generator, seeded from it. A call without
    one re-noises from a fixed seed: an edit of a trace then gives the same image every time, as a
    deterministic scheduler's does without repeats."""
    if generator is None:
        return torch.Generator(device=device).manual_seed(REPEAT_SEED_OFFSET)
    generators = list(generator) if isinstance(generator, (list, tuple)) else [generator]
    fresh = [torch.Generator(device=g.device).manual_seed(g.initial_seed() + REPEAT_SEED_OFFSET) for g in generators]
    return fresh[0] if len(fresh) == 1 else fresh


def fresh_noise(latents, generator):
    """Standard normal noise shaped as `latents` (diffusers' randn_tensor: one generator per row where
    a list is given)."""
    return randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)


class SchedulerState:
    """What a scheduler's step changes, saved and put back: its attributes (lists copied: multistep
    solvers append their history) and the states of the generators its step noise comes from."""

    def __init__(self, scheduler, generators=()):
        self.scheduler = scheduler
        self.attributes = {k: list(v) if isinstance(v, list) else v for k, v in vars(scheduler).items()}
        self.generators = [(g, g.get_state()) for g in generators]

    def restore(self):
        state = vars(self.scheduler)
        state.clear()
        state.update({k: list(v) if isinstance(v, list) else v for k, v in self.attributes.items()})
        for g, saved in self.generators:
            g.set_state(saved)


def forget_corrector(scheduler):
    """Let the scheduler's next step start from the latents it is given. A predictor-corrector solver
    (UniPC, SA-Solver) first recomputes the sample it is given from its previous one (`last_sample`) and
    the new prediction, which would throw a repeat's re-noised latents away; without a previous sample
    it takes them as they are, and corrects again from the next step on."""
    if getattr(scheduler, "last_sample", None) is not None:
        scheduler.last_sample = None


def step_generators(extra_step_kwargs, device):
    """The generators a scheduler's step may draw its noise from (none where it takes no generator)."""
    if "generator" not in extra_step_kwargs:
        return []
    return noise_generators(extra_step_kwargs["generator"], device)


def noise_generators(generator, device):
    """The generators step noise is drawn from: the given ones, else the device's default."""
    if generator is not None:
        return list(generator) if isinstance(generator, (list, tuple)) else [generator]
    device = torch.device(device)
    if device.type == "cpu":
        return [torch.default_generator]
    if device.type == "cuda":
        return [torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]]
    return []
