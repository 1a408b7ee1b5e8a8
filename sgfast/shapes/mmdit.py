"""The built-in MMDiT model: a small Stable Diffusion 3 pipeline trained on the same synthetic scenes.

A real `StableDiffusion3Pipeline`: an `SD3Transformer2DModel` (joint attention over image and text
tokens), two `CLIPTextModelWithProjection` encoders as small as the built-in UNet model's text
encoder, no T5 (`text_encoder_3=None`: diffusers then feeds the transformer zeros at the T5
positions), the built-in model's trained VAE, and a `FlowMatchEulerDiscreteScheduler`. It ships under
`sgfast/shapes/assets/default-mmdit/` (written by `python -m sgfast train --family sd3`) and loads
offline with `StableDiffusion3Pipeline.from_pretrained`. See docs/builtin-mmdit.md.
"""

import os

NAME = "default-mmdit"

# The classifier-free guidance scale to sample it with. Higher scales empty the image: the
# unconditional prediction holds about two objects' worth of foreground (the training scenes' mean),
# so a one- or two-object caption's difference from it points at less foreground than it names.
# Measured at step 4764 (`python -m benchmarks.quality_gate --seeds 40 --guidance 1,1.5,2,3`): right
# colours and count 42.5% / 52.5% / 52.5% / 42.5% (docs/builtin-mmdit.md, "Guidance scale").
GUIDANCE_SCALE = 2.0

# Untuned starting values (the UNet model's defaults): the MMDiT's energies have not been swept yet.
GUIDANCE_SETTINGS = {
    "defaults": {"self_guidance_scale": 1.5, "normalize_gradient": True, "guidance_schedule": {"from_step": 1, "to_share": 0.8}},
}
SETTINGS_ABOUT = (
    "Self-guidance defaults of the built-in MMDiT shapes model (sgfast.shapes.mmdit.GUIDANCE_SETTINGS); "
    "untuned, the UNet model's defaults."
)


def mmdit_model_path():
    """The folder of the shipped MMDiT model: a `save_pretrained` StableDiffusion3Pipeline."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", NAME)


def load_mmdit_pipeline(path=None, torch_dtype=None):
    """The built-in StableDiffusion3Pipeline (or the one in `path`), loaded without network access.
    Generate at 64x64 with prompts built from `CAPTION_WORDS`."""
    from diffusers import StableDiffusion3Pipeline

    path = path or mmdit_model_path()
    if not os.path.exists(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(
            f"the built-in MMDiT model is missing from {path}; train and export it with "
            "`python -m sgfast train --family sd3`"
        )
    kwargs = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
    return StableDiffusion3Pipeline.from_pretrained(
        path, local_files_only=True, text_encoder_3=None, tokenizer_3=None, **kwargs
    )


def guidance_settings():
    from sgfast.settings import GuidanceSettings

    return GuidanceSettings(**GUIDANCE_SETTINGS)


def write_guidance_settings(folder):
    """Write the MMDiT model's guidance settings into a pipeline folder (the training export)."""
    return guidance_settings().write(folder, about=SETTINGS_ABOUT)
