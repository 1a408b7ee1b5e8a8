"""The denoising loop: classifier-free guidance plus the self-guidance term.

    eps_hat = eps_u + s * (eps_c - eps_u) + v * sigma_t * grad_z g(z; t)

Only the conditional pass carries gradients, and only guided steps (the schedule) pay for them;
unguided steps are exactly diffusers' CFG step. The same loop records traces: per step, every
prompt word's maps and appearance, taken from the conditional half of the CFG batch.
"""

import math
from contextlib import nullcontext

import torch

from sgfast.capture import RecordingDone
# combine, unit_rms, _rows and the constants live beside the guided evaluation that uses them.
from sgfast.guided import FP16_LOSS_SCALE, ZERO_SNR_ALPHA_BAR, GuidedCall, _rows, combine, unit_rms  # noqa: F401
from sgfast.repeats import SchedulerState, forget_corrector, fresh_noise, renoise, repeats_per_call, step_generators
from sgfast.trace import View, selection




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


def call_steps(num_calls, num_inference_steps=None, order=1):
    """The inference step each UNet call belongs to, by diffusers' own progress rule: PNDM makes
    N + 1 calls for N steps (its first step calls twice), second-order schedulers (Heun, KDPM2) two
    per step after the first. Without `num_inference_steps`, every call is its own step."""
    if num_inference_steps is None:
        return list(range(num_calls))
    warmup = num_calls - num_inference_steps * order
    steps, step = [], 0
    for i in range(num_calls):
        steps.append(min(step, num_inference_steps - 1))
        if i == num_calls - 1 or (i + 1 > warmup and (i + 1) % order == 0):
            step += 1
    return steps


def applied_sigma(scheduler, timestep):
    """The sigma (z = x0 + sigma eps) the scheduler applies at this call, or None for schedulers that
    keep no sigma table (DDIM, DDPM, PNDM, LCM: they index alphas_cumprod by the timestep).

    Sigma-space schedulers scale the UNet's input by 1 / sqrt(sigma^2 + 1): that scale is read off
    their own scale_model_input, which knows which table and index apply (KDPM2's interpolated
    sigmas on its second evaluation, at an index that differs between its two variants). VP solvers
    with a sigma table (DPM-Solver++, UniPC, DEIS; Karras sigmas) hold the latents at sigmas[step_index].
    """
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is None or not hasattr(scheduler, "step_index"):
        return None
    if float(scheduler.init_noise_sigma) != 1.0:
        scale = float(scheduler.scale_model_input(torch.ones((), dtype=torch.float64, device=sigmas.device), timestep))
        return math.sqrt(max(1.0 / (scale * scale) - 1.0, 0.0))
    if scheduler.step_index is None:
        scheduler._init_step_index(timestep)  # what the scheduler's own step would do first
    return float(sigmas[scheduler.step_index])


def noise_level(scheduler, timestep):
    """(sigma_t, alpha_bar_t) of the latents the scheduler holds at this call.

    Variance-preserving schedulers (DDIM, DDPM, PNDM, DPM-Solver++, UniPC, DEIS: init_noise_sigma
    == 1) keep z = sqrt(ab) x0 + sqrt(1 - ab) eps: sigma_t = sqrt(1 - ab). Sigma-parameterised
    ones (Euler and friends) keep z = x0 + sigma eps: sigma_t is theirs. ab comes from the sigma the
    scheduler applies where it has one (Karras sigmas, KDPM2's interpolated ones), else from the
    timestep.
    """
    sigma = applied_sigma(scheduler, timestep)
    if sigma is None:
        alpha_bar = float(scheduler.alphas_cumprod[int(timestep)])
    else:
        alpha_bar = 1.0 / (1.0 + sigma * sigma)
    if float(scheduler.init_noise_sigma) == 1.0:
        return math.sqrt(1.0 - alpha_bar), alpha_bar
    return sigma, alpha_bar




def can_guide(scheduler, timestep):
    """False at zero SNR (the first step of a zero-terminal-SNR schedule): there eps = z whatever the
    model predicts, and the term, converted to the model's output (v = (eps - ...) / sqrt(ab)) or
    carried into x0 (by sqrt(1 - ab) / sqrt(ab)), is unbounded."""
    return noise_level(scheduler, timestep)[1] > ZERO_SNR_ALPHA_BAR * (1 + 1e-3)


def guidance_term(scheduler, step_index, timestep, grad, weight, normalized=False):
    """v * sigma_t * grad, expressed in the model's prediction type (`step_index` is unused: the
    scheduler's own step index is read). The raw gradient is taken with respect to the latents
    the scheduler holds, so `sigma_t` of their parameterisation makes the term the same in eps
    units under every scheduler. A `normalized` (unit-RMS) gradient has lost that
    parameterisation's scale: it is scaled by the variance-preserving noise level sqrt(1 - ab),
    which is what sigma_t * grad amounts to on a VP scheduler."""
    sigma, alpha_bar = noise_level(scheduler, timestep)
    scale = math.sqrt(1.0 - alpha_bar) if normalized else sigma
    term = weight * scale * grad
    prediction = scheduler.config.get("prediction_type", "epsilon")
    if prediction == "v_prediction":
        term = term / math.sqrt(alpha_bar)  # eps = sqrt(ab) v + sqrt(1-ab) z, so dv = deps / sqrt(ab)
    elif prediction != "epsilon":
        raise ValueError(f"self-guidance supports epsilon and v_prediction models, not {prediction!r}")
    return term


def _unet(pipe, latents, timestep, embeds, unet_kwargs=None):
    return pipe.unet(latents, timestep, encoder_hidden_states=embeds, return_dict=False, **(unet_kwargs or {}))[0]


def _cfg_step(pipe, latents, timestep, embeds, guidance_scale, do_cfg, unet_kwargs=None, guidance_rescale=0.0):
    """Exactly diffusers' StableDiffusionPipeline step (batch-2 CFG)."""
    latent_in = torch.cat([latents] * 2) if do_cfg else latents
    latent_in = pipe.scheduler.scale_model_input(latent_in, timestep)
    noise = _unet(pipe, latent_in, timestep, embeds, unet_kwargs)
    if do_cfg:
        uncond, cond = noise.chunk(2)
        return combine(uncond, cond, guidance_scale, guidance_rescale)
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


def energy_of(edits, capture, prompt_words, words, references, timestep, call=None):
    """Sum over batch items and their edits of each edit's energy at this step (float32 scalar).
    `call`: the UNet call's index, where the references recorded it (repeated timesteps)."""
    total = 0.0
    for b, view in enumerate(current_views(capture, words)):
        reference = references[b].view(timestep, call=call) if references[b] is not None else None
        for edit in edits[b]:
            total = total + edit.energy(view.subset(edit.needed_words(prompt_words[b])), reference, timestep)
    return total


def edit_selection(edits, prompt_words, device):
    """The words each item's edits read, and the token selection that records them."""
    words = [list(dict.fromkeys(w for e in item for w in e.needed_words(pw))) for item, pw in zip(edits, prompt_words)]
    # An item without edits still gets one (unused) word so that the batch stays rectangular.
    tokens = selection(prompt_words, [w or pw.words[:1] for w, pw in zip(words, prompt_words)], device)
    return words, tokens


def guided_energy(
    pipe, capture, latents, timestep, cond_embeds, edits, prompt_words, words, tokens, unet_kwargs=None, call=None, stop=False
):
    """The conditional UNet pass on `latents` with the edits' words recorded, and the edits' total
    energy. Differentiable with respect to `latents`. Returns (eps_c, energy); with `stop` the pass
    ends once the edits' maps and features are recorded, and eps_c is None."""
    scheduler = pipe.scheduler
    items = [item for item, _ in edits]
    features = any(e.needs_features for item in items for e in item)
    cond = None
    with capture.record(*tokens, tuple(latents.shape[-2:]), features=features, stop=stop):
        try:
            cond = _unet(pipe, scheduler.scale_model_input(latents, timestep), timestep, cond_embeds, unet_kwargs)
        except RecordingDone:
            pass  # the rest of the UNet would compute nothing the energy reads
    # Outside the recording: the fast path switched gradients off after the last captured layer.
    energy = energy_of(items, capture, prompt_words, words, [r for _, r in edits], timestep, call)
    return cond, energy


def guided_step(call, latents, i, t, embeds, guidance_scale, do_cfg, *, unet_kwargs, guidance_rescale,
                self_guidance_scale, normalize_gradient, level, graphs=None):
    """diffusers' CFG step plus the guidance term: (noise, energy, finite), device tensors.

    `call` (sgfast.guided.GuidedCall) evaluates the step in its form (split: the unconditional pass
    without gradients and the conditional one with them; batched: one batch-2 pass); `level`: the
    host-side (sigma_t, alpha_bar, input scale) of this UNet call. With v = 0 the term vanishes: the
    noise then comes from the same batched pass as an unguided step, so that the step is the unedited
    one bit for bit (a UNet's output depends on the batch it ran in, by float rounding), and the
    energy from a conditional pass without gradients that ends at the last captured layer."""
    pipe, plan = call.pipe, call.plan
    targets = plan.target_table[call.row[i]]
    if self_guidance_scale == 0:
        with torch.no_grad():
            noise = _cfg_step(pipe, latents, t, embeds, guidance_scale, do_cfg, unet_kwargs, guidance_rescale)
            latent_in = pipe.scheduler.scale_model_input(latents, t)
            energy = call.energy_only(latent_in, t, embeds, unet_kwargs or {}, targets, plan.weights, do_cfg,
                                      stop=can_stop_early(call.capture, unet_kwargs), call=i)
        return noise, energy, None
    sigma_t, alpha_bar, input_scale = level
    term_scale = call.schedule.term_scale(sigma_t, alpha_bar, self_guidance_scale, normalize_gradient)
    latent_in = pipe.scheduler.scale_model_input(latents, t)
    settings = dict(guidance_scale=guidance_scale, do_cfg=do_cfg, guidance_rescale=guidance_rescale,
                    normalize=normalize_gradient)

    def evaluate():
        if graphs is not None:
            return graphs.run(call, latent_in, t, embeds, unet_kwargs or {}, targets, input_scale, term_scale, settings, i)
        return call.evaluate(latent_in, t, embeds, unet_kwargs or {}, targets, plan.weights, input_scale, term_scale,
                             call=i, **settings)

    call.resolve_form(latent_in, do_cfg, evaluate, graphs)  # guided_step="auto": chosen at the first guided step
    return evaluate()


def stepped_back(call, latents, noise, i, t, level, timesteps, extra_step_kwargs, generator):
    """The latents to run guided call `i` again from: its step taken on trial, and the noise that step
    removed added back (sgfast.repeats). The scheduler is left as it was before the trial."""
    scheduler = call.pipe.scheduler
    saved = SchedulerState(scheduler, step_generators(extra_step_kwargs, latents.device))
    stepped = scheduler.step(noise, t, latents, **extra_step_kwargs, return_dict=False)[0]
    ended = call.schedule.level(i + 1, timesteps[i + 1])  # the scheduler now holds the next call's level
    saved.restore()
    forget_corrector(scheduler)
    return renoise(stepped, ended[:2], level[:2], call.schedule.sigma_space, fresh_noise(stepped, generator))


def raise_if_not_finite(flags):
    """The deferred finiteness check of the guided steps' gradients: [(UNet call, device bool)]."""
    if not flags:
        return
    values = torch.stack([f for _, f in flags]).tolist()
    for (call, _), ok in zip(flags, values):
        if not ok:
            raise FloatingPointError(f"the self-guidance gradient is not finite at UNet call {call}; lower the edit weights")


def can_stop_early(capture, unet_kwargs):
    """Whether the energy's pass may end inside the UNet: not in a compiled UNet (an exception out of
    the compiled graph), nor with a LoRA scale (the UNet undoes it only at the end of its forward)."""
    scale = (unet_kwargs or {}).get("cross_attention_kwargs") or {}
    return capture.can_stop_early and scale.get("scale", 1.0) == 1.0


# The UNet's added conditioning as diffusers' callbacks name it (SDXL's pooled text and time ids).
CALLBACK_ADDED_INPUTS = {"add_text_embeds": "text_embeds", "add_time_ids": "time_ids"}


def step_callback(pipe, callback, tensor_inputs, i, t, state):
    """diffusers' `callback_on_step_end(pipe, i, t, {name: tensor})`: it may replace the latents, the
    prompt embeddings ([negative; prompt] under CFG) and the added conditioning (SDXL's
    add_text_embeds, add_time_ids), and change `pipe._guidance_scale`."""
    added = dict((state["unet_kwargs"] or {}).get("added_cond_kwargs") or {})
    tensors = {**state, **{name: added.get(key) for name, key in CALLBACK_ADDED_INPUTS.items()}}
    outputs = callback(pipe, i, t, {name: tensors[name] for name in tensor_inputs}) or {}
    state["latents"] = outputs.pop("latents", state["latents"])
    state["prompt_embeds"] = outputs.pop("prompt_embeds", state["prompt_embeds"])
    state["negative_prompt_embeds"] = outputs.pop("negative_prompt_embeds", state["negative_prompt_embeds"])
    replaced = {key: outputs.pop(name) for name, key in CALLBACK_ADDED_INPUTS.items() if name in outputs}
    if replaced:
        state["unet_kwargs"] = {**state["unet_kwargs"], "added_cond_kwargs": {**added, **replaced}}


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
    num_inference_steps=None,
    unet_kwargs=None,
    guidance_rescale=0.0,
    callback=None,
    callback_inputs=("latents",),
    negative_embeds=None,
    guided_form="split",
    graphs=None,
    forms_used=None,
    repeats=None,
    repeat_generator=None,
):
    """Run the loop from `latents` over `timesteps`. `embeds` is [uncond; cond] as diffusers builds it
    (or cond alone without CFG). With `edits` (one list per batch item), guided steps add the
    self-guidance term and append (step, energy) to `energies`; with `traces` (one per item), every
    UNet call's maps and appearance are recorded. `normalize_gradient`: each item's energy gradient is
    scaled to unit RMS before `self_guidance_scale * sigma_t` multiplies it. `schedule` is per
    inference step (`num_inference_steps` of them; default: one per UNet call); every UNet call of
    a guided step is guided. `unet_kwargs` (timestep_cond, cross_attention_kwargs,
    added_cond_kwargs), `guidance_rescale` and `callback` (diffusers' callback_on_step_end) as in
    diffusers' StableDiffusionPipeline. `guided_form`: "split", "batched" (sgfast.guided) or a
    sgfast.step_form.AutoForm (chosen at the first guided step); `forms_used`: a list that gets the
    FormChoice of the guided steps, when one ran; `graphs`: a sgfast.graphs.StepGraphs that replays
    each guided evaluation as a CUDA graph. `repeats`: runs of each guided step (one int per
    inference step, sgfast.repeats), re-noised between runs with noise from `repeat_generator`.

    A guided step reads nothing on the host: timesteps and noise levels come from host-side copies
    made once per call, energies and the gradients' finiteness stay on the device until the loop
    ends (one read each)."""
    scheduler = pipe.scheduler
    batch = latents.shape[0]
    latent_size = tuple(latents.shape[-2:])
    extra_step_kwargs = extra_step_kwargs or {}
    steps = call_steps(len(timesteps), num_inference_steps, getattr(scheduler, "order", 1))
    guided_steps = [False] * (steps[-1] + 1 if steps else 0)
    host_timesteps = timesteps.tolist() if isinstance(timesteps, torch.Tensor) else list(timesteps)  # one read per call
    if edits is not None and any(edits):
        guided_steps = resolve_schedule(schedule, len(guided_steps))
        edit_words, edit_tokens = edit_selection(edits, prompt_words, latents.device)
        guided_calls = [i for i in range(len(timesteps)) if guided_steps[steps[i]]]
        call = GuidedCall(pipe, capture, edits, references, prompt_words, edit_words, edit_tokens, host_timesteps,
                          guided_calls, latents, embeds, form=guided_form)
        # With v = 0 the steps are the unedited ones: nothing to repeat.
        runs = repeats_per_call(repeats or [1] * len(guided_steps), steps) if self_guidance_scale else [1] * len(steps)
    if traces is not None:
        trace_words = [list(dict.fromkeys(pw.words)) for pw in prompt_words]
        trace_tokens = selection(prompt_words, trace_words, latents.device)
    state = dict(latents=latents, prompt_embeds=embeds, negative_prompt_embeds=negative_embeds, unet_kwargs=unet_kwargs)
    pending, finite = [], []  # (step, energy) and (call, finite) on the device, read once after the loop

    with pipe.progress_bar(total=len(guided_steps)) if progress else nullcontext() as bar:
        for i, t in enumerate(timesteps):
            if getattr(pipe, "_interrupt", False):
                continue
            latents, embeds, unet_kwargs = state["latents"], state["prompt_embeds"], state["unet_kwargs"]
            if callback is not None:  # a callback may change the guidance scale, as diffusers reads it
                guidance_scale = getattr(pipe, "_guidance_scale", guidance_scale)
            do_cfg = guidance_scale > 1.0 and pipe.unet.config.time_cond_proj_dim is None
            level = call.schedule.level(i, t) if guided_steps[steps[i]] else None
            if level is not None and call.schedule.can_guide(level[1]):
                for run in range(runs[i]):
                    if run:
                        latents = stepped_back(call, latents, noise, i, t, level, timesteps, extra_step_kwargs, repeat_generator)
                    noise, energy, ok = guided_step(
                        call, latents, i, t, embeds, guidance_scale, do_cfg, unet_kwargs=unet_kwargs,
                        guidance_rescale=guidance_rescale, self_guidance_scale=self_guidance_scale,
                        normalize_gradient=normalize_gradient, level=level, graphs=graphs,
                    )
                    if ok is not None:
                        finite.append((i, ok))
                pending.append((steps[i], energy))  # the step's last run: the energy it was stepped with
            elif traces is not None:
                cond_rows = slice(batch, 2 * batch) if do_cfg else slice(None)
                with capture.record(*trace_tokens, latent_size, batch_slice=cond_rows):
                    noise = _cfg_step(pipe, latents, t, embeds, guidance_scale, do_cfg, unet_kwargs, guidance_rescale)
                    record_traces(traces, capture, trace_words, host_timesteps[i])
            elif graphs is not None:
                latent_in = scheduler.scale_model_input(torch.cat([latents] * 2) if do_cfg else latents, t)
                noise = graphs.plain(pipe, latent_in, t, embeds, unet_kwargs or {}, guidance_scale, do_cfg,
                                     guidance_rescale, combine)
            else:
                noise = _cfg_step(pipe, latents, t, embeds, guidance_scale, do_cfg, unet_kwargs, guidance_rescale)
            state["latents"] = scheduler.step(noise, t, latents, **extra_step_kwargs, return_dict=False)[0]
            if callback is not None:
                step_callback(pipe, callback, callback_inputs, i, t, state)
            if bar is not None and (i == len(timesteps) - 1 or steps[min(i + 1, len(steps) - 1)] != steps[i]):
                bar.update()
    raise_if_not_finite(finite)
    if forms_used is not None and finite:  # a guided evaluation ran (v != 0)
        forms_used.append(call.choice)
    if energies is not None and pending:
        values = torch.stack([e.double() for _, e in pending]).tolist()  # the call's one read of its energies
        energies.extend((step, value) for (step, _), value in zip(pending, values))
    return state["latents"]
