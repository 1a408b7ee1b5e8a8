"""The built-in model: a small Stable Diffusion pipeline trained on synthetic scenes of coloured
circles, squares and triangles, shipped with the package.

- `scenes`: the scene generator (training data, captions) and the scene reader that scores images;
- `train`: its training (`python -m sgfast train`);
- `model`: loading it (`load_default_pipeline`; `load_pipeline` by name for the command line and the
  server), and the guidance settings tuned on it (`guidance_settings`, `KEEP_OTHERS`);
- `assets/default/`: its weights (safetensors) and configs.

It imports the library (`sgfast`); the library never imports it.
"""

from sgfast.shapes.model import (
    CAPTION_WORDS,
    IMAGE_SIZE,
    KEEP_OTHERS,
    SELF_GUIDANCE_SCALE,
    default_model_path,
    guidance_settings,
    load_default_pipeline,
    load_pipeline,
)
