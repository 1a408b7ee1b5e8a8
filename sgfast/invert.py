"""Real photos as editable generations: DDIM inversion.

    inverted = sg.invert(photo, "a red circle and a blue square", num_inference_steps=25)
    out = sg("a red circle and a blue square", edits=[move("circle", dx=-0.2)], trace=inverted)

A call with the inverted trace takes the inversion's steps, size, guidance scale and negative prompt,
and the model's photo strength schedule, for every argument it leaves out; `edit_arguments` gives
those values (with another strength or schedule, to splat into the call).

`invert` encodes the photo with the VAE and runs the deterministic DDIM sampler backwards to noise.
Plain DDIM inversion assumes eps(z_t, t) ~ eps(z_{t-1}, t); each step here is refined by fixed-point
iterations (z_t <- inverse step with eps(z_t, t)), so that the forward step from z_t lands back on
z_{t-1}. Under classifier-free guidance the inversion (made with the conditional noise) and the
regeneration (made with eps_u + s (eps_c - eps_u)) disagree and the photo drifts; negative-prompt
inversion (Miyake et al. 2023) regenerates with the prompt as the negative prompt, which makes the
CFG noise the conditional noise the inversion used, for every guidance scale, at no cost. The
regeneration records the trace: the edits' unedited reference is the photo as the model sees it.
"""

import math

import numpy as np
import torch
from diffusers import DDIMScheduler

from sgfast.sampler import resolve_schedule

METHODS = ("negative_prompt", "plain")


def check_inversion(pipe, num_inference_steps, iterations, method):
    """Clear errors, before anything runs, for what the inversion cannot do."""
    scheduler = pipe.scheduler
    if not isinstance(scheduler, DDIMScheduler):
        raise ValueError(
            f"invert runs DDIM backwards and needs a DDIMScheduler; the pipeline has {type(scheduler).__name__} "
            "(pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config))"
        )
    if scheduler.config.prediction_type != "epsilon":
        raise ValueError(f"invert supports epsilon-prediction models, not {scheduler.config.prediction_type!r}")
    if scheduler.config.clip_sample or scheduler.config.thresholding:
        raise ValueError("invert cannot undo a DDIM step that clips or thresholds its sample (clip_sample, thresholding): set them False")
    if not (isinstance(num_inference_steps, int) and num_inference_steps >= 2):
        raise ValueError(f"num_inference_steps must be an integer >= 2, got {num_inference_steps!r}")
    if not (isinstance(iterations, int) and 0 <= iterations <= 20):
        raise ValueError(f"fixed_point_iterations must be an integer in [0, 20], got {iterations!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def to_pixels(pipe, image):
    """The photo as the VAE takes it ([1, 3, H, W] in [-1, 1]): one RGB PIL image whose sides are
    multiples of 8 (checked before diffusers' preprocessing, which would silently crop them)."""
    if not hasattr(image, "mode") or not hasattr(image, "size"):
        raise ValueError(f"invert takes a PIL image, got {type(image).__name__}")
    if image.mode != "RGB":
        raise ValueError(f"invert takes an RGB image, got a {image.mode!r} image (convert it with image.convert('RGB'))")
    width, height = image.size
    if height % 8 or width % 8 or height < 8 or width < 8:
        raise ValueError(f"the image's sides must be multiples of 8 (at least 8), got {width}x{height}")
    return pipe.image_processor.preprocess(image).to(device=pipe._execution_device, dtype=pipe.vae.dtype)


def encode(pipe, pixels):
    """Clean latents: the VAE posterior's mode, scaled as the UNet sees them."""
    return pipe.vae.encode(pixels).latent_dist.mode() * pipe.vae.config.scaling_factor


def alpha_pairs(scheduler):
    """(timestep, alpha_bar of the latents a DDIM step from it starts from, alpha_bar it ends at),
    in the order the inversion walks them: from the cleanest step to the noisiest. The exact
    inverse of diffusers' DDIMScheduler.step (eta = 0)."""
    ratio = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alphas = scheduler.alphas_cumprod
    pairs = []
    for t in reversed(scheduler.timesteps.tolist()):
        prev = t - ratio
        alpha_prev = alphas[prev] if prev >= 0 else scheduler.final_alpha_cumprod
        pairs.append((t, float(alphas[t]), float(alpha_prev)))
    return pairs


def inverse_step(z_prev, eps, alpha_t, alpha_prev):
    """The latents at alpha_t whose DDIM step with noise `eps` gives `z_prev` (at alpha_prev)."""
    x0 = (z_prev - math.sqrt(1 - alpha_prev) * eps) / math.sqrt(alpha_prev)
    return math.sqrt(alpha_t) * x0 + math.sqrt(1 - alpha_t) * eps


def ddim_invert(pipe, clean, cond, iterations):
    """Clean latents -> the initial noise DDIM regenerates them from (conditional noise)."""
    z = clean
    for t, alpha_t, alpha_prev in pipe.progress_bar(alpha_pairs(pipe.scheduler)):
        # Plain inversion evaluates the noise at the start of the step; each fixed-point iteration
        # evaluates it where the step lands, which is where the forward step will read it.
        guess = z
        for _ in range(iterations + 1):
            eps = pipe.unet(guess, t, encoder_hidden_states=cond, return_dict=False)[0]
            guess = inverse_step(z, eps, alpha_t, alpha_prev)
        z = guess
    return z


def psnr(a, b):
    """Peak signal-to-noise ratio (dB) of two uint8 RGB images."""
    a, b = np.asarray(a.convert("RGB"), np.float64), np.asarray(b.convert("RGB"), np.float64)
    mse = ((a - b) ** 2).mean()
    return float("inf") if mse == 0 else float(10 * math.log10(255.0**2 / mse))


@torch.no_grad()
def invert(sg, image, prompt, num_inference_steps=50, guidance_scale=5.0, method="negative_prompt", fixed_point_iterations=0):
    """Invert a photo (PIL RGB image) under `prompt`; returns the Trace of its regeneration, whose
    `latents` regenerate it and whose `inversion` holds the call arguments edits must use
    (`edit_arguments`), the reconstruction, its PSNR and the VAE's own PSNR (the ceiling)."""
    pipe = sg.pipe
    check_inversion(pipe, num_inference_steps, fixed_point_iterations, method)
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"invert needs the photo's prompt (a non-empty string), got {prompt!r}")
    pixels = to_pixels(pipe, image)
    height, width = pixels.shape[-2:]
    device = pipe._execution_device
    clean = encode(pipe, pixels)
    cond, _ = pipe.encode_prompt(prompt, device, 1, False)
    pipe.scheduler.set_timesteps(num_inference_steps, device=device)
    noise = ddim_invert(pipe, clean, cond, fixed_point_iterations)
    arguments = dict(
        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=height, width=width,
        negative_prompt=prompt if method == "negative_prompt" else None,
    )
    regenerated = sg(prompt, latents=noise, **arguments)
    trace = regenerated.trace
    photo = pipe.image_processor.postprocess(pixels.float(), output_type="pil")[0]
    vae_only = sg.decode(clean)[0]
    trace.inversion = dict(
        arguments=arguments, method=method, fixed_point_iterations=fixed_point_iterations,
        settings=sg.settings.for_photo(), strength=sg.settings.photo_strength,  # the model's, for edits of photos
        reconstruction=regenerated.images[0], psnr=psnr(photo, regenerated.images[0]), vae_psnr=psnr(photo, vae_only),
    )
    return trace


def edit_arguments(trace, strength=None, guidance_schedule=None, edits=()):
    """The call arguments that edit an inverted photo: the inversion's steps, size, guidance scale and
    negative prompt, and a guidance schedule: `guidance_schedule`, else the model's photo schedule
    for `edits` (its self_guidance.json), with the first (1 - strength) of the steps left unguided, as
    image-to-image's strength (None: the model's photo strength, else 1). Those steps retrace the
    inversion (the regeneration follows it back), so the edit starts from the inverted latents there."""
    info = getattr(trace, "inversion", None)
    if info is None:
        raise ValueError("edit_arguments takes a trace from sg.invert (this one has no inversion)")
    steps = info["arguments"]["num_inference_steps"]
    strength = info.get("strength", 1.0) if strength is None else strength
    check_strength(strength)
    if guidance_schedule is None and info.get("settings") is not None:
        _, (_, _, guidance_schedule) = info["settings"].resolve([list(edits)], steps)
    return dict(info["arguments"], guidance_schedule=strength_schedule(steps, strength, guidance_schedule))


def check_strength(strength):
    if not (isinstance(strength, (int, float)) and not isinstance(strength, bool) and 0.0 < strength <= 1.0):
        raise ValueError(f"strength must be a number in (0, 1], got {strength!r}")


def strength_schedule(steps, strength, guidance_schedule=None):
    """`guidance_schedule` (any form a call takes) as bools, with the first (1 - strength) of the
    steps unguided."""
    check_strength(strength)
    start = steps - int(round(strength * steps))
    return [g and i >= start for i, g in enumerate(resolve_schedule(guidance_schedule, steps))]


class PhotoError(ValueError):
    """A photo `load_photo` refuses. `kind`: "too_large" (over the byte cap), "unsupported" (not a
    readable PNG or JPEG, or not 8-bit) or "invalid" (its size), so a server can answer 413/415/422."""

    def __init__(self, kind, message):
        super().__init__(message)
        self.kind = kind


# 8-bit modes a photo may come in (converted to RGB); CMYK, 16-bit and float images are refused
# rather than converted with a guess at their colour profile or range.
PHOTO_MODES = ("RGB", "RGBA", "L", "LA", "P")


def load_photo(data, max_side=2048, max_bytes=20 * 2**20):
    """An uploaded photo (bytes) as an RGB PIL image, checked: a readable PNG or JPEG of at most
    `max_bytes`, an 8-bit mode (PHOTO_MODES), sides multiples of 8 in [8, max_side]. Anything else is a
    PhotoError (a ValueError) saying what was wrong and what is allowed (the header is read before
    the pixels, so a huge image is refused before it is decoded)."""
    import io

    import PIL.Image

    if not isinstance(data, (bytes, bytearray)) or not data:
        raise PhotoError("unsupported", "the photo is empty: send a PNG or JPEG file")
    if len(data) > max_bytes:
        raise PhotoError("too_large", f"the photo is {len(data)} bytes; at most {max_bytes} are allowed")
    try:
        image = PIL.Image.open(io.BytesIO(data))
    except (OSError, PIL.Image.DecompressionBombError) as error:
        raise PhotoError("unsupported", f"the photo is not a readable image ({error}); send a PNG or JPEG file") from None
    if image.format not in ("PNG", "JPEG"):
        raise PhotoError("unsupported", f"the photo is a {image.format} image; PNG and JPEG are allowed")
    if image.mode not in PHOTO_MODES:
        raise PhotoError("unsupported", f"the photo's mode is {image.mode!r} (e.g. CMYK or 16-bit); 8-bit {', '.join(PHOTO_MODES)} are allowed")
    width, height = image.size
    if not (8 <= width <= max_side and 8 <= height <= max_side) or width % 8 or height % 8:
        raise PhotoError("invalid", f"the photo is {width}x{height}; its sides must be multiples of 8 between 8 and {max_side}")
    try:
        image.load()
    except OSError as error:
        raise PhotoError("unsupported", f"the photo is truncated or corrupt ({error})") from None
    return image.convert("RGB")


def edit_photo(sg, image, prompt, edits, strength=None, num_inference_steps=25, guidance_scale=5.0, guidance_schedule=None, **guidance):
    """Invert `image` under `prompt` and apply `edits` to it: (the edited output, the inverted trace).
    `guidance`: the call's self-guidance settings (self_guidance_scale, normalize_gradient); those left
    out, the strength and the schedule are the model's photo settings (its self_guidance.json)."""
    inverted = invert(sg, image, prompt, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
    arguments = edit_arguments(inverted, strength, guidance_schedule, edits)
    return sg(prompt, edits=edits, trace=inverted, **guidance, **arguments), inverted
