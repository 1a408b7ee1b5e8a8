"""One call's guided steps without host synchronisation: what is read on the host is read once per
call, the energies of every edit come from one `EnergyPlan`, and the guided model evaluation (the
unconditional pass, the conditional pass with the edits' maps, the energy, its gradient to the
latents, the noise combination) is one function of tensors, `GuidedCall.evaluate`: what a CUDA
graph captures (`StepGraphs`) and what torch.compile compiles whole.

Two forms of the evaluation (`from_pipe(guided_step=...)`):
- "split": the unconditional pass at batch B without gradients, then the conditional pass at batch B
  with them (two passes; the backward only through the conditional one);
- "batched": one batch-2B CFG pass, the maps from the conditional half, the gradient to the
  conditional half's input (one pass, fewer launches; its backward runs at batch 2B).
"auto" (sgfast.step_form.AutoForm) picks one of them at the call's first guided step, by a
measurement made once per machine and shape and kept (`GuidedCall.resolve_form`).
"""

import math

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from sgfast.capture import RecordingDone
from sgfast.energies import EnergyPlan, Layout, grid_at, layer_depth
from sgfast.step_form import FORMS, FormChoice
from sgfast.trace import View

FP16_LOSS_SCALE = 1024.0
# diffusers' stand-in for alpha_bar = 0 in zero-terminal-SNR schedules where it must stay finite
# (Euler, DPM-Solver: alphas_cumprod[-1] = 2**-24, sigma = 4096).
ZERO_SNR_ALPHA_BAR = 2.0**-24


class HostSchedule:
    """Host-side copies of the scheduler's tables, made once per call, and the noise level of each
    UNet call read from them (as `sgfast.sampler.noise_level`, without reading a device tensor)."""

    def __init__(self, scheduler, timesteps):
        self.scheduler = scheduler
        self.timesteps = timesteps.tolist() if isinstance(timesteps, torch.Tensor) else [float(t) for t in timesteps]
        alphas = getattr(scheduler, "alphas_cumprod", None)
        self.alphas = alphas.tolist() if alphas is not None else None
        sigmas = getattr(scheduler, "sigmas", None)
        self.has_sigmas = sigmas is not None and hasattr(scheduler, "step_index")
        self.sigmas = sigmas.tolist() if self.has_sigmas else None
        self.sigma_space = float(scheduler.init_noise_sigma) != 1.0
        self.prediction = scheduler.config.get("prediction_type", "epsilon")
        if self.prediction not in ("epsilon", "v_prediction"):
            raise ValueError(f"self-guidance supports epsilon and v_prediction models, not {self.prediction!r}")

    def input_scale(self, t):
        """d scale_model_input(z) / dz at this call: 1 for variance-preserving schedulers, else
        1 / sqrt(sigma^2 + 1) as the scheduler applies it (read off a host-side evaluation)."""
        if not self.sigma_space:
            return 1.0
        sigmas = self.scheduler.sigmas
        return self.scheduler.scale_model_input(torch.ones((), dtype=torch.float64, device=sigmas.device), t).tolist()

    def level(self, i, t):
        """(sigma_t, alpha_bar_t, input scale) of UNet call `i` at device timestep `t`."""
        scale = self.input_scale(t)
        sigma = None
        if self.sigma_space:
            sigma = math.sqrt(max(1.0 / (scale * scale) - 1.0, 0.0))
        elif self.has_sigmas:
            if self.scheduler.step_index is None:
                self.scheduler._init_step_index(t)  # what the scheduler's own step would do first
            sigma = self.sigmas[self.scheduler.step_index]
        alpha_bar = self.alphas[int(self.timesteps[i])] if sigma is None else 1.0 / (1.0 + sigma * sigma)
        sigma_t = sigma if self.sigma_space else math.sqrt(1.0 - alpha_bar)
        return sigma_t, alpha_bar, scale

    def can_guide(self, alpha_bar):
        return alpha_bar > ZERO_SNR_ALPHA_BAR * (1 + 1e-3)

    def term_scale(self, sigma_t, alpha_bar, weight, normalized):
        """v * sigma_t (sqrt(1 - ab) for a unit-RMS gradient), in the model's prediction type."""
        scale = weight * (math.sqrt(1.0 - alpha_bar) if normalized else sigma_t)
        return scale / math.sqrt(alpha_bar) if self.prediction == "v_prediction" else scale


def feature_grid(unet, name, latent_size):
    """The grid of the feature layer's output: a whole block's output is one level finer (up) or
    coarser (down) when the block resamples; a module inside a block works at the block's level."""
    depth = layer_depth(unet, name)
    if name.count(".") == 1:
        block = unet.get_submodule(name)
        if name.startswith("up_blocks") and getattr(block, "upsamplers", None):
            depth -= 1
        elif name.startswith("down_blocks") and getattr(block, "downsamplers", None):
            depth += 1
    return grid_at(latent_size, depth)


def check_token_range(prompt_words, words, keys):
    """The edits' token positions lie within the text's `keys` tokens: checked once per call, on the host."""
    high = max((p for pw, ws in zip(prompt_words, words) for w in ws for p in pw.positions[pw.index(w)]), default=0)
    if high >= keys:
        raise ValueError(f"an edited word sits at token {high}, past the {keys} tokens of the prompt's embeddings")


def unit_rms(grad):
    """Each batch item's gradient scaled to unit root-mean-square (an item with none stays zero)."""
    rms = grad.pow(2).mean(dim=tuple(range(1, grad.ndim)), keepdim=True).sqrt()
    return torch.where(rms > 0, grad / rms.clamp_min(torch.finfo(grad.dtype).tiny), grad)


def combine(uncond, cond, guidance_scale, guidance_rescale=0.0):
    """diffusers' classifier-free guidance, with its optional rescale (Lin et al. 2023, 3.4)."""
    if uncond is None:
        return cond
    noise = uncond + guidance_scale * (cond - uncond)
    if guidance_rescale > 0.0:
        noise = rescale_noise_cfg(noise, cond, guidance_rescale=guidance_rescale)
    return noise


def guidance_term(grad, scale):
    """The term a guided step adds to the noise: `scale` (v * sigma_t in the model's prediction
    type, `HostSchedule.term_scale`) times the latents' gradient (unit-RMS where normalised)."""
    return scale * grad


ENERGY_METHODS = ("energy", "object_energy", "keep_energy", "own_energy")
TERM_METHODS = ("terms", "object_terms", "keep_terms", "own_shape_term", "centroid_term")


def has_terms(edit):
    """Whether the edit's terms describe its energy: the class nearest in its MRO that defines an
    energy method also defines (or inherits from below it) its terms. Every built-in edit does; a
    user's own Edit, or a subclass that overrides an energy method only, runs through the per-layer
    formulation (`Edit.energy` on Views)."""
    mro = type(edit).__mro__

    def first(names):
        return next((i for i, cls in enumerate(mro) if any(n in vars(cls) for n in names)), len(mro))

    return first(TERM_METHODS) <= first(ENERGY_METHODS)


class GuidedCall:
    """The guided steps of one call: the plan, the token selection, the host-side schedule."""

    def __init__(self, pipe, capture, edits, references, prompt_words, words, tokens, timesteps, guided_calls,
                 latents, embeds, *, form="split", sharpness=10.0):
        # `form`: one of FORMS, or an AutoForm that resolves it at the first guided step.
        self.auto = None if isinstance(form, str) else form
        if self.auto is None and form not in FORMS:
            raise ValueError(f"guided_step must be one of {FORMS}, got {form!r}")
        self.form = "auto" if self.auto is not None else form
        self.choice = None if self.auto is not None else FormChoice(form, "explicit")
        self.pipe, self.capture = pipe, capture
        self.words, self.prompt_words, self.references = words, prompt_words, references
        check_token_range(prompt_words, words, embeds.shape[1])
        token_index, word_weights = tokens
        single = all(len(pw.positions[pw.index(w)]) == 1 for pw, ws in zip(prompt_words, words) for w in ws)
        rectangular = len({len(ws) for ws in words}) == 1 and all(ws for ws in words)
        # One token per word and no padding: the word weights are the identity, and no matmul is needed.
        self.tokens = (token_index, None if single and rectangular else word_weights)
        self.schedule = HostSchedule(pipe.scheduler, timesteps)
        latent_size = self.latent_size = tuple(latents.shape[-2:])
        self.layout = Layout.of(pipe.unet, capture.layers, latent_size)
        self.batch = latents.shape[0]
        self.custom = [[e for e in item if not has_terms(e)] for item in edits]
        planned = [[e for e in item if has_terms(e)] for item in edits]
        self.features = any(e.needs_features for item in edits for e in item) and capture.feature_module is not None
        feature_size = feature_grid(pipe.unet, capture.feature_layer, latent_size) if self.features else None
        self.row = {call: k for k, call in enumerate(guided_calls)}
        items = list(zip(planned, words, references, prompt_words))
        self.plan = EnergyPlan(
            items, self.layout, [self.schedule.timesteps[i] for i in guided_calls], guided_calls, capture.layers,
            feature_size, sharpness, device=latents.device,
            dtype=torch.promote_types(latents.dtype, torch.float32),  # the maps' dtype: fp32, fp64 for fp64
        )
        self.feature_size = feature_size

    # -- the energy ---------------------------------------------------------------------------------

    def energy(self, targets, weights, call=None):
        """The energy of what the capture recorded: the plan's (batched), plus user edits' own."""
        capture = self.capture
        features = capture.features
        if self.features and (features is None or tuple(features.shape[-2:]) != self.feature_size):
            got = None if features is None else tuple(features.shape[-2:])
            raise ValueError(f"the feature layer gave a {got} grid where {self.feature_size} was expected")
        maps = capture.stacked_maps()
        energy = self.plan.energy(maps, features, targets, weights)
        if any(self.custom):
            energy = energy + self._custom_energy(maps, features, call)
        return energy

    def _custom_energy(self, maps, features, call):
        t = self.schedule.timesteps[call]
        total = 0.0
        for b, item in enumerate(self.custom):
            layer_maps = {name: self.layout.unpad(maps[i, b], i) for i, name in enumerate(self.capture.layers)}
            view = View(self.words[b] or self.prompt_words[b].words[:1], layer_maps, None if features is None else features[b])
            reference = self.references[b].view(t, call=call) if self.references[b] is not None else None
            for edit in item:
                total = total + edit.energy(view.subset(edit.needed_words(self.prompt_words[b])), reference, t)
        return total

    # -- the evaluation -----------------------------------------------------------------------------

    def _record(self, rows, stop=False):
        return self.capture.record(*self.tokens, self.latent_size, batch_slice=rows,
                                   features=self.features, stop=stop, layout=self.layout, tokens_checked=True)

    def evaluate(self, latent_in, t, embeds, unet_kwargs, targets, weights, input_scale, term_scale, *,
                 guidance_scale, do_cfg, guidance_rescale, normalize, call=None):
        """(noise with the guidance term, energy, finite) of one guided step, all device tensors.
        `latent_in`: the scheduler's scaled latents; `input_scale`: d latent_in / d latents;
        `term_scale`: v * sigma_t in the model's prediction type (numbers or 0-dim tensors)."""
        unet = self.pipe.unet
        batch = latent_in.shape[0]
        x = latent_in.detach().requires_grad_(True)
        loss_scale = FP16_LOSS_SCALE if x.dtype == torch.float16 else 1.0
        uncond = None
        with torch.enable_grad():
            if self.form == "batched" and do_cfg:
                both = torch.cat([latent_in.detach(), x])
                with self._record(slice(batch, 2 * batch)):
                    noise = unet(both, t, encoder_hidden_states=embeds, return_dict=False, **unet_kwargs)[0]
                # Outside the recording: the fast path switched gradients off after the last captured layer.
                energy = self.energy(targets, weights, call)
                uncond, cond = noise.chunk(2)
            else:
                if do_cfg:
                    with torch.no_grad():
                        uncond = unet(latent_in, t, encoder_hidden_states=embeds.chunk(2)[0], return_dict=False,
                                      **_rows(unet_kwargs, slice(0, batch)))[0]
                cond_embeds = embeds.chunk(2)[1] if do_cfg else embeds
                with self._record(slice(None)):
                    cond = unet(x, t, encoder_hidden_states=cond_embeds, return_dict=False,
                                **_rows(unet_kwargs, slice(batch, None) if do_cfg else None))[0]
                energy = self.energy(targets, weights, call)
            # The maps are the energy's alone: dropped here, so that nothing with a gradient graph
            # outlives the evaluation (a compiled or graph-captured one returns its outputs only).
            self.capture.maps, self.capture.features = {}, None
            (grad,) = torch.autograd.grad(energy * loss_scale, x)
        grad = grad.float() * (input_scale / loss_scale)
        finite = torch.isfinite(grad).all()
        if normalize:
            grad = unit_rms(grad)
        noise = combine(uncond.detach() if uncond is not None else None, cond.detach(), guidance_scale, guidance_rescale)
        return noise + guidance_term(grad, term_scale).to(noise.dtype), energy.detach(), finite

    def resolve_form(self, latent_in, do_cfg, evaluate, graphs=None):
        """With "auto", the form of this call's guided steps, chosen (or measured) now, on this first
        guided step: `evaluate()` runs the step's evaluation in `self.form`, and its outputs are
        thrown away. Nothing else changes: the step then runs in the chosen form as it would directly."""
        if self.form != "auto":
            return self.choice

        def run(form):
            self.form = form
            evaluate()

        try:
            self.choice = self.auto.choose(self, latent_in, do_cfg, run, cuda_graph=graphs is not None)
        finally:
            self.form = "auto"
        self.form = self.choice.form
        if graphs is not None:
            graphs.drop_form(next(f for f in FORMS if f != self.form))  # the other form's graphs: memory only
        return self.choice

    def energy_only(self, latent_in, t, embeds, unet_kwargs, targets, weights, do_cfg, stop, call=None):
        """The energy of a conditional pass without gradients (v = 0), ending after the last captured
        layer where it may."""
        cond_embeds = embeds.chunk(2)[1] if do_cfg else embeds
        rows = slice(latent_in.shape[0], None) if do_cfg else None
        with torch.no_grad(), self._record(slice(None), stop=stop):
            try:
                self.pipe.unet(latent_in, t, encoder_hidden_states=cond_embeds, return_dict=False, **_rows(unet_kwargs, rows))
            except RecordingDone:
                pass
            return self.energy(targets, weights, call)


def _rows(unet_kwargs, rows):
    """The UNet's extra inputs for the batch rows `rows` of a CFG batch (all of them when None)."""
    if not unet_kwargs or rows is None:
        return unet_kwargs or {}
    out = dict(unet_kwargs)
    if out.get("timestep_cond") is not None:
        out["timestep_cond"] = out["timestep_cond"][rows]
    if out.get("added_cond_kwargs"):
        out["added_cond_kwargs"] = {
            k: [x[rows] for x in v] if isinstance(v, (list, tuple)) else v[rows] for k, v in out["added_cond_kwargs"].items()
        }
    return out
