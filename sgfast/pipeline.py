"""SelfGuidancePipeline: a drop-in wrapper of a diffusers Stable Diffusion (1.x/2.x) pipeline.

    sg = SelfGuidancePipeline.from_pipe(pipe)
    out = sg("a red circle and a blue square", edits=[move("circle", dx=0.25)], generator=g)
    out.images, out.trace

Calling it takes the wrapped pipeline's usual arguments plus `edits`. Every argument is checked
before anything runs; the wrapped pipeline's processors are restored whatever happens.
"""

import math
from dataclasses import dataclass

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import BaseOutput

from sgfast.capture import Capture, default_feature_layer, resolve_layers, check_feature_layer
from sgfast.edits import Edit
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


MODES = ("reference", "fast")


class SelfGuidancePipeline:
    """`mode="reference"`: attention maps recomputed in plain PyTorch, the full autograd graph of the
    conditional pass. `mode="fast"`: the fused attention-statistics op (Triton on CUDA), the graph
    cut after the last captured layer, no weight gradients. Both take the same edits and agree."""

    def __init__(self, pipe, layers=None, feature_layer=None, mode="reference", compile=False, settings=None):
        if not isinstance(pipe, StableDiffusionPipeline):
            raise TypeError(
                f"SelfGuidancePipeline wraps diffusers' StableDiffusionPipeline (SD 1.x/2.x); got {type(pipe).__name__}"
            )
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.pipe = pipe
        self.mode = mode
        # The model's guidance defaults (its folder's self_guidance.json; sgfast.settings).
        self.settings = model_settings(pipe, settings)
        if mode == "fast":
            pipe.unet.requires_grad_(False)  # guidance needs gradients to the latents only
        self.layers = resolve_layers(pipe.unet, layers)
        self.feature_layer = feature_layer or self.settings.feature_layer or default_feature_layer(pipe.unet, self.layers)
        check_feature_layer(pipe.unet, self.feature_layer)
        # One capture for the pipeline's life: the same processor objects every call, so a compiled
        # UNet's guards hold and it is not recompiled per call.
        if mode == "fast":
            self._capture = Capture(pipe.unet, self.layers, self.feature_layer, impl="auto", cut_graph=True)
        else:
            self._capture = Capture(pipe.unet, self.layers, self.feature_layer, impl="torch")
        if compile:
            if mode != "fast":
                raise ValueError("compile=True needs mode='fast'")
            # The UNet forward is compiled, captured maps included; autograd.grad runs outside it.
            # `compile` may name a torch.compile backend ("inductor" for True).
            backend = "inductor" if compile is True else compile
            pipe.unet.forward = torch.compile(pipe.unet.forward, backend=backend)

    @classmethod
    def from_pipe(cls, pipe, **kwargs):
        return cls(pipe, **kwargs)

    def words(self, prompt):
        """The words of `prompt` as edits name them."""
        return PromptWords.from_tokenizer(self.pipe.tokenizer, prompt).words

    def capture(self):
        return self._capture

    @torch.no_grad()
    def __call__(
        self,
        prompt,
        edits=None,
        *,
        height=None,
        width=None,
        num_inference_steps=50,
        guidance_scale=7.5,
        negative_prompt=None,
        generator=None,
        latents=None,
        eta=0.0,
        self_guidance_scale=None,
        normalize_gradient=None,
        guidance_schedule=None,
        trace=None,
        record_trace=True,
        output_type="pil",
    ):
        pipe = self.pipe
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        batch = len(prompts)
        height = height or pipe.unet.config.sample_size * pipe.vae_scale_factor
        width = width or pipe.unet.config.sample_size * pipe.vae_scale_factor
        pipe.check_inputs(prompts, height, width, None, negative_prompt)
        prompt_words = [PromptWords.from_tokenizer(pipe.tokenizer, p) for p in prompts]
        edits = self._edits_per_item(edits, batch)
        # Arguments left None take the model's settings (else the paper's defaults).
        edits, (self_guidance_scale, normalize_gradient, guidance_schedule) = self.settings.resolve(
            edits, num_inference_steps, self_guidance_scale, normalize_gradient, guidance_schedule
        )
        for item, words in zip(edits, prompt_words):
            for edit in item:
                edit.validate(words)
        resolve_schedule(guidance_schedule, num_inference_steps)
        if not (isinstance(self_guidance_scale, (int, float)) and math.isfinite(self_guidance_scale)):
            raise ValueError(f"self_guidance_scale must be a finite number, got {self_guidance_scale!r}")
        if not isinstance(normalize_gradient, bool):
            raise ValueError(f"normalize_gradient must be True or False, got {normalize_gradient!r}")
        references = self._references(trace, prompts)
        if latents is None and references[0] is not None:
            latents = torch.cat([r.latents for r in references])
        if latents is not None and not torch.isfinite(latents).all():
            raise ValueError("latents contain NaN or infinite values")

        device = pipe._execution_device
        do_cfg = guidance_scale > 1.0 and pipe.unet.config.time_cond_proj_dim is None
        cond, uncond = pipe.encode_prompt(prompts, device, 1, do_cfg, negative_prompt)
        embeds = torch.cat([uncond, cond]) if do_cfg else cond
        pipe.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = pipe.scheduler.timesteps
        latents = pipe.prepare_latents(
            batch, pipe.unet.config.in_channels, height, width, cond.dtype, device, generator, latents
        )
        extra_step_kwargs = pipe.prepare_extra_step_kwargs(generator, eta)
        initial = latents.clone()
        loop = dict(prompt_words=prompt_words, extra_step_kwargs=extra_step_kwargs)

        has_edits = any(edits)
        needs_reference = any(e.needs_reference for item in edits for e in item)
        traces, energies = None, []
        with self.capture() as capture:
            if has_edits and needs_reference and references[0] is None:
                references = self._new_traces(prompts, prompt_words, initial, (height, width))
                denoise(pipe, initial.clone(), timesteps, embeds, guidance_scale, capture=capture, traces=references, **loop)
                pipe.scheduler.set_timesteps(num_inference_steps, device=device)
            if references[0] is not None:
                traces = references
            elif not has_edits and record_trace:
                traces = self._new_traces(prompts, prompt_words, initial, (height, width))
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
                schedule=guidance_schedule,
                self_guidance_scale=self_guidance_scale,
                normalize_gradient=normalize_gradient,
                energies=energies,
                **loop,
            )
        images = self.decode(latents, output_type, generator)
        pipe.maybe_free_model_hooks()
        if traces is not None and batch == 1:
            traces = traces[0]
        return SelfGuidanceOutput(images=images, trace=traces, energies=energies if has_edits else None)

    def decode(self, latents, output_type="pil", generator=None):
        if output_type == "latent":
            return latents
        vae = self.pipe.vae
        image = vae.decode(latents / vae.config.scaling_factor, return_dict=False, generator=generator)[0]
        return self.pipe.image_processor.postprocess(image, output_type=output_type, do_denormalize=[True] * len(image))

    @torch.no_grad()
    def trace_image(self, image, prompt, num_inference_steps=50, generator=None, noise=None):
        """Record a real image's properties as a source for edits (the paper's way): encode it with the
        VAE, noise it to each timestep of the schedule, run the conditional UNet and record every
        word's maps and appearance. `image`: PIL image, numpy array in [0, 1] or tensor in [-1, 1]."""
        pipe = self.pipe
        device = pipe._execution_device
        pixels = pipe.image_processor.preprocess(image).to(device=device, dtype=pipe.vae.dtype)
        if pixels.shape[0] != 1:
            raise ValueError("trace_image takes one image")
        clean = pipe.vae.encode(pixels).latent_dist.mode() * pipe.vae.config.scaling_factor
        if noise is None:
            noise = torch.randn(clean.shape, generator=generator, dtype=clean.dtype, device="cpu").to(device)
        words = PromptWords.from_tokenizer(pipe.tokenizer, prompt)
        cond, _ = pipe.encode_prompt(prompt, device, 1, False)
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
                    pipe.unet(noisy, t, encoder_hidden_states=cond, return_dict=False)
                    record_traces([trace], capture, [trace.words], t)
        return trace

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
    def _references(trace, prompts):
        if trace is None:
            return [None] * len(prompts)
        traces = [trace] if isinstance(trace, Trace) else list(trace)
        if len(traces) != len(prompts):
            raise ValueError(f"got {len(traces)} traces for {len(prompts)} prompts")
        for t, p in zip(traces, prompts):
            if t.prompt != p or t.latents is None:
                raise ValueError(
                    f"the trace of {t.prompt!r} is not the unedited generation of {p!r}; use it as an edit's source instead"
                )
        return traces

    def _new_traces(self, prompts, prompt_words, initial, image_size):
        # Keep the noise as `latents=` takes it: prepare_latents scales by init_noise_sigma again.
        noise = initial / self.pipe.scheduler.init_noise_sigma
        return [
            Trace(p, list(dict.fromkeys(w.words)), latents=noise[b : b + 1].clone(), image_size=image_size)
            for b, (p, w) in enumerate(zip(prompts, prompt_words))
        ]

