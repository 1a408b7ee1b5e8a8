"""The per-family parts of a wrapped pipeline: what differs between Stable Diffusion 1.x/2.x and SDXL.

The sampler sees none of it: prompt encoding, the UNet's added conditioning (SDXL's pooled text
embedding and micro-conditioning `time_ids`, given per batch row), the timestep cut-off
(`denoising_end`), decoding and the output checks, and the default captured layers are each done
here exactly as the family's own diffusers pipeline does them.
"""

import json
import os

import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

from sgfast.capture import cross_attention_layers, default_feature_layer, default_layers


class StableDiffusion:
    """diffusers' StableDiffusionPipeline (SD 1.x/2.x): one text encoder, no added conditioning."""

    name = "Stable Diffusion 1.x/2.x"
    call_arguments = {}  # family-only arguments of __call__ -> default
    guidance_scale = 7.5  # the pipeline's default

    def __init__(self, pipe):
        self.pipe = pipe

    @property
    def tokenizer(self):
        """The tokenizer whose token positions name a prompt's words."""
        return self.pipe.tokenizer

    def default_layers(self):
        return default_layers(self.pipe.unet)

    def default_feature_layer(self, layers):
        return default_feature_layer(self.pipe.unet, layers)

    def size(self, height, width):
        """diffusers' default size: the UNet's sample size (an int, or a (height, width) pair) times the
        VAE's scale factor, for both sides when either is missing."""
        sample = self.pipe.unet.config.sample_size
        sample = (sample, sample) if isinstance(sample, int) else tuple(sample)
        if not height or not width:
            height, width = sample[0] * self.pipe.vae_scale_factor, sample[1] * self.pipe.vae_scale_factor
        return height, width

    def check_arguments(self, extra):
        """The family-only arguments, with defaults filled in; an unknown one is an error."""
        unknown = sorted(set(extra) - set(self.call_arguments))
        if unknown:
            allowed = ", ".join(self.call_arguments) or "none"
            raise TypeError(f"unexpected arguments for a {self.name} pipeline: {', '.join(unknown)} (its own: {allowed})")
        return {**self.call_arguments, **extra}

    def check_inputs(self, prompt, height, width, negative_prompt, prompt_embeds, negative_prompt_embeds, ip_image,
                     ip_embeds, callback_inputs, extra):
        self.pipe.check_inputs(prompt, height, width, None, negative_prompt, prompt_embeds, negative_prompt_embeds,
                               ip_image, ip_embeds, callback_inputs)

    def encode(self, prompt, device, images_per_prompt, do_cfg, negative_prompt, prompt_embeds, negative_prompt_embeds,
               lora_scale, clip_skip, size, rows, extra):
        """(cond, uncond, added_cond_kwargs) as the pipeline builds them; uncond is None without CFG."""
        cond, uncond = self.pipe.encode_prompt(
            prompt, device, images_per_prompt, do_cfg, negative_prompt, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, lora_scale=lora_scale, clip_skip=clip_skip,
        )
        return cond, uncond, {}

    def cut_timesteps(self, timesteps, num_inference_steps, extra):
        return timesteps, num_inference_steps

    def settings(self, extra):
        """What else a trace must share with an edit that takes it as its unedited reference."""
        return {}

    def decode(self, latents, generator):
        vae = self.pipe.vae
        return vae.decode(latents / vae.config.scaling_factor, return_dict=False, generator=generator)[0]

    def check_images(self, image, device, dtype):
        """(image, nsfw flags or None): the safety checker, where the pipeline has one."""
        return self.pipe.run_safety_checker(image, device, dtype)

    def encode_image(self, pixels):
        vae = self.pipe.vae
        return vae.encode(pixels.to(vae.dtype)).latent_dist.mode() * vae.config.scaling_factor

    def image_conditioning(self, prompt, device, size):
        """(text embeddings, added_cond_kwargs) of one prompt without CFG, for tracing a real image."""
        cond, _, added = self.encode(prompt, device, 1, False, None, None, None, None, None, size, 1,
                                     self.check_arguments({}))
        return cond, added


class StableDiffusionXL(StableDiffusion):
    """diffusers' StableDiffusionXLPipeline: two text encoders whose hidden states are concatenated
    per token (the same 77 positions, so a word's positions are found once, with either tokenizer),
    the second's pooled embedding and the micro-conditioning (original size, crop, target size) as
    the UNet's added conditioning, `denoising_end` for a base + refiner hand-off, and the VAE
    upcast to float32 for decoding where its config asks for it (`force_upcast`)."""

    name = "Stable Diffusion XL"
    guidance_scale = 5.0
    call_arguments = dict(
        prompt_2=None, negative_prompt_2=None, pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None,
        original_size=None, crops_coords_top_left=(0, 0), target_size=None, negative_original_size=None,
        negative_crops_coords_top_left=(0, 0), negative_target_size=None, denoising_end=None,
    )

    def size(self, height, width):
        """SDXL's default size: each missing side alone, from the pipeline's default sample size."""
        default = self.pipe.default_sample_size * self.pipe.vae_scale_factor
        return height or default, width or default

    @property
    def tokenizer(self):
        return self.pipe.tokenizer if self.pipe.tokenizer is not None else self.pipe.tokenizer_2

    def default_layers(self):
        """The coarsest decoder level with cross-attention (up_blocks.0: 32x32 at 1024px, ten
        transformer layers per attention): its maps localise objects and the backward stops before
        the 64x64 level, the most expensive part of the decoder (see the README)."""
        layers = cross_attention_layers(self.pipe.unet)
        decoder = [name for name in layers if name.startswith("up_blocks.")]
        if not decoder:
            return []
        coarsest = min(int(name.split(".")[1]) for name in decoder)
        return [name for name in decoder if name.split(".")[1] == str(coarsest)]

    def default_feature_layer(self, layers):
        """Where the maps come from one up block only, the resnet that feeds its last attention (for
        SDXL's default, up_blocks.0.resnets.2: 32x32, 1280 channels): the block's own output would
        add its upsampler, at 64x64, to the backward (1.009x the floor instead of 1.001x)."""
        blocks = sorted({int(name.split(".")[1]) for name in layers if name.startswith("up_blocks.")})
        if len(blocks) != 1:
            return default_feature_layer(self.pipe.unet, layers)
        block = self.pipe.unet.up_blocks[blocks[0]]
        return f"up_blocks.{blocks[0]}.resnets.{len(block.attentions) - 1}"

    def check_inputs(self, prompt, height, width, negative_prompt, prompt_embeds, negative_prompt_embeds, ip_image,
                     ip_embeds, callback_inputs, extra):
        self.pipe.check_inputs(
            prompt, extra["prompt_2"], height, width, None, negative_prompt, extra["negative_prompt_2"], prompt_embeds,
            negative_prompt_embeds, extra["pooled_prompt_embeds"], extra["negative_pooled_prompt_embeds"], ip_image,
            ip_embeds, callback_inputs,
        )
        end = extra["denoising_end"]
        if end is not None and not (isinstance(end, float) and 0.0 < end <= 1.0):
            raise ValueError(f"denoising_end must be a float in (0, 1], got {end!r}")

    def encode(self, prompt, device, images_per_prompt, do_cfg, negative_prompt, prompt_embeds, negative_prompt_embeds,
               lora_scale, clip_skip, size, rows, extra):
        pipe = self.pipe
        cond, uncond, pooled, negative_pooled = pipe.encode_prompt(
            prompt=prompt, prompt_2=extra["prompt_2"], device=device, num_images_per_prompt=images_per_prompt,
            do_classifier_free_guidance=do_cfg, negative_prompt=negative_prompt,
            negative_prompt_2=extra["negative_prompt_2"], prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=extra["pooled_prompt_embeds"],
            negative_pooled_prompt_embeds=extra["negative_pooled_prompt_embeds"], lora_scale=lora_scale,
            clip_skip=clip_skip,
        )
        time_ids, negative_time_ids = self._time_ids(size, cond.dtype, int(pooled.shape[-1]), extra)
        text_embeds = pooled
        if do_cfg:
            text_embeds = torch.cat([negative_pooled, pooled])
            time_ids = torch.cat([negative_time_ids, time_ids])
        # diffusers repeats the (negative, positive) pair once per image: the same rows, in its order.
        added = dict(text_embeds=text_embeds.to(device), time_ids=time_ids.to(device).repeat(rows, 1))
        return cond, uncond, added

    def _time_ids(self, size, dtype, pooled_dim, extra):
        """(time_ids, negative time_ids) of the micro-conditioning, as the pipeline's _get_add_time_ids."""
        pipe = self.pipe
        projection_dim = pooled_dim if pipe.text_encoder_2 is None else pipe.text_encoder_2.config.projection_dim
        original, target = extra["original_size"] or size, extra["target_size"] or size
        time_ids = pipe._get_add_time_ids(original, extra["crops_coords_top_left"], target, dtype=dtype,
                                          text_encoder_projection_dim=projection_dim)
        negative = time_ids
        if extra["negative_original_size"] is not None and extra["negative_target_size"] is not None:
            negative = pipe._get_add_time_ids(
                extra["negative_original_size"], extra["negative_crops_coords_top_left"], extra["negative_target_size"],
                dtype=dtype, text_encoder_projection_dim=projection_dim,
            )
        return time_ids, negative

    def cut_timesteps(self, timesteps, num_inference_steps, extra):
        """`denoising_end`: stop where a refiner takes over, by diffusers' rule."""
        end = extra["denoising_end"]
        if end is None or not 0.0 < end < 1.0:
            return timesteps, num_inference_steps
        train_steps = self.pipe.scheduler.config.num_train_timesteps
        cutoff = int(round(train_steps - end * train_steps))
        kept = len([t for t in timesteps if t >= cutoff])
        return timesteps[:kept], kept

    def settings(self, extra):
        names = ("original_size", "crops_coords_top_left", "target_size", "negative_original_size",
                 "negative_crops_coords_top_left", "negative_target_size", "denoising_end", "negative_prompt_2")
        return {name: extra[name] for name in names}

    def decode(self, latents, generator):
        vae = self.pipe.vae
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast  # fp16 SDXL VAEs overflow
        if upcast:
            vae.to(torch.float32)
            latents = latents.to(torch.float32)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        if upcast:
            vae.to(dtype=torch.float16)
        return image

    def check_images(self, image, device, dtype):
        if getattr(self.pipe, "watermark", None) is not None:
            image = self.pipe.watermark.apply_watermark(image)
        return image, None

    def encode_image(self, pixels):
        vae = self.pipe.vae
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast
        if upcast:
            vae.to(torch.float32)
        latents = vae.encode(pixels.to(vae.dtype)).latent_dist.mode()
        if upcast:
            vae.to(dtype=torch.float16)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            return ((latents - mean) * vae.config.scaling_factor / std).to(self.pipe.unet.dtype)
        return (latents * vae.config.scaling_factor).to(self.pipe.unet.dtype)


FAMILIES = ((StableDiffusionPipeline, StableDiffusion), (StableDiffusionXLPipeline, StableDiffusionXL))
# Folders load_pipeline takes: these families' and the MMDiT ones (sgfast.mmdit_families).
LOADABLE = tuple(pipeline_class for pipeline_class, _ in FAMILIES) + (StableDiffusion3Pipeline, FluxPipeline)


def family_of(pipe):
    """The adapter of `pipe`'s family; a pipeline of another kind is an error naming the supported ones."""
    for pipeline_class, family in FAMILIES:
        if isinstance(pipe, pipeline_class):
            return family(pipe)
    names = " or ".join(f"{c.__name__} ({f.name})" for c, f in FAMILIES)
    raise TypeError(f"SelfGuidancePipeline wraps diffusers' {names}; got {type(pipe).__name__}")


def load_pipeline(folder, **kwargs):
    """A local diffusers folder (`save_pretrained`) as the pipeline class its model_index.json names,
    SD 1.x/2.x, SDXL, SD3 or FLUX, offline; `kwargs` go to `from_pretrained`. Another class is an error."""
    index = os.path.join(folder, "model_index.json")
    if not os.path.exists(index):
        raise FileNotFoundError(f"{folder!r} is not a diffusers pipeline folder: it has no model_index.json")
    with open(index) as f:
        name = json.load(f).get("_class_name")
    classes = {pipeline_class.__name__: pipeline_class for pipeline_class in LOADABLE}
    if name not in classes:
        raise ValueError(f"{folder!r} holds a {name}; sgfast loads {' or '.join(classes)} folders")
    if classes[name] is not StableDiffusionPipeline:
        kwargs.pop("safety_checker", None)  # SDXL has none; diffusers would warn that it is ignored
    return classes[name].from_pretrained(folder, local_files_only=True, **kwargs)
