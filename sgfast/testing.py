"""Tiny Stable Diffusion (1.x/2.x and XL) pipelines built offline from configs, for tests and examples.

Every part is the real diffusers / transformers class (UNet2DConditionModel, AutoencoderKL,
CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, DDIMScheduler, EulerDiscreteScheduler);
only the sizes are tiny and the weights seeded.
"""

import json
import os
import tempfile

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

# Words the tiny tokenizer knows as single tokens; any other text still tokenizes, character by
# character, through the byte-level base vocabulary.
TINY_WORDS = (
    "a an the and of on in with to photo picture painting drawing style "
    "cat dog bird car house tree apple bowl cup table chair hat ball boat "
    "red green blue yellow purple orange white black pink brown "
    "circle square triangle big small left right"
).split()


def _bytes_to_unicode():
    # The byte -> printable-character table of GPT-2/CLIP byte-level BPE.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _byte_pair_encode(word, merges):
    """Split `word` as CLIP's BPE does with `merges`: repeatedly join the best-ranked adjacent pair."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        rank, pair = min((merges.get(pair, float("inf")), pair) for pair in zip(pieces, pieces[1:]))
        if rank == float("inf"):
            break
        joined, i = [], 0
        while i < len(pieces):
            if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == pair:
                joined.append(pieces[i] + pieces[i + 1])
                i += 2
            else:
                joined.append(pieces[i])
                i += 1
        pieces = joined
    return pieces


def write_clip_vocabulary(folder, words):
    """Write vocab.json and merges.txt of a CLIP BPE tokenizer that knows each of `words` as one token.

    The base vocabulary is every byte character (plain and word-final), so text outside `words`
    still tokenizes; each word gets the chain of merges that builds it left to right.
    """
    chars = _bytes_to_unicode()
    vocab = {}
    for token in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(token, len(vocab))
    merges = {}  # (left, right) -> rank
    for word in words:
        pieces = _byte_pair_encode(word.lower(), merges)
        # Merge the first adjacent pair until the word is one token. New merges rank after all
        # earlier ones, so they never change how earlier words are split.
        while len(pieces) > 1:
            merges[(pieces[0], pieces[1])] = len(merges)
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
            pieces = _byte_pair_encode(word.lower(), merges)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))  # in rank order
    return vocab


def build_tokenizer(words=TINY_WORDS, max_length=77, **kwargs):
    """A real CLIPTokenizer from a locally written vocabulary (no network); `kwargs` go to it
    (SDXL's second tokenizer pads with "!": `pad_token="!"`)."""
    with tempfile.TemporaryDirectory() as folder:
        write_clip_vocabulary(folder, words)
        return CLIPTokenizer(
            vocab=os.path.join(folder, "vocab.json"),
            merges=os.path.join(folder, "merges.txt"),
            model_max_length=max_length,
            **kwargs,
        )


# UNet block layouts, as in the real checkpoints' configs but tiny. "tiny": two blocks, one downsample.
# "sd15": SD1.x's four blocks (three with cross-attention, three downsamples). "sd2": SD2's linear
# projections, upcast attention and per-block head counts, for v-prediction. "lcm": a guidance-embedded
# UNet (`time_cond_proj_dim`, as LCM distillations have).
LAYOUTS = {
    "tiny": dict(
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
    ),
    "sd15": dict(
        block_out_channels=(16, 16, 32, 32),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=4,
    ),
    "sd2": dict(
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        upcast_attention=True,
    ),
    "lcm": dict(
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
        time_cond_proj_dim=16,
    ),
}

# Scheduler settings per layout: SD2 predicts v; "zero_snr" is SD2 with a zero-terminal-SNR schedule
# (Lin et al. 2023: rescaled betas, trailing timesteps).
SCHEDULER_CONFIGS = {
    "sd2": dict(prediction_type="v_prediction"),
    "zero_snr": dict(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing"),
}


def _clip_config(tokenizer, hidden_size, **kwargs):
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **kwargs,
    )


def tiny_vae(image_size, **config):
    """A tiny AutoencoderKL (factor 4, 4 latent channels); `config`: further AutoencoderKL fields."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=image_size,
        **config,
    )


def tiny_components(seed=0, image_size=64, words=TINY_WORDS, layout="tiny"):
    """The parts of a tiny SD pipeline: 64x64 images, 16x16x4 latents; with the "tiny" layout,
    cross-attention at 16x16 and 8x8. `layout`: a key of LAYOUTS, or "zero_snr" (the "sd2" UNet)."""
    if layout not in LAYOUTS and layout not in SCHEDULER_CONFIGS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {sorted(set(LAYOUTS) | set(SCHEDULER_CONFIGS))}")
    tokenizer = build_tokenizer(words)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=image_size // 4,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        cross_attention_dim=32,
        norm_num_groups=8,
        **LAYOUTS["sd2" if layout == "zero_snr" else layout],
    )
    vae = tiny_vae(image_size)
    text_encoder = CLIPTextModel(_clip_config(tokenizer, 32))
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1, **SCHEDULER_CONFIGS.get(layout, {}),
    )
    for model in (unet, vae, text_encoder):
        model.eval().requires_grad_(False)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def tiny_pipeline(seed=0, image_size=64, layout="tiny"):
    """A real diffusers StableDiffusionPipeline with tiny seeded weights, built offline (`layout`: see
    LAYOUTS and SCHEDULER_CONFIGS)."""
    pipe = StableDiffusionPipeline(
        **tiny_components(seed, image_size, layout=layout),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# SDXL's layout, tiny: no attention in the first (finest) block, linear projections, several
# transformer layers per block at the coarsest level, and the "text_time" added conditioning
# (pooled text embedding + six micro-conditioning numbers).
SDXL_UNET = dict(
    block_out_channels=(16, 32, 32),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4, 8),
    transformer_layers_per_block=(1, 1, 2),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
)
# SDXL's Euler scheduler config as the base checkpoint ships it.
SDXL_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
    timestep_spacing="leading", interpolation_type="linear", use_karras_sigmas=False,
)


def tiny_sdxl_components(seed=0, image_size=64, words=TINY_WORDS):
    """The parts of a tiny SDXL pipeline: 64x64 images, 16x16x4 latents, cross-attention at 8x8 and
    4x4; two CLIP text encoders (the second with a projection, for the pooled embedding) whose hidden
    states are concatenated per token, as SDXL's are."""
    tokenizer = build_tokenizer(words)
    tokenizer_2 = build_tokenizer(words, pad_token="!")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_config(tokenizer, 32))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(tokenizer_2, 32, projection_dim=16))
    unet = UNet2DConditionModel(
        sample_size=image_size // 4,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        cross_attention_dim=32 + 32,
        projection_class_embeddings_input_dim=6 * 8 + 16,
        norm_num_groups=8,
        **SDXL_UNET,
    )
    vae = tiny_vae(image_size, scaling_factor=0.13025, force_upcast=True)  # SDXL's VAE settings
    scheduler = EulerDiscreteScheduler(**SDXL_SCHEDULER)
    for model in (unet, vae, text_encoder, text_encoder_2):
        model.eval().requires_grad_(False)
    return dict(
        unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, scheduler=scheduler,
    )


def tiny_sdxl_pipeline(seed=0, image_size=64):
    """A real diffusers StableDiffusionXLPipeline with tiny seeded weights, built offline (no watermark)."""
    pipe = StableDiffusionXLPipeline(**tiny_sdxl_components(seed, image_size), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def refusals(pipe, wrapper, **kwargs):
    """The messages of the ValueErrors a diffusers pipeline and its wrapper raise for the same call
    (None where there is none), and how many UNet calls the wrapper made (for tests: refused as
    diffusers refuses, before anything runs)."""
    expected = _value_error(pipe, kwargs)
    calls = []
    hook = wrapper.pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        got = _value_error(wrapper, kwargs)
    finally:
        hook.remove()
    return expected, got, len(calls)


def _value_error(call, kwargs):
    try:
        call(**kwargs)
    except ValueError as error:
        return str(error)
    return None


# --- MMDiT pipelines (SD3 / SD3.5, FLUX.1): tiny, offline ------------------------------------------

def build_t5_tokenizer(words=TINY_WORDS, max_length=512):
    """A real T5Tokenizer (sentencepiece-style unigram) from a locally built vocabulary (no network):
    each of `words` is one piece ("▁circle"), and any other text still tokenizes through single
    characters with and without the word-start mark."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -1.0) for w in dict.fromkeys(w.lower() for w in words)]
    chars = "abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'-"
    vocab += [("▁" + c, -4.0) for c in chars if "▁" + c not in dict(vocab)] + [(c, -5.0) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


def _t5_encoder(tokenizer, seed):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_ff=48, d_kv=8, num_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu", pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    return T5EncoderModel(config)


# SD3 variants: the first is SD3-medium's layout, then SD3.5-medium's (dual attention in the first
# blocks, QK RMS-norm) and SD3.5-large's (QK RMS-norm).
SD3_VARIANTS = {
    "sd3": dict(),
    "sd35-medium": dict(dual_attention_layers=(0,), qk_norm="rms_norm"),
    "sd35-large": dict(qk_norm="rms_norm"),
}
# FlowMatchEulerDiscreteScheduler as the checkpoints ship it: SD3 with a fixed shift, FLUX with the
# resolution-dependent one (`mu` from the image's token count).
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                      base_image_seq_len=256, max_image_seq_len=4096)


def tiny_sd3_components(seed=0, image_size=64, words=TINY_WORDS, variant="sd3", num_layers=3):
    """The parts of a tiny StableDiffusion3Pipeline: 64x64 images, 16x16x4 latents, patch 2 (8x8 image
    tokens); two CLIP encoders with projections (hidden states concatenated per token: 16 + 16 = the
    T5 width 32) and a T5 encoder. `variant`: a key of SD3_VARIANTS."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    if variant not in SD3_VARIANTS:
        raise ValueError(f"unknown SD3 variant {variant!r}; choose one of {sorted(SD3_VARIANTS)}")
    tokenizer = build_tokenizer(words)
    tokenizer_2 = build_tokenizer(words, pad_token="!")
    tokenizer_3 = build_t5_tokenizer(words)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(_clip_config(tokenizer, 16, projection_dim=32))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(tokenizer_2, 16, projection_dim=32))
    text_encoder_3 = _t5_encoder(tokenizer_3, seed + 1)
    torch.manual_seed(seed + 2)
    transformer = SD3Transformer2DModel(
        sample_size=image_size // 4, patch_size=2, in_channels=4, num_layers=num_layers, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64,
        out_channels=4, pos_embed_max_size=32, **SD3_VARIANTS[variant],
    )
    vae = tiny_vae(image_size, scaling_factor=1.5305, shift_factor=0.0609)
    scheduler = FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER)
    for model in (transformer, vae, text_encoder, text_encoder_2, text_encoder_3):
        model.eval().requires_grad_(False)
    return dict(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


def tiny_sd3_pipeline(seed=0, image_size=64, variant="sd3", num_layers=3):
    """A real diffusers StableDiffusion3Pipeline with tiny seeded weights, built offline."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(**tiny_sd3_components(seed, image_size, variant=variant, num_layers=num_layers))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_components(seed=0, words=TINY_WORDS, guidance_embeds=True, num_layers=2, num_single_layers=2):
    """The parts of a tiny FluxPipeline: 4 latent channels packed 2x2 into 16-wide tokens (64x64 images:
    8x8 image tokens), rotary embeddings on text and image, a CLIP encoder for the pooled vector and a
    T5 encoder for the text tokens. `guidance_embeds`: FLUX.1-dev (True) or FLUX.1-schnell (False)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    tokenizer = build_tokenizer(words)
    tokenizer_2 = build_t5_tokenizer(words)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_config(tokenizer, 32))
    text_encoder_2 = _t5_encoder(tokenizer_2, seed + 1)
    torch.manual_seed(seed + 2)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=(4, 4, 8), guidance_embeds=guidance_embeds,
    )
    vae = tiny_vae(64, scaling_factor=0.3611, shift_factor=0.1159)
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    for model in (transformer, vae, text_encoder, text_encoder_2):
        model.eval().requires_grad_(False)
    return dict(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2, transformer=transformer,
    )


def tiny_flux_pipeline(seed=0, guidance_embeds=True, num_layers=2, num_single_layers=2):
    """A real diffusers FluxPipeline with tiny seeded weights, built offline (call it with height=64,
    width=64: FLUX's default size is 1024px whatever the model)."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline(**tiny_flux_components(seed, guidance_embeds=guidance_embeds, num_layers=num_layers,
                                               num_single_layers=num_single_layers))
    pipe.set_progress_bar_config(disable=True)
    return pipe
