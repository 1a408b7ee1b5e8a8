"""Train the built-in default model on synthetic shape scenes (`sgfast.shapes.scenes`).

    python -m sgfast train --out training/run --seed 0            # start, or resume from the latest checkpoint
    python -m sgfast train --out training/run --export            # export the latest checkpoint and exit
    python -m sgfast train --out training/more --init-from sgfast/shapes/assets/default --lr 3e-4
                                                                  # continue from an exported model

Every part is the real diffusers / transformers class: AutoencoderKL (64x64 RGB -> 16x16x4 latents),
CLIPTextModel with a CLIPTokenizer over the caption words, UNet2DConditionModel with cross-attention
at 16x16 and 8x8, DDIMScheduler, epsilon prediction.

Phase 1 trains the VAE (reconstruction + a small KL term) and measures the latent scaling factor on
fresh scenes. Phase 2 trains the UNet and the text encoder (from scratch) together on the frozen
VAE's latents, with 10% of the captions dropped to the empty prompt so that classifier-free guidance
works, Min-SNR loss weighting and an EMA of both.

Runs are reproducible from the seed: each step draws its scenes and noise from generators seeded
with (seed, phase, step), so a run resumed from a checkpoint continues exactly. A checkpoint
(`<out>/checkpoint.pt`, weights + optimiser + EMA) is written every few minutes, losses go to
`<out>/log.txt`, and the EMA model is exported as a StableDiffusionPipeline (safetensors) to
`sgfast/shapes/assets/default/` every so often, with a sample sheet in `<out>/samples/`.
"""

import argparse
import json
import math
import os
import shutil
import time

import numpy as np
import torch
import torch.nn.functional as F

from sgfast.shapes import scenes
from sgfast.shapes.model import default_model_path, write_guidance_settings

DEFAULT_EXPORT = default_model_path()
MAX_LENGTH = 77
PHASE_VAE, PHASE_UNET = 1, 2


# ---------------------------------------------------------------------------------------------
# Models


def build_tokenizer(folder):
    from transformers import CLIPTokenizer

    from sgfast.testing import write_clip_vocabulary

    write_clip_vocabulary(folder, scenes.CAPTION_WORDS)
    return CLIPTokenizer(
        vocab=os.path.join(folder, "vocab.json"),
        merges=os.path.join(folder, "merges.txt"),
        model_max_length=MAX_LENGTH,
    )


def build_models(seed, tokenizer):
    """The untrained VAE, text encoder and UNet (seeded), and the scheduler."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=scenes.SIZE,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_LENGTH,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=scenes.SIZE // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=4,  # diffusers passes this as the number of heads
        norm_num_groups=8,
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    return vae, text_encoder, unet, scheduler


def to_pixels(images):
    """uint8 (n, H, W, 3) -> float (n, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def save_pipeline(pipe, target, info, write_settings):
    """save_pretrained into `target` with `training.json` (info) and the model's guidance settings
    (`write_settings(folder)`: `from_pipe` reads them as its defaults), swapped in whole so that readers
    never see half a model; the folder's size in bytes."""
    tmp = target.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    with open(os.path.join(tmp, "training.json"), "w") as f:
        json.dump(info, f, indent=1)
    write_settings(tmp)
    old = target.rstrip("/") + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(target):
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(target) for f in fs)


class EMA:
    def __init__(self, model, decay):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model, step):
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(d).add_(v.detach(), alpha=1 - d)
            else:
                self.shadow[k].copy_(v)


class CrossAttentionRecorder:
    """Attention processor for the UNet's cross-attention layers during training: the same output
    as scaled-dot-product attention, computed explicitly so that the head-averaged probabilities
    (batch, queries, keys) of the layers at `min_queries` or more positions are kept for the
    attention-localisation loss while `active`."""

    def __init__(self, store, min_queries=64):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.store = store
        self.min_queries = min_queries
        self.default = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if (
            encoder_hidden_states is None
            or not self.store["active"]
            or hidden_states.ndim != 3
            or hidden_states.shape[1] < self.min_queries
        ):
            return self.default(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        residual = hidden_states
        b, n, _ = hidden_states.shape
        h = attn.heads
        q = attn.to_q(hidden_states)
        k = attn.to_k(encoder_hidden_states)
        v = attn.to_v(encoder_hidden_states)
        d = q.shape[-1] // h
        q, k, v = (x.view(b, -1, h, d).transpose(1, 2) for x in (q, k, v))
        probs = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)  # (b, h, n, keys)
        out = (probs @ v).transpose(1, 2).reshape(b, n, h * d)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        self.store["maps"].append(probs.mean(1))
        return out / attn.rescale_output_factor


def word_positions(objects, colour_kept):
    """Token positions (objects, 2) of each object's colour and shape words in the caption that
    `caption_for` writes from `objects` with the colour words of `colour_kept` (bools) only:
    "<bos> a colour shape and a shape ..."; -1 for a left-out colour word and for absent objects."""
    positions = np.full((scenes.MAX_OBJECTS, 2), -1, dtype=np.int64)
    at = 1  # after <bos>
    for j, kept in enumerate(colour_kept[: len(objects)]):
        at += 1  # "a"
        if kept:
            positions[j, 0] = at
            at += 1
        positions[j, 1] = at
        at += 2  # the shape word and "and"
    return positions


def drop_colour_words(captions, rng, rate):
    """Leave out each object's colour word with probability `rate` ("a circle and a blue square"), so
    that the model also learns objects whose colour the caption does not fix: copying an appearance
    into such an object then has no colour word to fight. Returns (captions, positions (batch,
    objects, 2) long, as `word_positions`)."""
    out, positions = [], []
    for caption in captions:
        objects = scenes.parse_caption(caption) if caption else []
        kept = [bool(k) for k in rng.random(len(objects)) >= rate]
        out.append(" and ".join(f"a {c} {s}" if k else f"a {s}" for (c, s), k in zip(objects, kept)))
        positions.append(word_positions(objects, kept))
    return out, torch.from_numpy(np.stack(positions))


def default_positions(batch, objects):
    """Positions 4j+2 and 4j+3 of "<bos> a colour shape and a colour shape ...": (batch, objects, 2)."""
    idx = torch.arange(objects) * 4 + 2
    return torch.stack([idx, idx + 1], 1).expand(batch, objects, 2)


def attention_localisation_loss(maps, masks, keep, kind="outside", floor=0.05, positions=None):
    """Mean over supervised layers, objects and words of how far a word's attention map is from its
    object: each object's colour and shape tokens (by default positions 4j+2 and 4j+3 of
    "<bos> a colour shape and a colour shape ..."; `positions` (batch, objects, 2) gives others, -1
    for a word the caption leaves out), maps (batch, queries, keys), masks float
    (batch, objects, H, W) of the image, `keep` (batch,) bool: captions not dropped.

    kind "outside": the share of the map outside the object. Driving it to zero saturates the
    softmax (off-object probabilities ~1e-15, the map peaked on a pixel or two), which leaves
    guidance energies little to move. kind "mask-kl": KL divergence from the target distribution
    (1 - floor) * mask / area + floor / positions to the map normalised over positions: it asks the
    map to cover the whole object and keeps a floor everywhere, and its gradient does not vanish
    where the map is saturated (d log p / d logit = 1 - p)."""
    if kind not in ("outside", "mask-kl"):
        raise ValueError(f"unknown attention loss {kind!r}: use 'outside' or 'mask-kl'")
    if kind == "mask-kl" and not 0 < floor < 1:
        raise ValueError(f"the mask-kl floor must be in (0, 1), got {floor!r}")
    n, objects = masks.shape[:2]
    if positions is None:
        positions = default_positions(n, objects)
    idx = positions.reshape(n, -1)  # colour, shape per object
    present = masks.flatten(2).amax(-1) > 0  # (batch, objects)
    valid = ((present & keep[:, None]).repeat_interleave(2, 1) & (idx >= 0)).float()  # (batch, objects*2)
    idx = idx.clamp_min(0)
    if valid.sum() == 0:
        return masks.new_zeros(())
    losses = []
    for m in maps:
        side = int(round(m.shape[1] ** 0.5))
        soft = F.adaptive_avg_pool2d(masks, side).flatten(2).repeat_interleave(2, 1)  # (batch, objects*2, Q)
        tok = m.transpose(1, 2).gather(1, idx[:, :, None].expand(-1, -1, m.shape[1]))  # (batch, objects*2, Q)
        if kind == "outside":
            inside = (tok * soft).sum(-1) / tok.sum(-1).clamp_min(1e-8)
            per_word = 1 - inside
        else:
            target = (1 - floor) * soft / soft.sum(-1, keepdim=True).clamp_min(1e-8) + floor / soft.shape[-1]
            log_map = tok.clamp_min(1e-30).log() - tok.sum(-1, keepdim=True).clamp_min(1e-30).log()
            per_word = (target * (target.log() - log_map)).sum(-1)
        losses.append((per_word * valid).sum() / valid.sum())
    return torch.stack(losses).mean()


def lr_at(step, base, warmup, total, floor=0.1):
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------------------------------------
# Trainer


class Trainer:
    def __init__(self, args):
        self.args = args
        self.out = args.out
        os.makedirs(self.out, exist_ok=True)
        os.makedirs(os.path.join(self.out, "samples"), exist_ok=True)
        self.ckpt_path = os.path.join(self.out, "checkpoint.pt")
        self.log_path = os.path.join(self.out, "log.txt")
        self.tokenizer = build_tokenizer(os.path.join(self.out, "tokenizer"))
        self.vae, self.text_encoder, self.unet, self.scheduler = build_models(args.seed, self.tokenizer)
        self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
        self.opt = torch.optim.AdamW(
            list(self.unet.parameters()) + list(self.text_encoder.parameters()), lr=args.lr, weight_decay=0.01
        )
        self.unet.to(memory_format=torch.channels_last)  # ~10% faster convolutions on the CPU
        self.attn_store = {"active": False, "maps": []}
        recorder = CrossAttentionRecorder(self.attn_store)
        self.unet.set_attn_processor(
            {name: (recorder if ".attn2." in name else proc) for name, proc in self.unet.attn_processors.items()}
        )
        self.unet_ema = EMA(self.unet, args.ema)
        self.text_ema = EMA(self.text_encoder, args.ema)
        self.phase, self.step = PHASE_VAE, 0
        self.scaling_factor = None
        self.best_rate = None  # best validation read-back rate of an export to --export-to
        self.elapsed = 0.0  # training seconds over all resumes
        self.rewarm_from = 0  # UNet step at which a run started from an export: the fresh optimiser warms up again
        self.token_cache = {}
        alphas = self.scheduler.alphas_cumprod
        self.snr = alphas / (1 - alphas)
        if os.path.exists(self.ckpt_path):
            self.load()
        elif args.init_from:
            self.init_from_export(args.init_from)

    # -- persistence ---------------------------------------------------------------------------
    def state(self):
        return dict(
            phase=self.phase,
            step=self.step,
            seed=self.args.seed,
            elapsed=self.elapsed,
            scaling_factor=self.scaling_factor,
            best_rate=self.best_rate,
            rewarm_from=self.rewarm_from,
            vae=self.vae.state_dict(),
            vae_opt=self.vae_opt.state_dict(),
            unet=self.unet.state_dict(),
            text_encoder=self.text_encoder.state_dict(),
            opt=self.opt.state_dict(),
            unet_ema=self.unet_ema.shadow,
            text_ema=self.text_ema.shadow,
        )

    def save(self):
        tmp = self.ckpt_path + ".tmp"
        torch.save(self.state(), tmp)
        os.replace(tmp, self.ckpt_path)

    def load(self):
        s = torch.load(self.ckpt_path, map_location="cpu", weights_only=False)
        if s["seed"] != self.args.seed:
            raise SystemExit(f"{self.ckpt_path} was trained with --seed {s['seed']}, not {self.args.seed}")
        self.phase, self.step, self.elapsed = s["phase"], s["step"], s["elapsed"]
        self.scaling_factor = s["scaling_factor"]
        self.best_rate = s.get("best_rate")
        self.rewarm_from = s.get("rewarm_from", 0)
        self.vae.load_state_dict(s["vae"])
        self.vae_opt.load_state_dict(s["vae_opt"])
        self.unet.load_state_dict(s["unet"])
        self.text_encoder.load_state_dict(s["text_encoder"])
        self.opt.load_state_dict(s["opt"])
        self.unet_ema.shadow = s["unet_ema"]
        self.text_ema.shadow = s["text_ema"]
        self.log(f"resumed phase={self.phase} step={self.step} from {self.ckpt_path}")

    def init_from_export(self, folder):
        """Start phase 2 from an exported pipeline (e.g. the shipped model): its VAE, scaling factor,
        text encoder and UNet (the export's EMA weights, which also seed the EMA), at the export's step,
        with a fresh optimiser. The export's tokenizer must be the one the caption words build."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        exported = CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer"), local_files_only=True)
        if exported.get_vocab() != self.tokenizer.get_vocab():
            raise SystemExit(f"{folder}: its tokenizer differs from the one built from the caption words")
        vae = AutoencoderKL.from_pretrained(os.path.join(folder, "vae"), local_files_only=True)
        text_encoder = CLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder"), local_files_only=True)
        unet = UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet"), local_files_only=True)
        self.vae.load_state_dict(vae.state_dict())
        self.text_encoder.load_state_dict(text_encoder.state_dict())
        self.unet.load_state_dict(unet.state_dict())
        self.unet_ema.shadow = {k: v.detach().clone() for k, v in self.unet.state_dict().items()}
        self.text_ema.shadow = {k: v.detach().clone() for k, v in self.text_encoder.state_dict().items()}
        self.scaling_factor = float(vae.config.scaling_factor)
        with open(os.path.join(folder, "training.json")) as f:
            info = json.load(f)
        self.phase, self.step, self.rewarm_from = PHASE_UNET, int(info["step"]), int(info["step"])
        self.elapsed = float(info.get("train_minutes", 0.0)) * 60
        self.log(f"initialised from {folder} at UNet step {self.step} (scaling factor {self.scaling_factor:.4f})")
        self.best_rate = self.validate(self.pipeline())  # a later export replaces it only when it scores as well
        self.save()

    def log(self, line):
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with open(self.log_path, "a") as f:
            f.write(f"{stamp} {line}\n")
        print(f"{stamp} {line}", flush=True)

    # -- data ----------------------------------------------------------------------------------
    def batch(self, phase, step, n, with_masks=False):
        rng = np.random.default_rng([self.args.seed, phase, step])
        weights = self.args.count_weights if phase == PHASE_UNET else None
        images, captions, masks = scenes.sample_batch(rng, n, with_masks=True, count_weights=weights)
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        if with_masks:
            return to_pixels(images), captions, gen, torch.from_numpy(masks).float()
        return to_pixels(images), captions, gen

    def token_ids(self, captions):
        missing = [c for c in set(captions) if c not in self.token_cache]
        if missing:
            ids = self.tokenizer(missing, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                                 return_tensors="pt").input_ids
            self.token_cache.update(zip(missing, ids))
        return torch.stack([self.token_cache[c] for c in captions])

    # -- phase 1: VAE --------------------------------------------------------------------------
    def vae_step(self):
        a = self.args
        pixels, _, gen = self.batch(PHASE_VAE, self.step, a.vae_batch)
        for g in self.vae_opt.param_groups:
            g["lr"] = lr_at(self.step, a.vae_lr, 50, a.vae_steps)
        self.vae.train()
        posterior = self.vae.encode(pixels).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = self.vae.decode(z).sample
        mse = F.mse_loss(recon, pixels)
        l1 = F.l1_loss(recon, pixels)
        kl = posterior.kl().mean() / z[0].numel()
        loss = mse + 0.5 * l1 + a.kl_weight * kl
        self.vae_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.vae.parameters(), 1.0)
        self.vae_opt.step()
        return dict(loss=loss.item(), mse=mse.item(), kl=kl.item())

    @torch.no_grad()
    def measure_scaling(self):
        self.vae.eval()
        rng = np.random.default_rng([self.args.seed, 0, 0])
        images, _ = scenes.sample_batch(rng, 512)
        pixels = to_pixels(images)
        latents, recon_err = [], []
        for chunk in pixels.split(64):
            z = self.vae.encode(chunk).latent_dist.mode()
            latents.append(z)
            recon_err.append(F.mse_loss(self.vae.decode(z).sample, chunk).item())
        latents = torch.cat(latents)
        std = latents.std().item()
        self.log(
            f"vae done: val mse {np.mean(recon_err):.5f} latent mean {latents.mean().item():.3f} "
            f"std {std:.3f} -> scaling_factor {1 / std:.4f}"
        )
        return 1.0 / std

    # -- phase 2: UNet + text encoder ----------------------------------------------------------
    def unet_step(self):
        a = self.args
        pixels, captions, gen, masks = self.batch(PHASE_UNET, self.step, a.batch, with_masks=True)
        drop = torch.rand(len(captions), generator=gen) < a.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        positions = None
        if a.colour_dropout > 0:  # its own generator: runs without it draw exactly as before
            rng = np.random.default_rng([a.seed, PHASE_UNET, self.step, 1])
            captions, positions = drop_colour_words(captions, rng, a.colour_dropout)
        with torch.no_grad():
            self.vae.eval()
            posterior = self.vae.encode(pixels).latent_dist
            latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
            latents = latents * self.scaling_factor
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(captions),), generator=gen)
        noisy = self.scheduler.add_noise(latents, noise, t).contiguous(memory_format=torch.channels_last)
        lr = lr_at(self.step, a.lr, a.warmup, a.unet_steps)
        if self.rewarm_from:  # started from an export: the fresh optimiser's moments warm up again
            lr *= min(1.0, (self.step - self.rewarm_from + 1) / a.warmup)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.unet.train()
        self.text_encoder.train()
        hidden = self.text_encoder(self.token_ids(captions))[0]
        supervise = a.attn_loss > 0 and self.step >= a.attn_loss_start
        self.attn_store["active"], self.attn_store["maps"] = supervise, []
        pred = self.unet(noisy, t, encoder_hidden_states=hidden).sample
        self.attn_store["active"] = False
        per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        snr = self.snr[t]
        weight = torch.clamp(snr, max=a.min_snr_gamma) / snr  # Min-SNR-gamma for epsilon prediction
        loss = (per_sample * weight).mean()
        attn = (
            attention_localisation_loss(self.attn_store["maps"], masks, ~drop, a.attn_loss_kind, a.attn_floor, positions)
            if supervise
            else torch.zeros(())
        )
        self.attn_store["maps"] = []
        diffusion_loss = loss
        loss = loss + a.attn_loss * attn
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        params = list(self.unet.parameters()) + list(self.text_encoder.parameters())
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        self.opt.step()
        self.unet_ema.update(self.unet, self.step)
        self.text_ema.update(self.text_encoder, self.step)
        return dict(loss=diffusion_loss.item(), mse=per_sample.mean().item(), attn=attn.item(), gnorm=float(grad_norm))

    # -- export --------------------------------------------------------------------------------
    def pipeline(self, ema=True):
        from diffusers import StableDiffusionPipeline
        from transformers import CLIPTextModel

        import copy

        unet = copy.deepcopy(self.unet)
        text_encoder = CLIPTextModel(self.text_encoder.config)
        text_encoder.load_state_dict(self.text_ema.shadow if ema else self.text_encoder.state_dict())
        if ema:
            unet.load_state_dict(self.unet_ema.shadow)
        unet.to(memory_format=torch.contiguous_format)
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())  # the training recorder stays behind
        vae = copy.deepcopy(self.vae)
        vae.register_to_config(scaling_factor=float(self.scaling_factor))
        for m in (unet, text_encoder, vae):
            m.eval().requires_grad_(False)
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=self.tokenizer,
            unet=unet,
            scheduler=self.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _save_pipeline(self, pipe, target, info):
        return save_pipeline(pipe, target, info, write_guidance_settings)

    def export(self, force=False):
        """Export the EMA model to `<out>/latest` and score it on validation captions; it replaces the
        shipped model (`--export-to`) when it scores at least as well as the best export so far, or
        when `force`d."""
        pipe = self.pipeline()
        rate = self.validate(pipe)
        info = dict(
            step=self.step,
            seed=self.args.seed,
            train_minutes=round(self.elapsed / 60, 1),
            exported=time.strftime("%Y-%m-%d %H:%M:%S"),
            caption_words=list(scenes.CAPTION_WORDS),
            ema=True,
            validation_rate=rate,
            args={k: v for k, v in vars(self.args).items() if k not in ("out", "export_to", "export")},
        )
        self._save_pipeline(pipe, os.path.join(self.out, "latest"), info)
        if force or self.best_rate is None or rate >= self.best_rate:
            self.best_rate = rate if self.best_rate is None else max(rate, self.best_rate)
            size = self._save_pipeline(pipe, self.args.export_to, info)
            self.log(f"exported step {self.step} (validation {rate:.1%}) to {self.args.export_to} ({size / 1e6:.1f} MB)")
        else:
            self.log(f"kept the shipped model: step {self.step} validates at {rate:.1%} < best {self.best_rate:.1%}")

    @torch.no_grad()
    def validate(self, pipe, n=None):
        """Read-back rate (right colours and count) on validation captions, which neither training
        nor the quality gate's held-out captions use; saves a sample sheet."""
        n = n or self.args.validation
        captions = [scenes.make_scene(scenes.VALIDATION_SEED + k).caption for k in range(n)]
        images, _, ok = scenes.generate_and_read(pipe, captions, seed=0, steps=25, guidance_scale=3.0)
        path = os.path.join(self.out, "samples", f"step{self.step:06d}.png")
        scenes.caption_sheet(images[:16], captions[:16], ok[:16]).save(path)
        rate = float(np.mean(ok))
        self.log(f"validation step {self.step}: read back {sum(ok)}/{n} = {rate:.1%} ({path})")
        return rate

    def run(self):
        a = self.args
        last_ckpt = last_export = time.time()
        t_prev = time.time()
        hist = []
        while True:
            if self.phase == PHASE_VAE and self.step >= a.vae_steps:
                self.scaling_factor = self.measure_scaling()
                self.phase, self.step = PHASE_UNET, 0
                hist = []
                self.save()
            if self.phase == PHASE_UNET and a.stop_at is not None and self.step >= a.stop_at:
                self.save()
                self.log(f"stopped at step {self.step} (--stop-at)")
                return
            if self.phase == PHASE_UNET and self.step >= a.unet_steps:
                self.save()
                self.export()
                self.log("done")
                return
            stats = self.vae_step() if self.phase == PHASE_VAE else self.unet_step()
            self.step += 1
            now = time.time()
            self.elapsed += now - t_prev
            hist.append((now - t_prev, stats))
            t_prev = now
            if self.step % a.log_every == 0:
                keys = hist[-1][1].keys()
                mean = {k: np.mean([s[k] for _, s in hist]) for k in keys}
                sec = np.mean([d for d, _ in hist])
                lr = (self.vae_opt if self.phase == PHASE_VAE else self.opt).param_groups[0]["lr"]
                self.log(
                    f"phase={self.phase} step={self.step} "
                    + " ".join(f"{k}={v:.5f}" for k, v in mean.items())
                    + f" lr={lr:.2e} s/step={sec:.2f}"
                )
                hist = []
            if now - last_ckpt > a.ckpt_minutes * 60:
                self.save()
                last_ckpt = time.time()
            if self.phase == PHASE_UNET and now - last_export > a.export_minutes * 60:
                self.save()
                self.export()
                last_ckpt = last_export = time.time()
                t_prev = time.time()  # export time is not training time


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m sgfast train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=["unet", "sd3"], default="unet",
                   help="unet: the built-in Stable Diffusion model; sd3: the built-in MMDiT model (--family sd3 --help)")
    p.add_argument("--out", default="training/run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=1000)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=float, default=1e-4)
    p.add_argument("--unet-steps", type=int, default=8000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--min-snr-gamma", type=float, default=5.0)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--colour-dropout", type=float, default=0.0,
                   help="chance that an object's colour word is left out of its caption (\"a circle and a blue square\")")
    p.add_argument("--count-weights", type=lambda text: [float(w) for w in text.split(",")], default=None,
                   help="relative frequency of 1, 2, 3-object scenes in UNet training, e.g. 1,2,3 (default: uniform)")
    # Attention localisation: each object's colour and shape words should attend inside the object.
    p.add_argument("--attn-loss", type=float, default=0.05, help="weight of the attention-localisation loss")
    p.add_argument("--attn-loss-start", type=int, default=0, help="UNet step from which it applies")
    p.add_argument("--attn-loss-kind", choices=["outside", "mask-kl"], default="outside",
                   help="'outside': share of a word's map outside its object; 'mask-kl': KL from the object's "
                        "mask (with a floor) to the map, which keeps maps spread over the object")
    p.add_argument("--attn-floor", type=float, default=0.05, help="uniform share of the mask-kl target")
    p.add_argument("--ckpt-minutes", type=float, default=4.0)
    p.add_argument("--export-minutes", type=float, default=12.0)
    p.add_argument("--export-to", default=DEFAULT_EXPORT)
    p.add_argument("--init-from", default=None, help="start phase 2 from this exported model when --out has no checkpoint")
    p.add_argument("--export", action="store_true", help="export the latest checkpoint (unconditionally) and exit")
    p.add_argument("--stop-at", type=int, default=None, help="save and stop at this UNet step (to replay a run's stages)")
    p.add_argument("--validation", type=int, default=48, help="validation captions scored at each export")
    # One thread: on 2 shared cores, two OpenMP threads that wait on each other at every op ran the
    # UNet's backward ~9x slower than one thread whenever other processes kept the cores busy.
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--log-every", type=int, default=25)
    args = p.parse_args(argv)
    if args.family != "unet":
        raise SystemExit("--family sd3 is sgfast.shapes.train_mmdit's: run `python -m sgfast train --family sd3`")
    torch.set_num_threads(args.threads)
    trainer = Trainer(args)
    if args.export:
        if trainer.phase != PHASE_UNET:
            raise SystemExit("nothing to export yet: the run is still training its VAE")
        trainer.export(force=True)
        return
    trainer.log(f"start phase={trainer.phase} step={trainer.step} args={vars(args)}")
    trainer.run()

