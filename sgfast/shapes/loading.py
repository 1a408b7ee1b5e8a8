"""Pipelines by name, for the command line, the server and the benchmarks: the built-in model
("default", `sgfast.shapes.model`), the built-in MMDiT model ("default-mmdit", `sgfast.shapes.mmdit`),
the tiny random-weight one ("tiny") or a local diffusers folder."""

import contextlib
import os

from sgfast.shapes.mmdit import NAME as MMDIT, load_mmdit_pipeline, mmdit_model_path
from sgfast.shapes.model import default_model_path, load_default_pipeline


@contextlib.contextmanager
def loading_bars_off():
    """diffusers' and transformers' per-component loading bars off while a small pipeline loads (it
    takes well under a second), so the command line prints the sampling bars and its own lines only."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    was_on = [(m, m.is_progress_bar_enabled()) for m in (diffusers_logging, transformers_logging)]
    for module, _ in was_on:
        module.disable_progress_bar()
    try:
        yield
    finally:
        for module, on in was_on:
            if on:
                module.enable_progress_bar()


def load_pipeline(model):
    """(pipeline, description) for `model`: "default" (the built-in model, or the tiny random-weight
    one if it is absent), "default-mmdit" (the built-in MMDiT model, a StableDiffusion3Pipeline),
    "tiny", or a local diffusers folder (SD 1.x/2.x, SDXL, SD3 or FLUX)."""
    with loading_bars_off():
        return _load_pipeline(model)


def _load_pipeline(model):
    from sgfast.families import load_pipeline as load_folder

    if model == MMDIT:
        return load_mmdit_pipeline(), f"built-in MMDiT model ({mmdit_model_path()})"

    if model == "tiny":
        from sgfast.testing import tiny_pipeline

        pipe = tiny_pipeline()
        pipe.set_progress_bar_config(disable=False)
        return pipe, "tiny random-weight pipeline"
    if model == "default":
        if not os.path.exists(os.path.join(default_model_path(), "model_index.json")):
            print("The built-in model is not in this install; using the tiny random-weight pipeline.")
            return _load_pipeline("tiny")
        return load_default_pipeline(), f"built-in model ({default_model_path()})"
    return load_folder(model, safety_checker=None), model
