"""The models the benchmarks run: the tiny offline pipeline, the shipped default model, and the
public SD1.5 / SDXL architectures with random weights (speed, memory and FLOPs do not depend on
the weights' values).

Every model comes back as a real diffusers `StableDiffusionPipeline` so that every row (plain,
Attend-and-Excite, sgfast) runs the same components through its own public API. Weights are left as
`from_pretrained` leaves them (parameters requiring grad); sgfast's fast mode freezes them itself.
"""

import importlib.util
import json
import os
from pathlib import Path

import torch

MODELS = ("tiny", "default", "sd15", "sdxl")
PROMPT = "a red circle and a blue square"
EDITED_WORD = "circle"
SEED = 0

# Where the public architectures' configs live: benchmarks/architectures (a copy inside the repo, so
# that a checkout carried alone to a GPU machine has them), else an `architectures` folder beside the
# checkout, `../shared/architectures` (override with --arch-dir or SGFAST_ARCH_DIR).
REPO = Path(__file__).resolve().parents[1]
ARCH_DIRS = (REPO / "benchmarks" / "architectures", REPO.parent / "shared" / "architectures")


def default_arch_dir():
    env = os.environ.get("SGFAST_ARCH_DIR")
    if env:
        return Path(env)
    return next((path for path in ARCH_DIRS if (path / "sd15_unet.json").exists()), ARCH_DIRS[-1])


def load_config(arch_dir, name):
    path = Path(arch_dir) / name
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: pass --arch-dir pointing at the shared architectures folder")
    with open(path) as f:
        return json.load(f)


def default_model_available():
    """(available, reason). The shipped default model: sgfast/shapes/assets/default/model_index.json and
    sgfast.shapes.load_default_pipeline()."""
    index = REPO / "sgfast" / "shapes" / "assets" / "default" / "model_index.json"
    if importlib.util.find_spec("sgfast.shapes.model") is None:
        return False, "sgfast.shapes.model does not exist yet"
    if not index.exists():
        return False, "sgfast/shapes/assets/default/model_index.json does not exist yet"
    return True, ""


def default_resolution(model):
    return {"tiny": 64, "default": None, "sd15": 512, "sdxl": 1024}[model]


def _sdxl_added_conditioning(unet, resolution):
    """SDXL's UNet also takes pooled text embeddings and size/crop ids. A StableDiffusionPipeline
    (and Attend-and-Excite's) does not pass them: supply zeros / the image size on every call."""
    forward = unet.forward
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim

    def with_added_conditioning(sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=None, **kwargs):
        if added_cond_kwargs is None:
            batch, device, dtype = sample.shape[0], sample.device, encoder_hidden_states.dtype
            ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], device=device, dtype=dtype)
            added_cond_kwargs = {
                "text_embeds": torch.zeros(batch, pooled, device=device, dtype=dtype),
                "time_ids": ids.expand(batch, 6),
            }
        return forward(sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=added_cond_kwargs, **kwargs)

    unet.forward = with_added_conditioning


def random_pipeline(arch, arch_dir, device="cpu", dtype=torch.float32, resolution=None):
    """SD1.5 (or an SDXL-sized UNet in an SD1.x pipeline) with random weights, built on `device`.

    `sdxl`: the SDXL base UNet with the SD VAE (same architecture as SDXL's), a one-layer CLIP text
    encoder 2048 wide (its cost is negligible) and zero pooled embeddings; only the UNet is the
    real SDXL one, which is what every row's step cost is made of."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sgfast.testing import build_tokenizer

    tokenizer = build_tokenizer()
    unet_config = load_config(arch_dir, "sd15_unet.json" if arch == "sd15" else "sdxl_unet.json")
    vae_config = load_config(arch_dir, "sd15_vae.json")
    text_fields = load_config(arch_dir, "sd15_text_encoder.json")
    for key in ("architectures", "model_type", "_class_name"):
        text_fields.pop(key, None)
    if arch == "sdxl":
        text_fields.update(hidden_size=2048, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=1)
    text_fields.update(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    torch.manual_seed(SEED)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(vae_config)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_fields))
    for model in (unet, vae, text_encoder):
        model.to(dtype).eval()
    if resolution:
        unet.register_to_config(sample_size=resolution // 8)  # the pipelines' default image size
    if arch == "sdxl":
        _sdxl_added_conditioning(unet, resolution or 1024)
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _text_config(arch_dir, name, tokenizer):
    from transformers import CLIPTextConfig

    fields = load_config(arch_dir, name)
    for key in ("architectures", "model_type", "_class_name"):
        fields.pop(key, None)
    fields.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return CLIPTextConfig(**fields)


def sdxl_pipeline(arch_dir, device="cpu", dtype=torch.float32, resolution=None):
    """The real diffusers StableDiffusionXLPipeline with random weights, built on `device` from the
    public configs: the SDXL base UNet, the SDXL VAE, CLIP ViT-L/14 (`sd15_text_encoder.json`) and
    OpenCLIP ViT-bigG/14 with projection (`sdxl_text_encoder_2.json`), Euler as SDXL ships."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from sgfast.testing import SDXL_SCHEDULER, build_tokenizer

    tokenizer, tokenizer_2 = build_tokenizer(), build_tokenizer(pad_token="!")
    torch.manual_seed(SEED)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(load_config(arch_dir, "sdxl_unet.json"))
        vae = AutoencoderKL.from_config(load_config(arch_dir, "sdxl_vae.json"))
        text_encoder = CLIPTextModel(_text_config(arch_dir, "sd15_text_encoder.json", tokenizer))
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(arch_dir, "sdxl_text_encoder_2.json", tokenizer_2))
    for model in (unet, vae, text_encoder, text_encoder_2):
        model.to(dtype).eval()
    if resolution:
        unet.register_to_config(sample_size=resolution // 8)  # the pipeline's default image size
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
        unet=unet, scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER), add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_pipeline(model, resolution=None, device="cpu", dtype=torch.float32, arch_dir=None):
    """The model's StableDiffusionPipeline on `device` in `dtype`, weights requiring grad as
    `from_pretrained` leaves them."""
    if model == "tiny":
        from sgfast.testing import tiny_pipeline

        pipe = tiny_pipeline(seed=SEED, image_size=resolution or 64)
    elif model == "default":
        available, reason = default_model_available()
        if not available:
            raise RuntimeError(f"the default model is not available: {reason}")
        from sgfast.shapes import load_default_pipeline

        pipe = load_default_pipeline()
    elif model in ("sd15", "sdxl"):
        pipe = random_pipeline(model, arch_dir or default_arch_dir(), device, dtype, resolution)
    else:
        raise ValueError(f"unknown model {model!r}; choose from {MODELS}")
    pipe = pipe.to(device=device, dtype=dtype) if model in ("tiny", "default") else pipe
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image_size(pipe):
    return pipe.unet.config.sample_size * pipe.vae_scale_factor
