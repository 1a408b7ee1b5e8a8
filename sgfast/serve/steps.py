"""The denoising loop one step at a time, for many requests at once (iteration-level batching).

A `Run` is one request's generation in progress: its own scheduler, latents, step index and phase
(an unedited reference pass first when its edits need one and no trace is cached, then the main
pass). `unguided_step` advances every run at an unguided step with one UNet call (each row at its
own timestep: the UNet takes one per row; classifier-free guidance rows for the runs that use it,
and the unconditional rows of the runs at a guided step, which need no gradient either);
`guided_step` advances every run at a guided step with one guided pass (cond rows with the maps
recorded and the summed energy differentiated: one backward pass, each row its own gradient). Each run's
result is what `SelfGuidancePipeline` gives for it alone, up to float summation order: the same
arithmetic as `sgfast.sampler.denoise`, row by row.
"""

import copy

import torch

from sgfast.sampler import FP16_LOSS_SCALE, current_views, edit_selection, guidance_term, resolve_schedule, unit_rms
from sgfast.serve.jobs import seeded_latents
from sgfast.trace import PromptWords, Trace, selection


class Run:
    """One request in progress. `reference`: the cached unedited trace (or None: recorded first
    when its edits need it); `record`: whether to record this generation's own trace (plain requests,
    to seed the cache). `device`: the pipeline's execution device, when the caller knows it."""

    def __init__(self, sg, job, reference=None, device=None):
        pipe = sg.pipe
        spec = job.spec
        self.job, self.sg, self.pipe = job, sg, pipe
        self.device = device or pipe._execution_device
        self.words = PromptWords.from_tokenizer(pipe.tokenizer, spec.prompt)
        self.trace_words = list(dict.fromkeys(self.words.words))
        self.do_cfg = spec.guidance_scale > 1.0 and pipe.unet.config.time_cond_proj_dim is None
        with torch.no_grad():
            cond, uncond = pipe.encode_prompt([spec.prompt], self.device, 1, self.do_cfg, spec.negative_prompt)
        self.cond, self.uncond = cond, uncond
        self.scheduler = copy.deepcopy(pipe.scheduler)  # its own step state and timesteps
        self.extra = pipe.prepare_extra_step_kwargs(None, 0.0)
        self.noise = reference.latents if reference is not None else seeded_latents(pipe, [spec.seed], spec.height, spec.width, self.device)
        # The request's guidance settings where it gives them, else the model's (its self_guidance.json).
        edits, (self.scale, self.normalize, self.schedule) = sg.settings.resolve(
            [list(spec.edits)], job.plan.steps, spec.self_guidance_scale, spec.normalize_gradient,
            None if job.plan.schedule is None else list(job.plan.schedule),
        )
        self.edits = edits[0]
        self.reference = reference
        needs_reference = any(e.needs_reference for e in self.edits)
        self.phase = "reference" if needs_reference and reference is None else "main"
        self.steps_run = 0
        self.failed = False
        self.uncond_noise = (None, None, None)  # (phase, step, noise): this step's uncond rows, computed early
        self._start_phase()

    def _start_phase(self):
        plan = self.job.plan
        self.scheduler.set_timesteps(plan.steps, device=self.device)
        self.timesteps = self.scheduler.timesteps
        self.latents = (self.noise * self.scheduler.init_noise_sigma).to(self.device)
        self.i = 0
        main = self.phase == "main"
        self.guided = resolve_schedule(self.schedule, plan.steps) if main and self.edits else [False] * plan.steps
        recording = self.phase == "reference" or (main and not self.edits)
        height, width = self.job.spec.height, self.job.spec.width
        self.trace = Trace(self.job.spec.prompt, self.trace_words, latents=self.noise.clone(), image_size=(height, width)) if recording else None

    @property
    def t(self):
        return self.timesteps[self.i]

    @property
    def at_guided_step(self):
        return self.guided[self.i]

    @property
    def finished(self):
        return self.phase == "main" and self.i >= len(self.timesteps)

    def steps_left(self):
        """Steps still to run, the main pass's included when in the reference pass."""
        later = self.job.plan.steps if self.phase == "reference" else 0
        return len(self.timesteps) - self.i + later

    def guided_left(self):
        if self.phase == "reference":
            return self.job.plan.guided_steps
        return sum(self.guided[self.i :])

    @property
    def size(self):
        return (self.job.spec.height, self.job.spec.width)

    def advance(self, noise):
        """Apply this step's noise prediction; at the end of the reference pass, start the main one.
        Returns the finished reference trace when the reference pass has just ended, else None."""
        self.latents = self.scheduler.step(noise, self.t, self.latents, **self.extra, return_dict=False)[0]
        self.i += 1
        self.steps_run += 1
        if self.phase == "reference" and self.i >= len(self.timesteps):
            self.reference, self.phase = self.trace, "main"
            self._start_phase()
            return self.reference
        return None

    @torch.no_grad()
    def image(self):
        return self.sg.decode(self.latents, "pil")[0]


@torch.no_grad()
def decode(runs):
    """The images of finished runs of the same size, in one VAE call."""
    return runs[0].sg.decode(torch.cat([r.latents for r in runs]), "pil")


def _timestep_rows(runs):
    """One timestep per row of a call whose rows are `runs`, each at its own step."""
    return torch.stack([torch.as_tensor(r.t) for r in runs]).to(runs[0].device)


def _unet(pipe, latents, timesteps, embeds):
    return pipe.unet(latents, timesteps, encoder_hidden_states=embeds, return_dict=False)[0]


def _combine(run, uncond, cond):
    """Classifier-free guidance of one run's rows (diffusers' formula)."""
    if not run.do_cfg:
        return cond
    return uncond + run.job.spec.guidance_scale * (cond - uncond)


def _record(runs, capture):
    """Add this step's maps and appearance to each run's trace (the recorded rows, in run order)."""
    for run, view in zip(runs, current_views(capture, [r.trace_words for r in runs])):
        appearance = None
        if view.features is not None:
            appearance = torch.stack([view.appearance(w) for w in view.words])
        run.trace.add(run.t, {layer: m[: len(view.words)] for layer, m in view.maps.items()}, appearance)


@torch.no_grad()
def unguided_step(runs, capture, uncond_for=()):
    """One UNet call for every run in `runs` (the same size, each at an unguided step). Returns the
    reference traces finished by this step, as [(run, trace)]. `uncond_for`: runs at a guided step
    whose unconditional rows (no gradients either) ride in the same call: one call instead of two;
    `guided_step` takes them from `run.uncond`."""
    pipe = runs[0].pipe
    # Recording runs last: their cond rows are then one slice, and only they pay for the maps.
    recording = [r for r in runs if r.trace is not None]
    runs = [r for r in runs if r.trace is None] + recording
    extra = [r for r in uncond_for if r.do_cfg]
    cfg = extra + [r for r in runs if r.do_cfg]
    scaled = {id(r): r.scheduler.scale_model_input(r.latents, r.t) for r in extra + runs}
    latents = torch.cat([scaled[id(r)] for r in cfg + runs])
    embeds = torch.cat([r.uncond for r in cfg] + [r.cond for r in runs])
    timesteps = _timestep_rows(cfg + runs)
    if recording:
        tokens = selection([r.words for r in recording], [r.trace_words for r in recording], runs[0].device)
        rows = slice(len(cfg) + len(runs) - len(recording), None)
        with capture.record(*tokens, tuple(runs[0].latents.shape[-2:]), batch_slice=rows):
            noise = _unet(pipe, latents, timesteps, embeds)
            _record(recording, capture)
    else:
        noise = _unet(pipe, latents, timesteps, embeds)
    uncond_rows = dict(zip(map(id, cfg), noise[: len(cfg)]))
    for run in extra:
        run.uncond_noise = (run.phase, run.i, uncond_rows[id(run)][None])
    finished = []
    for k, run in enumerate(runs):
        cond = noise[len(cfg) + k : len(cfg) + k + 1]
        uncond = uncond_rows[id(run)][None] if run.do_cfg else None
        trace = run.advance(_combine(run, uncond, cond))
        if trace is not None:
            finished.append((run, trace))
    return finished


def _uncond_rows(runs):
    """{id(run): unconditional noise} of the CFG runs: those `unguided_step` computed for this very
    step, the others in one no-grad call."""
    have = {id(r): r.uncond_noise[2] for r in runs if r.do_cfg and r.uncond_noise[:2] == (r.phase, r.i)}
    missing = [r for r in runs if r.do_cfg and id(r) not in have]
    if missing:
        pipe = runs[0].pipe
        with torch.no_grad():
            scaled = torch.cat([r.scheduler.scale_model_input(r.latents, r.t) for r in missing])
            noise = _unet(pipe, scaled, _timestep_rows(missing), torch.cat([r.uncond for r in missing]))
        have.update((id(r), noise[k : k + 1]) for k, r in enumerate(missing))
    return have


def guided_step(runs, capture):
    """One guided pass for every run in `runs` (the same size, each at a guided step of its main
    pass): the uncond rows without gradients (or from `unguided_step`), the cond rows with the edits'
    words recorded and the summed energy differentiated with respect to each row's latents: each
    run's energy depends on its own row only, so the one backward pass gives each row its own
    gradient."""
    pipe = runs[0].pipe
    uncond_rows = _uncond_rows(runs)
    z = torch.cat([r.latents for r in runs]).detach().requires_grad_(True)
    words, tokens = edit_selection([r.edits for r in runs], [r.words for r in runs], runs[0].device)
    features = any(e.needs_features for r in runs for e in r.edits)
    with torch.enable_grad():
        scaled = torch.cat([r.scheduler.scale_model_input(z[k : k + 1], r.t) for k, r in enumerate(runs)])
        with capture.record(*tokens, tuple(z.shape[-2:]), features=features):
            cond = _unet(pipe, scaled, _timestep_rows(runs), torch.cat([r.cond for r in runs]))
        energy = _energy(runs, capture, words)
        loss_scale = FP16_LOSS_SCALE if z.dtype == torch.float16 else 1.0
        (grad,) = torch.autograd.grad(energy * loss_scale, z)
        grad = grad.float() / loss_scale
    cond = cond.detach()
    # Checked for every row before any advances: on an error the caller retries each run alone.
    for k, run in enumerate(runs):
        if not torch.isfinite(grad[k]).all():
            raise FloatingPointError(f"the self-guidance gradient is not finite at step {run.i}; lower the edit weights")
    for k, run in enumerate(runs):
        g = grad[k : k + 1]
        if run.normalize:
            g = unit_rms(g)
        u = uncond_rows[id(run)] if run.do_cfg else None
        noise = _combine(run, u, cond[k : k + 1])
        term = guidance_term(run.scheduler, run.i, run.t, g, run.scale, normalized=run.normalize)
        noise = noise + term.to(noise.dtype)
        run.advance(noise)


def _energy(runs, capture, words):
    """Sum over runs and their edits of each edit's energy at the run's own timestep."""
    total = 0.0
    for run, view in zip(runs, current_views(capture, words)):
        reference = run.reference.view(run.t) if run.reference is not None else None
        for edit in run.edits:
            total = total + edit.energy(view.subset(edit.needed_words(run.words)), reference, run.t)
    return total
