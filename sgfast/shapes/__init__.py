"""The built-in model: a small Stable Diffusion pipeline trained on synthetic scenes of coloured
circles, squares and triangles, shipped with the package.

- `scenes`: the scene generator (training data, captions) and the scene reader that scores images;
- `train`: its training (`python -m sgfast train`);
- `model`: loading it (`load_default_pipeline`) and the guidance settings tuned on it
  (`GUIDANCE_SETTINGS`, shipped in its folder as `self_guidance.json`, which
  `SelfGuidancePipeline.from_pipe` reads);
- `mmdit`: the built-in MMDiT model (SD3), trained on the same scenes (`train_mmdit`), and its settings;
- `loading`: `load_pipeline` by name ("default", "default-mmdit", "tiny", a folder) for the command line,
  the server and the benchmarks;
- `assets/default/`: its weights (safetensors), configs and guidance settings.

It imports the library (`sgfast`); the library never imports it.
"""

from sgfast.shapes.model import (
    CAPTION_WORDS,
    IMAGE_SIZE,
    GUIDANCE_SETTINGS,
    default_model_path,
    guidance_settings,
    write_guidance_settings,
    load_default_pipeline,
)
from sgfast.shapes.loading import load_pipeline
