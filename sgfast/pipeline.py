"""SelfGuidancePipeline: a drop-in wrapper of a diffusers Stable Diffusion (1.x/2.x or XL) pipeline.

    sg = SelfGuidancePipeline.from_pipe(pipe)
    out = sg("a red circle and a blue square", edits=[move("circle", dx=0.25)], generator=g)
    out.images, out.trace

Calling it takes every argument of the wrapped pipeline's `__call__`, with diffusers' meaning, plus
`edits` and the guidance settings; what differs between the families (SD 1.x/2.x, SDXL) is in
`sgfast.families`. Every argument is checked before anything runs; the wrapped pipeline's
processors are restored whatever happens, and left alone when nothing is captured.
"""

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from diffusers.utils import BaseOutput

from sgfast.capture import Capture, resolve_layers, check_feature_layer
from sgfast.edits import Edit
from sgfast.families import family_of
from sgfast.graphs import StepGraphs
from sgfast.step_form import CHOICES, AutoForm, check_guided_step
from sgfast.invert import edit_arguments
from sgfast.repeats import noise_generators, repeat_generators
from sgfast.sampler import denoise, record_traces, resolve_schedule
from sgfast.settings import model_settings
from sgfast.trace import PromptWords, Trace, selection


@dataclass
class SelfGuidanceOutput(BaseOutput):
    """`images` as diffusers returns them; `trace` the recorded properties of each prompt (a Trace
    for one prompt, a list for several): pass it back as `trace=` to edit the same image again
    without repeating the unedited pass."""

    images: object
    trace: object = None
    energies: list = None  # (step index, total energy) at each guided step
    guided_step: str = None  # the form the guided steps ran in ("split" or "batched"), None without one
    nsfw_content_detected: object = None  # as diffusers: one flag per image, None without a safety checker


MODES = ("reference", "fast")


class SelfGuidancePipeline:
    """`mode="reference"`: attention maps recomputed in plain PyTorch, the full autograd graph of the
    conditional pass. `mode="fast"`: the fused attention-statistics op (Triton on CUDA), the graph
    cut after the last captured layer, no weight gradients. Both take the same edits and agree.

    `guided_step`: "split" (the unconditional and the conditional pass at batch 1 each), "batched"
    (one batch-2 pass, the gradient to its conditional half) or "auto" (the faster of the two on this
    machine and shape, measured once and kept: sgfast.step_form); the default is "auto" in fast mode
    and "split" in reference mode. `step_forms`: the sgfast.step_form.StepFormChooser "auto" asks
    (default: the process's own, its choices in `sgfast.step_form.cache_path()`). `cuda_graph=True`
    (fast mode, CUDA): each guided step's model evaluation replays a CUDA graph captured once per
    shape and edits (sgfast.graphs)."""

    def __new__(cls, pipe=None, *args, **kwargs):
        # A family with a wrapper of its own (SD3, FLUX: sgfast.mmdit_pipeline) gets that wrapper.
        for wrapper in cls.__subclasses__():
            if getattr(wrapper, "wraps", None) is not None and wrapper.wraps(pipe):
                return super().__new__(wrapper)
        return super().__new__(cls)

    def __init__(self, pipe, layers=None, feature_layer=None, mode="reference", compile=False, settings=None,
                 guided_step=None, cuda_graph=False, step_forms=None):
        self.family = family_of(pipe)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if guided_step is None:
            guided_step = "auto" if mode == "fast" else "split"
        self.guided_step = check_guided_step(guided_step, CHOICES)
        self._form = AutoForm(step_forms, compiled=bool(compile)) if guided_step == "auto" else guided_step
        self.guided_step_choice = None  # the last call's FormChoice (form, where it came from, timings)
        # CUDA graphs of the guided evaluation: checked here, so that a refusal comes before anything runs.
        self._graphs = StepGraphs.for_pipeline(pipe, mode, compile) if cuda_graph else None
        self.pipe = pipe
        self.mode = mode
        # The model's guidance defaults (its folder's self_guidance.json; sgfast.settings).
        self.settings = model_settings(pipe, settings)
        self.layers = self.settings.chosen_layers(layers, lambda names: resolve_layers(pipe.unet, names))
        if self.layers is None:
            self.layers = self.family.default_layers()
        if not self.layers:
            raise ValueError("layers names no cross-attention layer; name at least one")
        self.feature_layer = feature_layer or self.settings.feature_layer or self.family.default_feature_layer(self.layers)
        check_feature_layer(pipe.unet, self.feature_layer)
        # One capture for the pipeline's life: the same processor objects every call, so a compiled
        # UNet's guards hold and it is not recompiled per call.
        if mode == "fast":
            self._capture = Capture(pipe.unet, self.layers, self.feature_layer, impl="auto", cut_graph=True)
            pipe.unet.requires_grad_(False)  # guidance needs gradients to the latents only
        else:
            self._capture = Capture(pipe.unet, self.layers, self.feature_layer, impl="torch")
        if compile:
            if mode != "fast":
                raise ValueError("compile=True needs mode='fast'")
            # The UNet forward is compiled, captured maps included; autograd.grad runs outside it.
            # `compile` may name a torch.compile backend ("inductor" for True).
            backend = "inductor" if compile is True else compile
            pipe.unet.forward = torch.compile(pipe.unet.forward, backend=backend)
            self._capture.can_stop_early = False  # no exception out of the compiled graph

    @classmethod
    def from_pipe(cls, pipe, **kwargs):
        return cls(pipe, **kwargs)

    def words(self, prompt):
        """The words of `prompt` as edits name them."""
        return PromptWords.from_tokenizer(self.family.tokenizer, prompt).words

    def capture(self):
        return self._capture

    @torch.no_grad()
    def __call__(
        self,
        prompt=None,
        edits=None,
        *,
        height=None,
        width=None,
        num_inference_steps=None,
        timesteps=None,
        sigmas=None,
        guidance_scale=None,
        negative_prompt=None,
        num_images_per_prompt=1,
        eta=None,
        generator=None,
        latents=None,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        ip_adapter_image=None,
        ip_adapter_image_embeds=None,
        output_type="pil",
        return_dict=True,
        cross_attention_kwargs=None,
        guidance_rescale=None,
        clip_skip=None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs=("latents",),
        self_guidance_scale=None,
        normalize_gradient=None,
        guidance_schedule=None,
        guidance_repeats=None,
        trace=None,
        record_trace=True,
        **family_arguments,
    ):
        """`family_arguments`: the wrapped pipeline's own (SDXL: prompt_2, negative_prompt_2,
        pooled_prompt_embeds, negative_pooled_prompt_embeds, original_size, crops_coords_top_left,
        target_size, their negative_ counterparts and denoising_end).

        With `trace=`, every argument of the call the trace was recorded with that this call leaves out
        (None) is the trace's: the schedule (steps, timesteps or sigmas), size, guidance scale and
        rescale, eta, negative prompt and the family's own; for a photo's trace (`sg.invert`) also its
        strength's guidance schedule. Without one they are diffusers' defaults.

        `guidance_repeats`: how many times each guided step runs, re-noised back to its own noise
        level in between (sgfast.repeats): an int, one int per step, or None for the model's settings."""
        pipe, family = self.pipe, self.family
        # 0. A call with a trace repeats the trace's call, for every argument it leaves out.
        called = dict(height=height, width=width, num_inference_steps=num_inference_steps, timesteps=timesteps, sigmas=sigmas,
                      guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, eta=eta, negative_prompt=negative_prompt)
        called, family_arguments = recorded_arguments(
            trace, called, family_arguments, family.call_arguments, negative_prompt_embeds is not None, num_images_per_prompt
        )
        height, width, num_inference_steps, timesteps, sigmas, guidance_scale, guidance_rescale, eta, negative_prompt = called.values()
        num_inference_steps = 50 if num_inference_steps is None else num_inference_steps  # diffusers' defaults
        eta = 0.0 if eta is None else eta
        guidance_rescale = 0.0 if guidance_rescale is None else guidance_rescale
        # 1. Check everything before anything runs.
        extra = family.check_arguments(family_arguments)
        guidance_scale = family.guidance_scale if guidance_scale is None else guidance_scale  # 7.5 SD, 5.0 SDXL
        height, width = family.size(height, width)
        if hasattr(callback_on_step_end, "tensor_inputs"):  # PipelineCallback / MultiPipelineCallbacks
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        callback_on_step_end_tensor_inputs = list(callback_on_step_end_tensor_inputs)
        if isinstance(negative_prompt, str) and isinstance(prompt, (list, tuple)):
            negative_prompt = [negative_prompt] * len(prompt)  # one negative prompt for every prompt
        family.check_inputs(
            None if prompt_embeds is not None else prompt, height, width, negative_prompt, prompt_embeds,
            negative_prompt_embeds, ip_adapter_image, ip_adapter_image_embeds, callback_on_step_end_tensor_inputs, extra,
        )
        self._check_count(num_images_per_prompt)
        images_per_prompt = num_images_per_prompt
        prompts, batch = self._prompts(prompt, prompt_embeds)
        prompts, prompt_words, edits = self._checked_edits(prompts, edits, batch, images_per_prompt)
        has_edits = any(edits)
        needs_capture = has_edits or (record_trace and prompt_words is not None)
        if needs_capture and not has_edits and self._capture.foreign_processors():
            # The user's own processors (IP-Adapter, ...) run untouched; only a trace needs ours.
            needs_capture = False
        if has_edits:
            self._capture.check_processors()
        device = pipe._execution_device
        timesteps, num_inference_steps, reset = self._timesteps(num_inference_steps, timesteps, sigmas, device)
        timesteps, num_inference_steps = family.cut_timesteps(timesteps, num_inference_steps, extra)
        # Arguments left None take the model's settings (else the paper's defaults).
        # An edit of an inverted photo runs without CFG: the model's photo settings, where it has them,
        # and, unless the call says otherwise, its strength's schedule (sgfast.invert.edit_arguments).
        settings = self.settings.for_photo() if is_photo_trace(trace) else self.settings
        photo = next((t for t in traces_of(trace) if t.inversion is not None), None)
        if guidance_schedule is None and photo is not None and schedule_arguments(reset) == photo_schedule(photo):
            guidance_schedule = edit_arguments(photo, edits=edits[0])["guidance_schedule"]
        edits, (self_guidance_scale, normalize_gradient, guidance_schedule) = settings.resolve(
            edits, num_inference_steps, self_guidance_scale, normalize_gradient, guidance_schedule
        )
        repeats = settings.repeats(edits, num_inference_steps, guidance_repeats)
        self._check_guidance(self_guidance_scale, normalize_gradient)
        schedule = resolve_schedule(guidance_schedule, num_inference_steps)
        if has_edits and not any(schedule):
            raise ValueError(
                f"the guidance schedule guides none of the {num_inference_steps} steps, so the edits would do nothing; "
                "use more steps or a guidance_schedule that guides at least one"
            )
        trace_settings = self._settings(height, width, timesteps, guidance_scale, guidance_rescale, eta, negative_prompt, batch)
        trace_settings = [{**s, **family.settings(extra)} for s in trace_settings for _ in range(images_per_prompt)]  # one per image
        references = self._references(trace, prompts, trace_settings, schedule_arguments(reset))
        if latents is None and references[0] is not None:
            latents = torch.cat([r.latents for r in references])
        if latents is not None and not torch.isfinite(latents).all():
            raise ValueError("latents contain NaN or infinite values")

        # 2. Encode, prepare latents and the UNet's extra inputs, as diffusers does.
        pipe._guidance_scale, pipe._guidance_rescale, pipe._clip_skip = guidance_scale, guidance_rescale, clip_skip
        pipe._cross_attention_kwargs, pipe._interrupt, pipe._num_timesteps = cross_attention_kwargs, False, len(timesteps)
        do_cfg = guidance_scale > 1.0 and pipe.unet.config.time_cond_proj_dim is None
        rows = batch * images_per_prompt
        cond, uncond, added = family.encode(
            prompt if prompt_embeds is None else None, device, images_per_prompt, do_cfg, negative_prompt, prompt_embeds,
            negative_prompt_embeds, (cross_attention_kwargs or {}).get("scale"), clip_skip, (height, width), rows, extra,
        )
        embeds = torch.cat([uncond, cond]) if do_cfg else cond
        latents = pipe.prepare_latents(
            rows, pipe.unet.config.in_channels, height, width, cond.dtype, device, generator, latents
        )
        unet_kwargs = self._unet_kwargs(
            ip_adapter_image, ip_adapter_image_embeds, cross_attention_kwargs, guidance_scale, rows, do_cfg, device,
            latents.dtype, added,
        )
        extra_step_kwargs = pipe.prepare_extra_step_kwargs(generator, eta)
        # Where the scheduler's step noise starts: an edit of a traced generation replays it.
        noise_state = save_noise_state(generator, device)
        if references[0] is not None and references[0].noise_state is not None and "generator" in extra_step_kwargs:
            extra_step_kwargs["generator"] = replay_generators(references[0].noise_state)
        initial = latents.clone()
        loop = dict(
            prompt_words=prompt_words, extra_step_kwargs=extra_step_kwargs, num_inference_steps=num_inference_steps,
            unet_kwargs=unet_kwargs, guidance_rescale=guidance_rescale,
        )

        # 3. The unedited pass where edits need it and no trace was given, then the call's own pass.
        needs_reference = any(e.needs_reference for item in edits for e in item)
        traces, energies, forms_used = None, [], []
        with self.capture() if needs_capture else nullcontext() as capture:
            if has_edits and needs_reference and references[0] is None:
                references = self._new_traces(prompts, prompt_words, initial, trace_settings, noise_state, reset)
                denoise(pipe, initial.clone(), timesteps, embeds, guidance_scale, capture=capture, traces=references, **loop)
                pipe.scheduler.set_timesteps(**reset)  # a fresh scheduler state for the edited pass
                restore_noise_state(generator, device, noise_state)  # the edited pass draws the same step noise
            if references[0] is not None:
                traces = references
            elif not has_edits and needs_capture:
                traces = self._new_traces(prompts, prompt_words, initial, trace_settings, noise_state, reset)
            latents = denoise(
                pipe,
                latents,
                timesteps,
                embeds,
                guidance_scale,
                capture=capture,
                edits=edits if has_edits else None,
                references=references,
                traces=traces if not has_edits and traces is not references else None,
                schedule=schedule,
                self_guidance_scale=self_guidance_scale,
                normalize_gradient=normalize_gradient,
                energies=energies,
                callback=callback_on_step_end,
                callback_inputs=callback_on_step_end_tensor_inputs,
                negative_embeds=uncond,
                guided_form=self._form,
                graphs=self._graphs,
                forms_used=forms_used,
                repeats=repeats,
                repeat_generator=repeat_generators(generator, device),
                **loop,
            )
        if forms_used:
            self.guided_step_choice = forms_used[-1]

        # 4. Decode and check the images as diffusers does.
        images, nsfw = self._decode_checked(latents, output_type, generator, device, embeds.dtype)
        pipe.maybe_free_model_hooks()
        if not return_dict:
            return images, nsfw
        if traces is not None and len(traces) == 1:
            traces = traces[0]
        return SelfGuidanceOutput(
            images=images, nsfw_content_detected=nsfw, trace=traces, energies=energies if has_edits else None,
            guided_step=forms_used[-1].form if forms_used else None,
        )

    @staticmethod
    def _check_count(num_images_per_prompt):
        if not (isinstance(num_images_per_prompt, int) and not isinstance(num_images_per_prompt, bool) and num_images_per_prompt >= 1):
            raise ValueError(f"num_images_per_prompt must be an integer >= 1, got {num_images_per_prompt!r}")

    def _checked_edits(self, prompts, edits, batch, images_per_prompt):
        """(prompts, their PromptWords, edits), one per image; every edit checked against its prompt."""
        edits = [item for item in self._edits_per_item(edits, batch) for _ in range(images_per_prompt)]
        if prompts is None:
            if any(edits):
                raise ValueError("edits name words of the prompt: pass `prompt` (its words) along with `prompt_embeds`")
            return None, None, edits
        prompts = [p for p in prompts for _ in range(images_per_prompt)]
        prompt_words = [PromptWords.from_tokenizer(self.family.tokenizer, p) for p in prompts]
        for item, words in zip(edits, prompt_words):
            for edit in item:
                edit.validate(words)
        return prompts, prompt_words, edits

    @staticmethod
    def _check_guidance(self_guidance_scale, normalize_gradient):
        if not (isinstance(self_guidance_scale, (int, float)) and math.isfinite(self_guidance_scale)):
            raise ValueError(f"self_guidance_scale must be a finite number, got {self_guidance_scale!r}")
        if not isinstance(normalize_gradient, bool):
            raise ValueError(f"normalize_gradient must be True or False, got {normalize_gradient!r}")

    @staticmethod
    def _prompts(prompt, prompt_embeds):
        """(prompts whose words edits and traces use, or None, batch size)."""
        if prompt is None:
            return None, prompt_embeds.shape[0]
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if prompt_embeds is not None and len(prompts) != prompt_embeds.shape[0]:
            raise ValueError(f"got {len(prompts)} prompts for {prompt_embeds.shape[0]} rows of prompt_embeds")
        return prompts, len(prompts)

    def _timesteps(self, num_inference_steps, timesteps, sigmas, device):
        """diffusers' retrieve_timesteps (the scheduler's own, or custom `timesteps` / `sigmas`), and
        the set_timesteps arguments that set the same schedule again."""
        reset = dict(num_inference_steps=num_inference_steps, device=device)
        if timesteps is not None:
            reset = dict(timesteps=timesteps, device=device)
        elif sigmas is not None:
            reset = dict(sigmas=sigmas, device=device)
        timesteps, num_inference_steps = retrieve_timesteps(self.pipe.scheduler, num_inference_steps, device, timesteps, sigmas)
        return timesteps, num_inference_steps, reset

    def _unet_kwargs(self, ip_image, ip_embeds, cross_attention_kwargs, guidance_scale, rows, do_cfg, device, dtype,
                     added):
        """The UNet's inputs besides latents, timestep and text, as diffusers builds them; `added`: the
        family's added conditioning (SDXL's pooled text and time ids), one row per CFG batch row."""
        pipe = self.pipe
        kwargs = {}
        if cross_attention_kwargs is not None:
            kwargs["cross_attention_kwargs"] = cross_attention_kwargs
        added = dict(added)
        if ip_image is not None or ip_embeds is not None:
            added["image_embeds"] = pipe.prepare_ip_adapter_image_embeds(ip_image, ip_embeds, device, rows, do_cfg)
        if added:
            kwargs["added_cond_kwargs"] = added
        if pipe.unet.config.time_cond_proj_dim is not None:
            # Guidance-embedded UNets (LCM): the guidance scale enters as an embedding, not as CFG.
            scale = torch.tensor(guidance_scale - 1).repeat(rows)
            kwargs["timestep_cond"] = pipe.get_guidance_scale_embedding(
                scale, embedding_dim=pipe.unet.config.time_cond_proj_dim
            ).to(device=device, dtype=dtype)
        return kwargs

    def _settings(self, height, width, timesteps, guidance_scale, guidance_rescale, eta, negative_prompt, batch):
        """What a trace must share with an edit that takes it as its unedited reference, per prompt."""
        negatives = negative_prompt if isinstance(negative_prompt, (list, tuple)) else [negative_prompt] * batch
        return [
            dict(
                size=(height, width),
                scheduler=type(self.pipe.scheduler).__name__,
                timesteps=tuple(float(t) for t in (timesteps.tolist() if torch.is_tensor(timesteps) else timesteps)),
                guidance_scale=float(guidance_scale),
                guidance_rescale=float(guidance_rescale),
                eta=float(eta),
                negative_prompt=n,
            )
            for n in negatives
        ]

    def _decode_checked(self, latents, output_type, generator, device, dtype):
        """diffusers' decode, safety check (when the pipeline has a checker) and post-processing."""
        pipe = self.pipe
        if output_type == "latent":
            return latents, None
        image = self.family.decode(latents, generator)
        image, nsfw = self.family.check_images(image, device, dtype)
        denormalize = [True] * image.shape[0] if nsfw is None else [not flagged for flagged in nsfw]
        return pipe.image_processor.postprocess(image, output_type=output_type, do_denormalize=denormalize), nsfw

    def decode(self, latents, output_type="pil", generator=None):
        if output_type == "latent":
            return latents
        image = self.family.decode(latents, generator)
        return self.pipe.image_processor.postprocess(image, output_type=output_type, do_denormalize=[True] * len(image))

    @torch.no_grad()
    def trace_image(self, image, prompt, num_inference_steps=50, generator=None, noise=None):
        """Record a real image's properties as a source for edits (the paper's way): encode it with the
        VAE, noise it to each timestep of the schedule, run the conditional UNet and record every
        word's maps and appearance. `image`: PIL image, numpy array in [0, 1] or tensor in [-1, 1]."""
        pipe = self.pipe
        device = pipe._execution_device
        pixels = pipe.image_processor.preprocess(image).to(device=device)
        if pixels.shape[0] != 1:
            raise ValueError("trace_image takes one image")
        clean = self.family.encode_image(pixels)
        if noise is None:
            noise = torch.randn(clean.shape, generator=generator, dtype=clean.dtype, device="cpu").to(device)
        words = PromptWords.from_tokenizer(self.family.tokenizer, prompt)
        cond, added = self.family.image_conditioning(prompt, device, tuple(pixels.shape[-2:]))
        pipe.scheduler.set_timesteps(num_inference_steps, device=device)
        alphas = pipe.scheduler.alphas_cumprod.to(device)
        trace = Trace(prompt, list(dict.fromkeys(words.words)), image_size=tuple(pixels.shape[-2:]))
        tokens = selection([words], [trace.words], device)
        with self.capture() as capture:
            for t in pipe.progress_bar(pipe.scheduler.timesteps):
                # The UNet sees variance-preserving latents whatever the scheduler: noise them directly.
                alpha_bar = alphas[int(t)]
                noisy = alpha_bar.sqrt() * clean + (1 - alpha_bar).sqrt() * noise
                with capture.record(*tokens, tuple(clean.shape[-2:])):
                    pipe.unet(noisy, t, encoder_hidden_states=cond, return_dict=False,
                              **({"added_cond_kwargs": added} if added else {}))
                    record_traces([trace], capture, [trace.words], t)
        return trace

    def invert(self, image, prompt, **kwargs):
        """DDIM inversion of a photo: its Trace, whose latents regenerate it (`sgfast.invert.invert`)."""
        from sgfast.invert import invert

        return invert(self, image, prompt, **kwargs)

    @staticmethod
    def _edits_per_item(edits, batch):
        """`edits` is None, a list of edits for every prompt, or one list per prompt."""
        if edits is None:
            return [[] for _ in range(batch)]
        if isinstance(edits, Edit):
            edits = [edits]
        edits = list(edits)
        if edits and all(isinstance(e, (list, tuple)) for e in edits):
            if len(edits) != batch:
                raise ValueError(f"got {len(edits)} lists of edits for {batch} prompts")
            per_item = [list(e) for e in edits]
        else:
            per_item = [edits for _ in range(batch)]
        for item in per_item:
            for edit in item:
                if not isinstance(edit, Edit):
                    raise TypeError(f"edits must be sgfast.edits objects (move, resize, ...); got {edit!r}")
        return per_item

    @staticmethod
    def _references(trace, prompts, settings, schedule):
        rows = len(settings)
        if trace is None:
            return [None] * rows
        traces = traces_of(trace)
        if len(traces) != rows:
            raise ValueError(f"got {len(traces)} traces for {rows} images")
        if prompts is None:
            raise ValueError("a trace is the unedited generation of a prompt: pass `prompt` (its words) along with `prompt_embeds`")
        for t, p, wanted in zip(traces, prompts, settings):
            if t.prompt != p or t.latents is None:
                raise ValueError(
                    f"the trace of {t.prompt!r} is not the unedited generation of {p!r}; use it as an edit's source instead"
                )
            differ = [k for k in wanted if t.settings is not None and t.settings.get(k) != wanted[k]]
            if differ:
                raise ValueError(
                    "the trace was recorded with other settings than this call: "
                    + "; ".join(difference(k, t.settings.get(k), wanted[k], t.schedule, schedule) for k in differ)
                    + ". Leave them out (a call with a trace takes the trace's), or use it as an edit's source instead"
                )
        return traces

    def _new_traces(self, prompts, prompt_words, initial, settings, noise_state, reset):
        # Keep the noise as `latents=` takes it: prepare_latents scales by init_noise_sigma again.
        noise = initial / self.pipe.scheduler.init_noise_sigma
        return [
            Trace(
                p, list(dict.fromkeys(w.words)), latents=noise[b : b + 1].clone(), image_size=settings[b]["size"],
                noise_state=noise_state, settings=settings[b], schedule=schedule_arguments(reset),
            )
            for b, (p, w) in enumerate(zip(prompts, prompt_words))
        ]


def save_noise_state(generator, device):
    """[(device, state)] of the generators the step noise comes from."""
    return [(g.device, g.get_state()) for g in noise_generators(generator, device)]


def restore_noise_state(generator, device, saved):
    for g, (_, state) in zip(noise_generators(generator, device), saved):
        g.set_state(state)


def replay_generators(saved):
    """Fresh generators in the saved states (the caller's own are left alone)."""
    generators = [torch.Generator(device=d).set_state(state) for d, state in saved]
    return generators[0] if len(generators) == 1 else generators


def traces_of(trace):
    """`trace` (None, a Trace, or a list of them: one per image) as a list; anything else is an error."""
    traces = [] if trace is None else [trace] if isinstance(trace, Trace) else trace
    allowed = "trace must be a Trace (a call's .trace, or sg.invert's) or a list of them"
    if not isinstance(traces, (list, tuple)):
        raise TypeError(f"{allowed}, got a {type(trace).__name__}")
    for t in traces:
        if not isinstance(t, Trace):
            raise TypeError(f"{allowed}, got a {type(traces).__name__} holding a {type(t).__name__}")
    return list(traces)


def is_photo_trace(trace):
    """Whether `trace` (a Trace, a list of them, or None) comes from `sg.invert`."""
    return any(t.inversion is not None for t in traces_of(trace))


def photo_schedule(trace):
    """The schedule arguments a photo's trace was inverted with (its edits' strength schedule fits them)."""
    return {"num_inference_steps": trace.inversion["arguments"]["num_inference_steps"]}


def schedule_arguments(reset):
    """How a call asked for its schedule: {"num_inference_steps": n}, {"timesteps": [...]} or
    {"sigmas": [...]} (`_timesteps`' reset arguments without the device)."""
    return {k: (list(v) if k != "num_inference_steps" else v) for k, v in reset.items() if k != "device"}


# The call arguments a trace's settings record under their own names (besides size, timesteps, negative_prompt).
RECORDED_AS_GIVEN = ("guidance_scale", "guidance_rescale", "eta")


def recorded_arguments(trace, called, family_arguments, family_names, has_negative_embeds, images_per_prompt):
    """(call arguments, family arguments) with those left None taken from the traces' recorded call
    (one trace per image); a trace that recorded no call (a real image's, a server's) or traces that
    disagree supply nothing for that argument (the reference checks refuse what does not fit), but
    the negative prompt, which may be one per prompt. `called` holds the arguments of this list the
    wrapped pipeline has (SD3 and FLUX have no timesteps, guidance_rescale or eta); `family_arguments`
    those of `family_names` the call gave."""
    traces = traces_of(trace)
    if not traces or any(t.settings is None for t in traces):
        return called, family_arguments
    called = dict(called)

    def shared(value_of):
        values = [value_of(t) for t in traces]
        return values[0] if all(v == values[0] for v in values) else None

    def left_out(key):
        return key in called and called[key] is None

    size = shared(lambda t: tuple(t.settings.get("size") or (None, None)))
    for side, value in zip(("height", "width"), size or (None, None)):
        if left_out(side):
            called[side] = value
    schedule = shared(lambda t: t.schedule)
    if schedule and all(called.get(k) is None for k in ("num_inference_steps", "timesteps", "sigmas")):
        called.update(schedule)
    for key in RECORDED_AS_GIVEN:
        if left_out(key):
            called[key] = shared(lambda t: t.settings.get(key))
    # The negative prompt: one for every prompt, or each prompt's own (its images' traces agree).
    n = images_per_prompt if isinstance(images_per_prompt, int) and images_per_prompt >= 1 else 1
    negatives = [t.settings.get("negative_prompt") for t in traces]
    per_prompt = negatives[::n]
    if left_out("negative_prompt") and not has_negative_embeds and negatives == [v for v in per_prompt for _ in range(n)]:
        called["negative_prompt"] = per_prompt if any(v != per_prompt[0] for v in per_prompt) else per_prompt[0]
    family_arguments = dict(family_arguments)
    for key in family_names:
        if key not in family_arguments and shared(lambda t: t.settings.get(key)) is not None:
            family_arguments[key] = shared(lambda t: t.settings.get(key))
    return called, family_arguments


def difference(key, there, here, trace_schedule, call_schedule):
    """One part of the refusal of a trace recorded with other settings, named by the call's argument:
    the schedule by the argument both calls asked it with (num_inference_steps, timesteps or sigmas)."""
    if key == "size":
        return f"height, width: {there!r} there, {here!r} here"
    if key == "timesteps" and trace_schedule and call_schedule and set(trace_schedule) == set(call_schedule):
        (name,) = call_schedule
        if trace_schedule[name] != call_schedule[name]:
            return f"{name}: {trace_schedule[name]!r} there, {call_schedule[name]!r} here"
    return f"{key}: {there!r} there, {here!r} here"
