"""The shipped default model loads offline and runs."""

import os
import socket
import time

import numpy as np
import pytest
import torch

from sgfast.shapes.model import CAPTION_WORDS, IMAGE_SIZE, default_model_path, load_default_pipeline

pytestmark = pytest.mark.skipif(
    not os.path.exists(os.path.join(default_model_path(), "model_index.json")),
    reason="sgfast/shapes/assets/default/model_index.json does not exist yet: train and export it with `python -m sgfast train`",
)


@pytest.fixture(scope="module")
def loaded():
    start = time.perf_counter()
    pipe = load_default_pipeline()
    return pipe, time.perf_counter() - start


def test_loads_offline_quickly(loaded, monkeypatch):
    pipe, seconds = loaded
    assert seconds < 15, f"loading took {seconds:.1f} s"
    # Offline: with every network connection refused, loading still works (local folder, no
    # downloads). An HF_HUB_OFFLINE set here would not count: the hub reads it once, on import.
    def refuse(*args, **kwargs):
        raise OSError("network access during an offline load")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    load_default_pipeline()


def test_is_a_stable_diffusion_pipeline(loaded):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    pipe, _ = loaded
    assert isinstance(pipe, StableDiffusionPipeline)
    assert isinstance(pipe.unet, UNet2DConditionModel)
    assert isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.safety_checker is None
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == IMAGE_SIZE
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    size = sum(
        os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(default_model_path()) for f in files
    )
    assert size < 20e6
    assert not any(f.endswith(".bin") for _, _, files in os.walk(default_model_path()) for f in files)


def test_tokenizer_knows_caption_words_as_single_tokens(loaded):
    pipe, _ = loaded
    for word in CAPTION_WORDS:
        ids = pipe.tokenizer(word, add_special_tokens=False).input_ids
        assert len(ids) == 1, (word, ids)
    ids = pipe.tokenizer("a red circle and a blue square").input_ids
    assert len(ids) == 2 + 7


def test_generates_64x64(loaded):
    pipe, _ = loaded
    pipe.set_progress_bar_config(disable=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is fastest, and much faster on busy shared cores
    try:
        out = pipe(
            "a red circle and a blue square", num_inference_steps=5, guidance_scale=5.0, height=IMAGE_SIZE,
            width=IMAGE_SIZE, generator=torch.Generator().manual_seed(0), output_type="np",
        ).images
    finally:
        torch.set_num_threads(threads)
    assert out.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert np.isfinite(out).all()
