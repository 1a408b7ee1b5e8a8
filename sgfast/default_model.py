"""The built-in default model: a small Stable Diffusion pipeline trained on synthetic shape scenes.

It draws 64x64 images of one to three flat-coloured objects on a light-grey background from captions
such as "a red circle and a blue square" (see `CAPTION_WORDS`, and `sgfast.scenes` for the data).
Its cross-attention maps localise each object's colour and shape words, which is what self-guidance
edits read ("move the red circle right"). It ships with the package as safetensors under
`sgfast/assets/default/` and loads offline; `python -m sgfast.train` trains (and re-exports) it.
"""

import os

from sgfast.scenes import CAPTION_WORDS, COLOUR_NAMES, SHAPES, SIZE

__all__ = ["CAPTION_WORDS", "COLOUR_NAMES", "SHAPES", "IMAGE_SIZE", "default_model_path", "load_default_pipeline"]

IMAGE_SIZE = SIZE  # the model draws 64x64 images (16x16 latents)


def default_model_path():
    """The folder of the shipped model (package data): a `save_pretrained` StableDiffusionPipeline."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "default")


def load_default_pipeline(torch_dtype=None):
    """The built-in StableDiffusionPipeline, loaded from the package folder without any network access.

    Its progress bar keeps the diffusers default; call `pipe.set_progress_bar_config(disable=True)`
    to silence it. Generate at `IMAGE_SIZE` (64x64) with prompts built from `CAPTION_WORDS`.
    """
    from diffusers import StableDiffusionPipeline

    path = default_model_path()
    if not os.path.exists(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(
            f"the built-in model is missing from {path}; train and export it with `python -m sgfast.train --export`"
        )
    kwargs = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
    return StableDiffusionPipeline.from_pretrained(
        path, local_files_only=True, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        **kwargs,
    )
