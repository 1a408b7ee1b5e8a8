"""Self-guidance on MMDiT pipelines (SD3 / SD3.5, FLUX.1): `SelfGuidancePipeline.from_pipe` of a
StableDiffusion3Pipeline or FluxPipeline is a MMDiTSelfGuidancePipeline.

Sampling is diffusers' own `__call__`, with every argument as diffusers takes it; the wrapper only
looks in at three places for the length of a call: `prepare_latents` (the initial noise a trace
keeps), the transformer's forward (captured maps; on a guided step the conditional rows run with
gradients to the latents) and the scheduler's `step` (where the guidance term, in velocity units,
joins the prediction: sgfast.flow). Without edits the images are diffusers' own, bit for bit.
"""

import math
from contextlib import contextmanager, nullcontext

import torch

from sgfast.flow import can_guide_flow, flow_guidance_term, flow_sigma, renoise_flow
from sgfast.mmdit_capture import JointCapture, resolve_joint_layers
from sgfast.mmdit_families import call_arguments, mmdit_family_of
from sgfast.pipeline import SelfGuidanceOutput, SelfGuidancePipeline, is_photo_trace, recorded_arguments
from sgfast.repeats import SchedulerState, forget_corrector, fresh_noise, repeat_generators
from sgfast.capture import RecordingDone
from sgfast.sampler import FP16_LOSS_SCALE, energy_of, edit_selection, record_traces, resolve_schedule, unit_rms
from sgfast.settings import model_settings
from sgfast.step_form import FormChoice, check_guided_step
from sgfast.trace import Trace, selection

# A transformer call's arguments that hold one entry per batch row.
ROW_ARGUMENTS = ("hidden_states", "timestep", "encoder_hidden_states", "pooled_projections", "guidance")
# The arguments both families' __call__ have that a trace records under their own names (FLUX's
# guidance_scale is its guidance embedding); the families' own are their `recorded_arguments`.
RECORDED = ("height", "width", "num_inference_steps", "sigmas", "guidance_scale", "negative_prompt")


@contextmanager
def replaced(obj, name, value):
    """`obj.name` is `value` inside the block (an instance attribute), as before afterwards."""
    had, old = name in vars(obj), vars(obj).get(name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if had:
            setattr(obj, name, old)
        else:
            delattr(obj, name)


def _rows(kwargs, rows, total):
    return {k: (v[rows] if k in ROW_ARGUMENTS and torch.is_tensor(v) and v.ndim and v.shape[0] == total else v)
            for k, v in kwargs.items()}


class MMDiTSelfGuidancePipeline(SelfGuidancePipeline):
    """`mode="reference"`: word maps recomputed in plain PyTorch next to the captured blocks' attention, the
    full autograd graph of the conditional pass. `mode="fast"`: the fused joint-attention op
    (sgfast.kernels.joint_attention_stats, Triton on CUDA), the graph cut after the last captured block.
    `softmax`: "joint" (the maps' rows normalised over every key, image keys included) or "text"
    (renormalised over the text keys); see sgfast.mmdit_capture."""

    @staticmethod
    def wraps(pipe):
        return mmdit_family_of(pipe) is not None

    def __init__(self, pipe, layers=None, feature_layer=None, mode="reference", compile=False, settings=None,
                 softmax="joint", guided_step=None, cuda_graph=False, step_forms=None):
        self.family = mmdit_family_of(pipe)
        if self.family is None:
            raise TypeError(f"MMDiTSelfGuidancePipeline wraps StableDiffusion3Pipeline or FluxPipeline; got {type(pipe).__name__}")
        if mode not in ("reference", "fast"):
            raise ValueError(f"mode must be one of ('reference', 'fast'), got {mode!r}")
        if compile:
            raise ValueError(f"compile=True is not available for {self.family.name} pipelines yet")
        # The SD/SDXL wrapper's step forms and CUDA graphs (sgfast.guided, sgfast.graphs) drive a UNet
        # loop of their own; this wrapper runs diffusers' own __call__ with hooks.
        # "auto" is split here: the only form this wrapper has.
        if check_guided_step("auto" if guided_step is None else guided_step) == "batched":
            raise ValueError(f"guided_step={guided_step!r} is not available for {self.family.name} pipelines yet; "
                             "leave it out (or 'auto', or 'split')")
        self.guided_step, self.guided_step_choice = "split", None
        self._form_source = "explicit" if guided_step == "split" else "only form"
        if cuda_graph:
            raise ValueError(f"cuda_graph=True is not available for {self.family.name} pipelines yet; leave it out")
        self.pipe, self.mode = pipe, mode
        self.settings = model_settings(pipe, settings)
        transformer = pipe.transformer
        # from_pipe's layers, else the model's own (its file), else the family's default
        self.layers = self.settings.chosen_layers(layers, lambda names: resolve_joint_layers(transformer, names))
        if self.layers is None:
            self.layers = self.family.default_layers()
        if not self.layers:
            raise ValueError("layers names no joint-attention block; name at least one")
        self.feature_layer = feature_layer or self.settings.feature_layer or self.family.default_feature_layer(self.layers)
        if mode == "fast":
            # The fused op (Triton on CUDA), the graph cut after the last captured block, no weight gradients.
            self._capture = JointCapture(transformer, self.layers, self.feature_layer, softmax=softmax, impl="auto",
                                         cut_graph=True)
            transformer.requires_grad_(False)
        else:
            self._capture = JointCapture(transformer, self.layers, self.feature_layer, softmax=softmax)

    def words(self, prompt, max_sequence_length=None):
        return self._prompt_words(prompt, max_sequence_length).words

    def _prompt_words(self, prompt, max_sequence_length=None):
        if max_sequence_length is None:
            max_sequence_length = call_arguments(self.pipe, None, {})["max_sequence_length"]
        return self.family.prompt_words(prompt, max_sequence_length)

    @torch.no_grad()
    def trace_image(self, image, prompt, num_inference_steps=50, generator=None, noise=None, **kwargs):
        """Record a real image's properties as a source for edits (the paper's way): encode it with the
        VAE, noise it to each sigma of the flow schedule (x_s = (1 - s) x0 + s eps), run the conditional
        transformer and record every word's maps and appearance. `image`: PIL image, numpy array in
        [0, 1] or tensor in [-1, 1]; `kwargs`: further arguments of the pipeline's call (sigmas, mu,
        max_sequence_length, FLUX's guidance_scale embedding). The transformer runs through diffusers'
        own call (its prompt encoding, timesteps and ids), without CFG and with its latents replaced."""
        pipe = self.pipe
        device = pipe._execution_device
        pixels = pipe.image_processor.preprocess(image).to(device=device)
        if pixels.shape[0] != 1:
            raise ValueError("trace_image takes one image")
        height, width = pixels.shape[-2:]
        clean = self.family.encode_image(pixels)
        if noise is None:
            noise = torch.randn(clean.shape, generator=generator, dtype=clean.dtype, device="cpu").to(device)
        elif noise.shape != clean.shape:
            raise ValueError(f"noise must have the latents' shape {tuple(clean.shape)}, got {tuple(noise.shape)}")
        call = call_arguments(pipe, prompt, dict({self.family.cfg_argument: 1.0, **kwargs}, num_inference_steps=num_inference_steps,
                                                 height=height, width=width, output_type="latent", return_dict=False))
        if self.family.do_cfg(call):
            raise ValueError("trace_image records the conditional pass only: leave out the negative prompt and CFG")
        words = self._prompt_words(prompt, call["max_sequence_length"])
        trace = Trace(prompt, list(dict.fromkeys(words.words)), image_size=(height, width))
        run = _Run(self, call, self.family.grid(height, width), [words], [None])
        run.traces, run.image = [trace], (clean, noise)
        with self._capture:
            run.generate(call)
        return trace

    def invert(self, *args, **kwargs):
        raise NotImplementedError(f"invert is not available for {self.family.name} pipelines yet")

    @torch.no_grad()
    def __call__(self, prompt=None, edits=None, *, self_guidance_scale=None, normalize_gradient=None,
                 guidance_schedule=None, guidance_repeats=None, trace=None, record_trace=True, **kwargs):
        """Every argument of the wrapped pipeline's __call__, with its defaults, plus the edits and the
        guidance settings as for Stable Diffusion.

        With `trace=`, every argument of the call the trace was recorded with that this call leaves out
        (or gives as None) is the trace's: the schedule (steps, sigmas), size, guidance scale, negative
        prompt and the family's own (SD3: the other negative prompts, max_sequence_length, skip-layer
        guidance, mu; FLUX: negative_prompt_2, true_cfg_scale, max_sequence_length)."""
        pipe, family = self.pipe, self.family
        call = call_arguments(pipe, prompt, self._with_recorded(trace, kwargs))
        # 1. Check everything before anything runs.
        self._check_count(call["num_images_per_prompt"])
        images_per_prompt = call["num_images_per_prompt"]
        prompts, batch = self._prompts(prompt, call["prompt_embeds"])
        prompts, prompt_words, edits = self._checked_edits(prompts, edits, batch, images_per_prompt,
                                                           call["max_sequence_length"])
        has_edits = any(edits)
        steps = call["num_inference_steps"] if call["sigmas"] is None else len(call["sigmas"])
        settings = self.settings.for_photo() if is_photo_trace(trace) else self.settings
        edits, (self_guidance_scale, normalize_gradient, guidance_schedule) = settings.resolve(
            edits, steps, self_guidance_scale, normalize_gradient, guidance_schedule
        )
        repeats = settings.repeats(edits, steps, guidance_repeats)
        if has_edits and max(repeats) > 1:
            family.check_repeats(call)
        self._check_guidance(self_guidance_scale, normalize_gradient)
        schedule = resolve_schedule(guidance_schedule, steps)
        if has_edits and not any(schedule):
            raise ValueError(
                f"the guidance schedule guides none of the {steps} steps, so the edits would do nothing; "
                "use more steps or a guidance_schedule that guides at least one"
            )
        needs_capture = has_edits or (record_trace and prompt_words is not None)
        if needs_capture and not has_edits and self._capture.foreign_processors():
            needs_capture = False  # the user's own processors run untouched; only a trace needs ours
        if has_edits:
            self._capture.check_processors()
        height, width = family.size(call)
        trace_settings = self._trace_settings(call, (height, width), batch)
        trace_settings = [s for s in trace_settings for _ in range(images_per_prompt)]
        # schedule=None: a refusal names the recorded setting itself (timesteps, not the argument that asked it).
        references = self._references(trace, prompts, trace_settings, None)
        if call["latents"] is None and references[0] is not None:
            call["latents"] = torch.cat([r.latents for r in references])
        if call["latents"] is not None and not torch.isfinite(call["latents"]).all():
            raise ValueError("latents contain NaN or infinite values")

        run = _Run(self, call, family.grid(height, width), prompt_words, trace_settings)
        needs_reference = any(e.needs_reference for item in edits for e in item)
        traces, energies = None, []
        with self._capture if needs_capture else nullcontext():
            if has_edits and needs_reference and references[0] is None:
                # The unedited generation, recorded as the edits' reference (no decoding, no callback).
                run.traces = []
                reference_call = dict(call, output_type="latent", return_dict=False, callback_on_step_end=None)
                run.generate(reference_call)
                references = run.traces
                call["latents"] = run.initial
            if references[0] is not None:
                traces, run.traces = references, None  # recorded already: nothing to record again
            elif not has_edits and needs_capture:
                run.traces = traces = []
            else:
                run.traces = None
            run.guide(edits if has_edits else None, references, schedule, self_guidance_scale, normalize_gradient, energies)
            run.repeats, run.repeat_generator = repeats, repeat_generators(call["generator"], pipe._execution_device)
            output = run.generate(call)
        if not call["return_dict"]:
            return output
        if traces is not None and len(traces) == 1:
            traces = traces[0]
        guided = has_edits and bool(energies) and self_guidance_scale != 0
        if guided:
            self.guided_step_choice = FormChoice("split", self._form_source)
        return SelfGuidanceOutput(images=output.images, trace=traces, energies=energies if has_edits else None,
                                  guided_step="split" if guided else None)

    def _with_recorded(self, trace, kwargs):
        """`kwargs` with every argument the trace recorded that they leave out taken from the trace
        (sgfast.pipeline.recorded_arguments, as for SD and SDXL)."""
        names = self.family.recorded_arguments
        called = {name: kwargs.get(name) for name in RECORDED}
        given = {name: kwargs[name] for name in names if kwargs.get(name) is not None}
        called, given = recorded_arguments(trace, called, given, names, kwargs.get("negative_prompt_embeds") is not None,
                                           kwargs.get("num_images_per_prompt", 1))
        return {**kwargs, **{k: v for k, v in {**called, **given}.items() if v is not None}}

    def _checked_edits(self, prompts, edits, batch, images_per_prompt, max_sequence_length=None):
        edits = [item for item in self._edits_per_item(edits, batch) for _ in range(images_per_prompt)]
        if prompts is None:
            if any(edits):
                raise ValueError("edits name words of the prompt: pass `prompt` (its words) along with `prompt_embeds`")
            return None, None, edits
        prompts = [p for p in prompts for _ in range(images_per_prompt)]
        prompt_words = [self._prompt_words(p, max_sequence_length) for p in prompts]
        for item, words in zip(edits, prompt_words):
            for edit in item:
                edit.validate(words)
        return prompts, prompt_words, edits

    def _trace_settings(self, call, size, batch):
        negative = call["negative_prompt"]
        negatives = negative if isinstance(negative, (list, tuple)) else [negative] * batch
        common = dict(
            size=size, scheduler=type(self.pipe.scheduler).__name__, num_inference_steps=call["num_inference_steps"],
            sigmas=None if call["sigmas"] is None else tuple(float(s) for s in call["sigmas"]),
            guidance_scale=float(call["guidance_scale"]), **self.family.settings(call),
        )
        return [dict(common, negative_prompt=n) for n in negatives]


class _Run:
    """One wrapped call's hooks: the transformer forward, the scheduler step and prepare_latents."""

    def __init__(self, sg, call, grid, prompt_words, trace_settings):
        self.sg, self.pipe, self.family, self.capture = sg, sg.pipe, sg.family, sg._capture
        self.call, self.grid, self.prompt_words, self.trace_settings = call, grid, prompt_words, trace_settings
        self.traces, self.edits, self.initial = None, None, None
        self.energies = []
        self.image = None  # (clean latents, noise): trace_image's, noised to each step's sigma instead of the sampler's latents
        self.repeats, self.repeat_generator = None, None  # runs of each guided step (sgfast.repeats)
        self.restepped = None  # a repeated step's latents, which the scheduler's step then takes

    def guide(self, edits, references, schedule, scale, normalize, energies):
        self.edits, self.references, self.schedule = edits, references, schedule
        self.scale, self.normalize, self.energies = scale, normalize, energies
        if edits is not None:
            self.edit_words, self.edit_tokens = edit_selection(edits, self.prompt_words, self.pipe._execution_device)

    def generate(self, call):
        """diffusers' __call__ with the hooks in place."""
        pipe = self.pipe
        self.step, self.first_in_step, self.grad, self.new_traces = 0, True, None, self.traces == []
        if self.traces is not None and self.prompt_words is not None:
            self.trace_words = [list(dict.fromkeys(pw.words)) for pw in self.prompt_words]
            self.trace_tokens = selection(self.prompt_words, self.trace_words, pipe._execution_device)
        forward, step, prepare = pipe.transformer.forward, pipe.scheduler.step, pipe.prepare_latents
        self.unhooked_step = step
        with replaced(pipe.transformer, "forward", lambda *a, **k: self._forward(forward, *a, **k)), \
                replaced(pipe.scheduler, "step", lambda *a, **k: self._step(step, *a, **k)), \
                replaced(pipe, "prepare_latents", lambda *a, **k: self._prepare(prepare, *a, **k)):
            return pipe(**call)

    def _prepare(self, prepare, *args, **kwargs):
        out = prepare(*args, **kwargs)
        latents = out[0] if isinstance(out, tuple) else out
        self.initial = latents.clone()
        if self.new_traces:
            self.traces[:] = [
                Trace(w.prompt, list(dict.fromkeys(w.words)), latents=latents[b : b + 1].clone(), image_size=s["size"],
                      settings=s, schedule=self._schedule())
                for b, (w, s) in enumerate(zip(self.prompt_words, self.trace_settings))
            ]
        return out

    def _schedule(self):
        """How the call asked for its schedule: a call that takes the trace and leaves it out asks the same
        (the steps with the sigmas too: the trace's settings hold both)."""
        sigmas = self.call["sigmas"]
        steps = {"num_inference_steps": self.call["num_inference_steps"]}
        return steps if sigmas is None else dict(steps, sigmas=[float(s) for s in sigmas])

    def _timestep(self):
        return self.pipe.scheduler.timesteps[self.step]

    def _forward(self, forward, *args, **kwargs):
        first, self.first_in_step = self.first_in_step, False
        if args or self.family.is_side_call(kwargs, first) or (self.edits is None and not self.traces):
            return forward(*args, **kwargs)
        total = kwargs["hidden_states"].shape[0]
        rows = self.family.cond_rows(total, self.call)
        if self.image is not None:
            clean, noise = self.image
            sigma = flow_sigma(self.pipe.scheduler, self._timestep())
            kwargs = dict(kwargs, hidden_states=((1 - sigma) * clean + sigma * noise).to(kwargs["hidden_states"].dtype))
        guided = self.edits is not None and self.step < len(self.schedule) and self.schedule[self.step]
        if guided and can_guide_flow(flow_sigma(self.pipe.scheduler, self._timestep())):
            out = self._guided(forward, kwargs, rows, total)
            for _ in range(self._runs() - 1):
                kwargs = self._stepped_back(out, kwargs, rows, total)
                self.energies.pop()  # a step's energy is its last run's, the one it is stepped with
                out = self._guided(forward, kwargs, rows, total)
            return out
        if self.traces:
            with self.capture.record(*self.trace_tokens, self.grid, batch_slice=rows):
                out = forward(**kwargs)
                record_traces(self.traces, self.capture, self.trace_words, self._timestep())
            return out
        return forward(**kwargs)

    def _energy(self, forward, kwargs, stop):
        """The conditional pass with the edits' words recorded: (output or None, energy)."""
        items = [item for item in self.edits]
        features = any(e.needs_features for item in items for e in item)
        out = None
        with self.capture.record(*self.edit_tokens, self.grid, features=features, stop=stop):
            try:
                out = forward(**kwargs)
            except RecordingDone:
                pass
        energy = energy_of(items, self.capture, self.prompt_words, self.edit_words, self.references,
                           self._timestep(), self.step)
        return out, energy

    def _guided(self, forward, kwargs, rows, total):
        """A guided step's prediction: the conditional rows with gradients to the latents (their
        energy's gradient kept for the step), the others without."""
        cond_kwargs = _rows(kwargs, rows, total)
        if self.scale == 0:
            # No term: the prediction from the unedited call as it is, the energy from a pass of its own.
            out = forward(**kwargs)
            _, energy = self._energy(forward, cond_kwargs, stop=self.capture.can_stop_early)
            self.energies.append((self.step, float(energy)))
            return out
        others = None
        if rows != slice(0, total):
            others = forward(**_rows(kwargs, slice(0, rows.start), total))  # the negative prompt's rows
        z = cond_kwargs["hidden_states"].detach().requires_grad_(True)
        with torch.enable_grad():
            out, energy = self._energy(forward, dict(cond_kwargs, hidden_states=z), stop=False)
            loss_scale = FP16_LOSS_SCALE if z.dtype == torch.float16 else 1.0
            (grad,) = torch.autograd.grad(energy * loss_scale, z)
        grad = grad.float() / loss_scale
        if not torch.isfinite(grad).all():
            raise FloatingPointError(f"the self-guidance gradient is not finite at step {self.step}; lower the edit weights")
        self.grad = unit_rms(grad) if self.normalize else grad
        self.energies.append((self.step, float(energy.detach())))
        sample = out[0].detach()
        if others is not None:
            sample = torch.cat([others[0], sample])
        return (sample,) + tuple(out[1:])

    def _runs(self):
        """Runs of this step: its repeats (none at v = 0, nor on the last step: no next level)."""
        last = self.step >= len(self.pipe.scheduler.timesteps) - 1
        return 1 if self.repeats is None or self.scale == 0 or last else self.repeats[self.step]

    def _stepped_back(self, out, kwargs, rows, total):
        """The transformer's arguments to run this step again from (sgfast.repeats): the step taken
        on trial with the prediction diffusers would make of `out` (CFG, the guidance term), the
        noise it removed added back. The scheduler's step then takes these latents."""
        scheduler, call = self.pipe.scheduler, self.call
        prediction = self.family.combine(out[0], call)
        sigma = flow_sigma(scheduler, self._timestep())
        prediction = prediction + flow_guidance_term(sigma, self.grad, self.scale, normalized=self.normalize).to(prediction.dtype)
        latents = kwargs["hidden_states"][rows]
        saved = SchedulerState(scheduler)
        stepped = self.unhooked_step(prediction, self._timestep(), latents, return_dict=False)[0]
        ended = float(scheduler.sigmas[scheduler.step_index])
        saved.restore()
        forget_corrector(scheduler)
        restepped = renoise_flow(stepped, ended, sigma, fresh_noise(stepped, self.repeat_generator)).to(latents.dtype)
        self.restepped = restepped
        return dict(kwargs, hidden_states=torch.cat([restepped] * (total // restepped.shape[0])))

    def _step(self, step, model_output, timestep, sample, *args, **kwargs):
        if self.restepped is not None:
            sample, self.restepped = self.restepped.to(sample.dtype), None
        if self.grad is not None:
            sigma = flow_sigma(self.pipe.scheduler, timestep)
            term = flow_guidance_term(sigma, self.grad, self.scale, normalized=self.normalize)
            model_output = model_output + term.to(model_output.dtype)
            self.grad = None
        self.step += 1
        self.first_in_step = True
        return step(model_output, timestep, sample, *args, **kwargs)
