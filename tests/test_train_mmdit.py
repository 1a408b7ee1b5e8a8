"""Training of the built-in MMDiT model (`python -m sgfast train --family sd3`) on tiny sizes: the
training attention equals diffusers' joint attention on the pipeline's own token layout, a run
resumed from its checkpoint continues exactly, and its export loads through
StableDiffusion3Pipeline.from_pretrained offline."""

import json
import os
import pathlib

import numpy as np
import pytest
import torch

from sgfast.shapes import train_mmdit
from sgfast.shapes.train_mmdit import JointAttentionRecorder

TINY = ["--layers", "2", "--heads", "2", "--head-dim", "8", "--text-hidden", "16", "--text-projection", "8",
        "--batch", "3", "--validation", "2", "--validation-steps", "2", "--log-every", "1", "--warmup", "1",
        "--validation-scenes", "4", "--latent-scenes", "16"]


def tiny_transformer(joint_dim=6, qk_norm="rms_norm"):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=joint_dim, caption_projection_dim=16, pooled_projection_dim=5,
        pos_embed_max_size=4, qk_norm=qk_norm,
    ).double()


# diffusers' RMSNorm computes the variance in float32 even on float64 inputs: gradients through it
# agree to float32's precision, not float64's.
GRAD_RTOL = {None: 1e-9, "rms_norm": 1e-5}


@pytest.mark.parametrize("qk_norm", [None, "rms_norm"])
@pytest.mark.parametrize("zeros", [1, 7])
def test_one_zero_row_stands_for_the_pipelines_zero_rows(zeros, qk_norm):
    """Text tokens + `zeros` rows of zeros through diffusers' processor == text tokens + one zero row
    counted `zeros` times through the training processor: output and gradients, float64."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    model = tiny_transformer(qk_norm=qk_norm)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    text = torch.randn(2, 5, 6, generator=g, dtype=torch.float64)
    pooled = torch.randn(2, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([300.0, 850.0], dtype=torch.float64)

    def run(processor, rows):
        model.zero_grad()
        model.set_attn_processor(processor)
        tokens = torch.cat([text, text.new_zeros(2, rows, 6)], 1)
        out = model(hidden_states=latents, encoder_hidden_states=tokens, pooled_projections=pooled, timestep=t).sample
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want, want_grads = run(JointAttnProcessor2_0(), zeros)
    store = {"active": True, "maps": [], "multiplicity": zeros}
    got, got_grads = run(JointAttentionRecorder(store), 1)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
    assert want_grads.keys() == got_grads.keys()
    for name in want_grads:
        scale = want_grads[name].abs().max()
        assert torch.allclose(got_grads[name], want_grads[name], rtol=GRAD_RTOL[qk_norm], atol=GRAD_RTOL[qk_norm] * scale), name
    # One map per block: image queries (4x4 patches) x the text keys (5 + the stand-in row).
    assert [m.shape for m in store["maps"]] == [torch.Size([2, 16, 6])] * 2


def test_recorded_maps_are_the_joint_softmax_columns():
    """The recorded maps are the head-averaged joint-softmax probabilities of image queries at text
    keys (not renormalised over text), recomputed here from the first block's projections."""
    model = tiny_transformer()
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
    text = torch.randn(1, 3, 6, generator=g, dtype=torch.float64)
    pooled = torch.randn(1, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([500.0], dtype=torch.float64)
    store = {"active": True, "maps": [], "multiplicity": 1}
    model.set_attn_processor(JointAttentionRecorder(store))
    seen = {}
    block = model.transformer_blocks[0]
    block.attn.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    model(hidden_states=latents, encoder_hidden_states=text, pooled_projections=pooled, timestep=t)
    attn, x, c = block.attn, seen["hidden_states"], seen["encoder_hidden_states"]
    heads = lambda y: y.view(1, -1, 2, 8).transpose(1, 2)  # noqa: E731
    q = torch.cat([attn.norm_q(heads(attn.to_q(x))), attn.norm_added_q(heads(attn.add_q_proj(c)))], 2)
    k = torch.cat([attn.norm_k(heads(attn.to_k(x))), attn.norm_added_k(heads(attn.add_k_proj(c)))], 2)
    probs = (q @ k.transpose(-1, -2) / 8**0.5).softmax(-1).mean(1)
    assert torch.allclose(store["maps"][0], probs[:, :16, 16:], rtol=1e-10, atol=1e-13)
    assert store["maps"][0].sum(-1).max() < 1  # image keys take their share of each row


def run_training(out, *flags):
    train_mmdit.main(["--out", str(out / "run"), "--export-to", str(out / "export")] + TINY + list(flags))
    return torch.load(out / "run" / "checkpoint.pt", weights_only=False)


def test_trains_resumes_exactly_and_exports_a_loadable_pipeline(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from sgfast.settings import GuidanceSettings

    straight = run_training(tmp_path / "a", "--steps", "2")
    run_training(tmp_path / "b", "--steps", "2", "--stop-at", "1")
    resumed = run_training(tmp_path / "b", "--steps", "2")
    assert "resumed step=1" in (tmp_path / "b" / "run" / "log.txt").read_text()
    assert straight["step"] == resumed["step"] == 2
    for name, weight in straight["transformer"].items():
        assert torch.equal(weight, resumed["transformer"][name]), name
    for name, weight in straight["transformer_ema"].items():
        assert torch.equal(weight, resumed["transformer_ema"][name]), name
    assert straight["opt"]["state"].keys() == resumed["opt"]["state"].keys()

    folder = tmp_path / "b" / "export"
    info = json.loads((folder / "training.json").read_text())
    assert info["family"] == "sd3" and info["step"] == 2 and np.isfinite(info["validation_loss"])
    GuidanceSettings.read(str(folder / "self_guidance.json"))
    from sgfast.shapes import default_model_path

    for config in folder.rglob("*.json"):  # the record travels with the weights: no path of this machine
        assert default_model_path() not in config.read_text(), config
    pipe = StableDiffusion3Pipeline.from_pretrained(str(folder), local_files_only=True, text_encoder_3=None, tokenizer_3=None)
    assert pipe.text_encoder_3 is None and pipe.vae.config.shift_factor == resumed["shift_factor"]
    for name, weight in resumed["transformer_ema"].items():
        assert torch.equal(pipe.transformer.state_dict()[name], weight), name
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


def test_init_from_an_export_continues_at_its_step(tmp_path):
    run_training(tmp_path / "a", "--steps", "1")
    state = run_training(tmp_path / "c", "--steps", "2", "--init-from", str(tmp_path / "a" / "export"))
    assert state["step"] == 2 and state["rewarm_from"] == 1
    assert "initialised from" in (tmp_path / "c" / "run" / "log.txt").read_text()


def test_a_unet_checkpoint_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"phase": 2, "step": 5, "seed": 0}, run / "checkpoint.pt")
    with pytest.raises(SystemExit, match="not an SD3 run"):
        train_mmdit.main(["--out", str(run)] + TINY)


def test_the_quality_gate_reads_an_sd3_export(tmp_path):
    """benchmarks.quality_gate loads an SD3 folder by its model_index.json, records the colour words'
    joint-attention maps at the CLIP positions, and puts diffusers' processors back."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    from benchmarks import quality_gate

    run_training(tmp_path, "--steps", "1")
    pipe, folder = quality_gate.load_model(str(tmp_path / "export"))
    assert type(pipe).__name__ == "StableDiffusion3Pipeline" and folder == str(tmp_path / "export")
    pipe.set_progress_bar_config(disable=True)
    recorder = quality_gate.attention_recorder(pipe)
    recorder.reset(2)
    pipe(["a red circle", "a blue square"], num_inference_steps=2, guidance_scale=3.0, output_type="np")
    assert len(recorder.sums) == 2  # one per block
    assert all(m.shape == (2, 64, 77) for m in recorder.sums.values())  # cond half, 8x8 patches, CLIP keys
    centroids = recorder.centroids(torch.tensor([2, 2]))
    assert centroids.shape == (2, 2) and ((centroids > 0) & (centroids < 1)).all()
    recorder.restore()
    assert all(isinstance(p, JointAttnProcessor2_0) for p in pipe.transformer.attn_processors.values())
    result, (images, captions, ok) = quality_gate.evaluate(pipe, seeds=2, steps=2, guidance_scale=3.0)
    assert images.shape == (2, 64, 64, 3) and result["images"] == 2
    # Guidance 1 runs no CFG (the batch is not doubled): the recorder keeps every row.
    result, (images, captions, ok) = quality_gate.evaluate(pipe, seeds=2, steps=2, guidance_scale=1.0)
    assert images.shape == (2, 64, 64, 3) and result["images"] == 2


def test_the_shipped_mmdit_model_loads_offline_and_draws():
    from diffusers import StableDiffusion3Pipeline

    from sgfast.settings import GuidanceSettings
    from sgfast.shapes import load_pipeline
    from sgfast.shapes.mmdit import mmdit_model_path

    pipe, description = load_pipeline("default-mmdit")
    assert isinstance(pipe, StableDiffusion3Pipeline) and "MMDiT" in description
    assert pipe.text_encoder_3 is None and pipe.transformer.config.joint_attention_dim == 128
    weights = sum(p.stat().st_size for p in pathlib.Path(mmdit_model_path()).rglob("*.safetensors"))
    assert weights <= 20e6
    GuidanceSettings.read(os.path.join(mmdit_model_path(), "self_guidance.json"))
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
