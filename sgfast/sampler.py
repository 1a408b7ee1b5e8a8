"""The denoising loop: classifier-free guidance plus the self-guidance term.

    eps_hat = eps_u + s * (eps_c - eps_u) + v * sigma_t * grad_z g(z; t)

Only the conditional pass carries gradients, and only guided steps (the schedule) pay for them;
unguided steps are exactly diffusers' CFG step. The same loop records traces: per step, every
prompt word's maps and appearance, taken from the conditional half of the CFG batch.
"""

import math
from contextlib import nullcontext

import torch

from sgfast.trace import Trace, View, selection


FP16_LOSS_SCALE = 1024.0


def default_schedule(num_steps):
    """The public ports' schedule: guide every step for the first 3/16 of the steps, then every other
    step, and none in the last 1/32. Returns one bool per step."""
    dense = round(3 * num_steps / 16)
    stop = num_steps - math.ceil(num_steps / 32)
    return [i < stop and (i < dense or (i - dense) % 2 == 0) for i in range(num_steps)]


def resolve_schedule(schedule, num_steps):
    """`None` (the default), a callable step -> bool, a list of bools, or a collection of step indices."""
    if schedule is None:
        return default_schedule(num_steps)
    if callable(schedule):
        return [bool(schedule(i)) for i in range(num_steps)]
    schedule = list(schedule)
    if len(schedule) == num_steps and all(isinstance(s, bool) for s in schedule):
        return schedule
    if not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < num_steps for s in schedule):
        raise ValueError(f"guidance_schedule must be bools for each of the {num_steps} steps or step indices in [0, {num_steps})")
    return [i in set(schedule) for i in range(num_steps)]


def noise_level(scheduler, step_index, timestep):
    """(sigma_t, alpha_bar_t) of the latents the scheduler holds at this step.

    Variance-preserving schedulers (DDIM, DDPM, DPM-Solver++: init_noise_sigma == 1) keep
    z = sqrt(ab) x0 + sqrt(1 - ab) eps, so a score converts to eps with sqrt(1 - ab). Sigma-
    parameterised ones (Euler and friends) keep z = x0 + sigma eps: sigma is theirs, ab = 1/(1+sigma^2).
    """
    if float(scheduler.init_noise_sigma) == 1.0:
        alpha_bar = float(scheduler.alphas_cumprod[int(timestep)])
        return math.sqrt(1.0 - alpha_bar), alpha_bar
    sigma = float(scheduler.sigmas[step_index])
    return sigma, 1.0 / (1.0 + sigma * sigma)


def guidance_term(scheduler, step_index, timestep, grad, weight):
    """v * sigma_t * grad, expressed in the model's prediction type."""
    sigma, alpha_bar = noise_level(scheduler, step_index, timestep)
    term = weight * sigma * grad
    prediction = scheduler.config.get("prediction_type", "epsilon")
    if prediction == "v_prediction":
        term = term / math.sqrt(alpha_bar)  # eps = sqrt(ab) v + sqrt(1-ab) z, so dv = deps / sqrt(ab)
    elif prediction != "epsilon":
        raise ValueError(f"self-guidance supports epsilon and v_prediction models, not {prediction!r}")
    return term


def unit_rms(grad):
    """Each batch item's gradient scaled to unit root-mean-square (an item with none stays zero)."""
    rms = grad.pow(2).mean(dim=tuple(range(1, grad.ndim)), keepdim=True).sqrt()
    return torch.where(rms > 0, grad / rms.clamp_min(torch.finfo(grad.dtype).tiny), grad)


def _unet(pipe, latents, timestep, embeds):
    return pipe.unet(latents, timestep, encoder_hidden_states=embeds, return_dict=False)[0]


def _cfg_step(pipe, latents, timestep, embeds, guidance_scale, do_cfg):
    """Exactly diffusers' StableDiffusionPipeline step (batch-2 CFG)."""
    latent_in = torch.cat([latents] * 2) if do_cfg else latents
    latent_in = pipe.scheduler.scale_model_input(latent_in, timestep)
    noise = _unet(pipe, latent_in, timestep, embeds)
    if do_cfg:
        uncond, cond = noise.chunk(2)
        noise = uncond + guidance_scale * (cond - uncond)
    return noise


def current_views(capture, words):
    """One View per batch item of what the capture recorded."""
    views = []
    for b, item_words in enumerate(words):
        maps = {layer: m[b] for layer, m in capture.maps.items()}
        features = None if capture.features is None else capture.features[b]
        views.append(View(item_words, maps, features))
    return views


def record_traces(traces, capture, words, timestep):
    for trace, view in zip(traces, current_views(capture, words)):
        appearance = None
        if view.features is not None:
            appearance = torch.stack([view.appearance(w) for w in view.words])
        trace.add(timestep, {layer: m[: len(view.words)] for layer, m in view.maps.items()}, appearance)


def energy_of(edits, capture, prompt_words, words, references, timestep):
    """Sum over batch items and their edits of each edit's energy at this step (float32 scalar)."""
    total = 0.0
    for b, view in enumerate(current_views(capture, words)):
        reference = references[b].view(timestep) if references[b] is not None else None
        for edit in edits[b]:
            total = total + edit.energy(view.subset(edit.needed_words(prompt_words[b])), reference, timestep)
    return total


def edit_selection(edits, prompt_words, device):
    """The words each item's edits read, and the token selection that records them."""
    words = [list(dict.fromkeys(w for e in item for w in e.needed_words(pw))) for item, pw in zip(edits, prompt_words)]
    # An item without edits still gets one (unused) word so that the batch stays rectangular.
    tokens = selection(prompt_words, [w or pw.words[:1] for w, pw in zip(words, prompt_words)], device)
    return words, tokens


def guided_energy(pipe, capture, latents, timestep, cond_embeds, edits, prompt_words, words, tokens):
    """The conditional UNet pass on `latents` with the edits' words recorded, and the edits' total
    energy. Differentiable with respect to `latents`. Returns (eps_c, energy)."""
    scheduler = pipe.scheduler
    items = [item for item, _ in edits]
    features = any(e.needs_features for item in items for e in item)
    with capture.record(*tokens, tuple(latents.shape[-2:]), features=features):
        cond = _unet(pipe, scheduler.scale_model_input(latents, timestep), timestep, cond_embeds)
    # Outside the recording: the fast path switched gradients off after the last captured layer.
    energy = energy_of(items, capture, prompt_words, words, [r for _, r in edits], timestep)
    return cond, energy


def denoise(
    pipe,
    latents,
    timesteps,
    embeds,
    guidance_scale,
    *,
    capture=None,
    prompt_words=None,
    edits=None,
    references=None,
    traces=None,
    schedule=None,
    self_guidance_scale=1.0,
    normalize_gradient=False,
    extra_step_kwargs=None,
    energies=None,
    progress=True,
):
    """Run the loop from `latents` over `timesteps`. `embeds` is [uncond; cond] as diffusers builds it
    (or cond alone without CFG). With `edits` (one list per batch item), guided steps add the
    self-guidance term and append (step, energy) to `energies`; with `traces` (one per item), every
    step's maps and appearance are recorded. `normalize_gradient`: each item's energy gradient is
    scaled to unit RMS before `self_guidance_scale * sigma_t` multiplies it."""
    scheduler = pipe.scheduler
    do_cfg = guidance_scale > 1.0 and pipe.unet.config.time_cond_proj_dim is None
    batch = latents.shape[0]
    uncond_embeds, cond_embeds = embeds.chunk(2) if do_cfg else (None, embeds)
    latent_size = tuple(latents.shape[-2:])
    extra_step_kwargs = extra_step_kwargs or {}
    guided_steps = [False] * len(timesteps)
    if edits is not None and any(edits):
        guided_steps = resolve_schedule(schedule, len(timesteps))
        edit_words, edit_tokens = edit_selection(edits, prompt_words, latents.device)
        edits_with_references = list(zip(edits, references))
    if traces is not None:
        trace_words = [list(dict.fromkeys(pw.words)) for pw in prompt_words]
        trace_tokens = selection(prompt_words, trace_words, latents.device)
    cond_rows = slice(batch, 2 * batch) if do_cfg else slice(None)

    with pipe.progress_bar(total=len(timesteps)) if progress else nullcontext() as bar:
        for i, t in enumerate(timesteps):
            if guided_steps[i]:
                with torch.no_grad():
                    uncond = _unet(pipe, scheduler.scale_model_input(latents, t), t, uncond_embeds) if do_cfg else None
                z = latents.detach().requires_grad_(True)
                with torch.enable_grad():
                    cond, energy = guided_energy(
                        pipe, capture, z, t, cond_embeds, edits_with_references, prompt_words, edit_words, edit_tokens
                    )
                    # fp16 latents: scale the energy so that small gradients do not underflow.
                    loss_scale = FP16_LOSS_SCALE if z.dtype == torch.float16 else 1.0
                    (grad,) = torch.autograd.grad(energy * loss_scale, z)
                    grad = grad.float() / loss_scale
                if not torch.isfinite(grad).all():
                    raise FloatingPointError(f"the self-guidance gradient is not finite at step {i}; lower the edit weights")
                if normalize_gradient:
                    grad = unit_rms(grad)
                if energies is not None:
                    energies.append((i, float(energy)))
                cond = cond.detach()
                noise = uncond + guidance_scale * (cond - uncond) if do_cfg else cond
                noise = noise + guidance_term(scheduler, i, t, grad, self_guidance_scale).to(noise.dtype)
            elif traces is not None:
                with capture.record(*trace_tokens, latent_size, batch_slice=cond_rows):
                    noise = _cfg_step(pipe, latents, t, embeds, guidance_scale, do_cfg)
                    record_traces(traces, capture, trace_words, t)
            else:
                noise = _cfg_step(pipe, latents, t, embeds, guidance_scale, do_cfg)
            latents = scheduler.step(noise, t, latents, **extra_step_kwargs, return_dict=False)[0]
            if bar is not None:
                bar.update()
    return latents
