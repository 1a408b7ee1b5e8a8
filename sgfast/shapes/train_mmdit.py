"""Train the built-in MMDiT model (`sgfast.shapes.mmdit`) on synthetic shape scenes.

    python -m sgfast train --family sd3 --out training/mmdit --seed 0      # start, or resume
    python -m sgfast train --family sd3 --out training/mmdit --export      # export the latest checkpoint
    python -m sgfast train --family sd3 --out training/more --init-from sgfast/shapes/assets/default-mmdit
                                                                           # continue from an export

Every part is the real diffusers / transformers class of a StableDiffusion3Pipeline:
SD3Transformer2DModel (patch 2 over the 16x16x4 latents: 64 image tokens), two
CLIPTextModelWithProjection encoders (their penultimate hidden states, concatenated, are the text
tokens; their projected pooled outputs, concatenated, the pooled vector), no T5, and a
FlowMatchEulerDiscreteScheduler. The VAE is the built-in UNet model's (`--vae-from`), frozen; its
latent shift and scale are measured on fresh scenes and written into the export's VAE config, as SD3
has them (`shift_factor`, `scaling_factor`).

Flow matching as in SD3: x_t = (1 - s) x0 + s eps with s drawn logit-normal (or uniform), the
transformer predicts v = eps - x0 at timestep 1000 s. 10% of the captions are dropped to the empty
prompt for classifier-free guidance. An attention loss pulls each object's colour and shape words'
columns of the joint attention (image queries x text keys) toward the object's mask, as the UNet
model's mask-kl loss does. EMA weights are exported.

Without T5 the pipeline gives the transformer `max_sequence_length` (256) rows of zeros after the 77
CLIP tokens. They stay identical through every block (no positions on text tokens), so training
stands them in by one row whose attention logit is raised by log 256: the same attention, exactly,
at a fraction of the cost (`tests/test_train_mmdit.py` checks it against the pipeline's layout).

Runs are reproducible from the seed (each step's scenes and noise come from generators seeded with
(seed, phase, step)); `<out>/checkpoint.pt` (weights, optimiser, EMA) every few minutes, losses in
`<out>/log.txt`, the EMA pipeline exported to `<out>/latest` and, when its validation loss is the
best so far, to `--export-to`.
"""

import argparse
import copy
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from sgfast.shapes import scenes
from sgfast.shapes.mmdit import mmdit_model_path, write_guidance_settings
from sgfast.shapes.model import default_model_path
from sgfast.shapes.train import (
    EMA,
    MAX_LENGTH,
    attention_localisation_loss,
    build_tokenizer,
    default_positions,
    drop_colour_words,
    lr_at,
    save_pipeline,
    to_pixels,
)

PHASE_MMDIT = 3  # its own family of data streams, apart from the UNet run's phases 1 and 2
T5_ZEROS = 256  # StableDiffusion3Pipeline's default max_sequence_length: rows of zeros without T5


# ---------------------------------------------------------------------------------------------
# Models


def build_text_encoder(tokenizer, hidden, layers, projection):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=4 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            max_position_embeddings=MAX_LENGTH,
            projection_dim=projection,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def build_models(args, tokenizer):
    """The untrained text encoders and transformer (seeded), and the scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    torch.manual_seed(args.seed)
    encoders = [build_text_encoder(tokenizer, args.text_hidden, args.text_layers, args.text_projection) for _ in range(2)]
    transformer = SD3Transformer2DModel(
        sample_size=scenes.SIZE // 4,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=args.layers,
        attention_head_dim=args.head_dim,
        num_attention_heads=args.heads,
        joint_attention_dim=2 * args.text_hidden,  # the two encoders' hidden states side by side
        caption_projection_dim=args.heads * args.head_dim,
        pooled_projection_dim=2 * args.text_projection,
        pos_embed_max_size=scenes.SIZE // 8,  # 8x8 patches: the 64x64 images it draws
        qk_norm="rms_norm",  # as SD3.5: keeps the small model's attention logits in range at lr 1e-3
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=args.shift)
    return encoders, transformer, scheduler


def load_vae(folder):
    from diffusers import AutoencoderKL

    loaded = AutoencoderKL.from_pretrained(os.path.join(folder, "vae"), local_files_only=True)
    # Rebuilt from its config: the export then records no path of the folder it came from.
    vae = AutoencoderKL.from_config({k: v for k, v in loaded.config.items() if not k.startswith("_")})
    vae.load_state_dict(loaded.state_dict())
    return vae.eval().requires_grad_(False)


class JointAttentionRecorder:
    """Training attention processor for the transformer's joint attention: the output of diffusers'
    JointAttnProcessor2_0, computed with an explicit softmax so that (a) the head-averaged
    probabilities of image queries at text keys (batch, image tokens, text tokens) are kept for the
    attention loss while `store["active"]`, and (b) the last text row can stand for
    `store["multiplicity"]` identical rows (the T5 zeros) through a log-count bias on its logit."""

    def __init__(self, store):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        b, n_image, _ = hidden_states.shape
        h = attn.heads
        split = lambda x: x.view(b, -1, h, x.shape[-1] // h).transpose(1, 2)  # noqa: E731
        q, k, v = (split(f(hidden_states)) for f in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        cq, ck, cv = (split(f(encoder_hidden_states)) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_added_q is not None:
            cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
        q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
        logits = q @ k.transpose(-1, -2) * attn.scale
        multiplicity = self.store.get("multiplicity", 1)
        if multiplicity != 1:
            bias = torch.zeros(logits.shape[-1], dtype=logits.dtype, device=logits.device)
            bias[-1] = math.log(multiplicity)
            logits = logits + bias
        probs = logits.softmax(-1)
        if self.store["active"]:
            self.store["maps"].append(probs[:, :, :n_image, n_image:].mean(1))
        out = (probs @ v).transpose(1, 2).reshape(b, -1, h * q.shape[-1])
        image, text = out[:, :n_image], out[:, n_image:]
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
        image = attn.to_out[1](attn.to_out[0](image))
        return image, text


# ---------------------------------------------------------------------------------------------
# Trainer


def portable(value):
    """A path under the working directory as a relative one (the export's record travels with it)."""
    if isinstance(value, str) and os.path.isabs(value) and value.startswith(os.getcwd() + os.sep):
        return os.path.relpath(value)
    return value


class Trainer:
    def __init__(self, args):
        self.args = args
        self.out = args.out
        os.makedirs(os.path.join(self.out, "samples"), exist_ok=True)
        self.ckpt_path = os.path.join(self.out, "checkpoint.pt")
        self.log_path = os.path.join(self.out, "log.txt")
        self.tokenizer = build_tokenizer(os.path.join(self.out, "tokenizer"))
        self.device = torch.device(args.device)
        self.encoders, self.transformer, self.scheduler = build_models(args, self.tokenizer)
        self.vae = load_vae(args.vae_from)
        for m in (self.transformer, self.vae, *self.encoders):
            m.to(self.device)
        self.params = list(self.transformer.parameters()) + [p for e in self.encoders for p in e.parameters()]
        self.opt = torch.optim.AdamW(self.params, lr=args.lr, weight_decay=0.01)
        self.attn_store = {"active": False, "maps": [], "multiplicity": T5_ZEROS}
        self.transformer.set_attn_processor(JointAttentionRecorder(self.attn_store))
        self.transformer_ema = EMA(self.transformer, args.ema)
        self.encoder_emas = [EMA(e, args.ema) for e in self.encoders]
        self.step = 0
        self.shift_factor = self.scaling_factor = None
        self.best_loss = None  # validation loss of the best export so far
        self.elapsed = 0.0
        self.rewarm_from = 0
        self.token_cache = {}
        if os.path.exists(self.ckpt_path):
            self.load()
        else:
            self.shift_factor, self.scaling_factor = self.measure_latents()
            if args.init_from:
                self.init_from_export(args.init_from)

    # -- persistence ---------------------------------------------------------------------------
    def state(self):
        return dict(
            family="sd3", step=self.step, seed=self.args.seed, elapsed=self.elapsed,
            shift_factor=self.shift_factor, scaling_factor=self.scaling_factor, best_loss=self.best_loss,
            rewarm_from=self.rewarm_from, transformer=self.transformer.state_dict(),
            encoders=[e.state_dict() for e in self.encoders], opt=self.opt.state_dict(),
            transformer_ema=self.transformer_ema.shadow, encoder_emas=[e.shadow for e in self.encoder_emas],
        )

    def save(self):
        tmp = self.ckpt_path + ".tmp"
        torch.save(self.state(), tmp)
        os.replace(tmp, self.ckpt_path)

    def load(self):
        s = torch.load(self.ckpt_path, map_location="cpu", weights_only=False)
        if s.get("family") != "sd3":
            raise SystemExit(f"{self.ckpt_path} is not an SD3 run's checkpoint (use another --out)")
        if s["seed"] != self.args.seed:
            raise SystemExit(f"{self.ckpt_path} was trained with --seed {s['seed']}, not {self.args.seed}")
        self.step, self.elapsed, self.rewarm_from = s["step"], s["elapsed"], s["rewarm_from"]
        self.best_loss = s.get("best_loss")
        self.shift_factor, self.scaling_factor = s["shift_factor"], s["scaling_factor"]
        self.transformer.load_state_dict(s["transformer"])
        for e, sd in zip(self.encoders, s["encoders"]):
            e.load_state_dict(sd)
        self.opt.load_state_dict(s["opt"])
        self.transformer_ema.shadow = self.on_device(s["transformer_ema"])
        for e, sd in zip(self.encoder_emas, s["encoder_emas"]):
            e.shadow = self.on_device(sd)
        self.log(f"resumed step={self.step} from {self.ckpt_path}")

    def on_device(self, state):
        return {k: v.to(self.device) for k, v in state.items()}

    def init_from_export(self, folder):
        """Start from an exported StableDiffusion3Pipeline (e.g. the committed one): its EMA weights
        (which also seed the EMA) at its step, with a fresh optimiser that warms up again."""
        from diffusers import SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        for sub in ("tokenizer", "tokenizer_2"):
            exported = CLIPTokenizer.from_pretrained(os.path.join(folder, sub), local_files_only=True)
            if exported.get_vocab() != self.tokenizer.get_vocab():
                raise SystemExit(f"{folder}: its {sub} differs from the one built from the caption words")
        transformer = SD3Transformer2DModel.from_pretrained(os.path.join(folder, "transformer"), local_files_only=True)
        self.transformer.load_state_dict(transformer.state_dict())
        for e, sub in zip(self.encoders, ("text_encoder", "text_encoder_2")):
            e.load_state_dict(CLIPTextModelWithProjection.from_pretrained(os.path.join(folder, sub), local_files_only=True).state_dict())
        self.transformer_ema.shadow = {k: v.detach().clone() for k, v in self.transformer.state_dict().items()}
        for ema, e in zip(self.encoder_emas, self.encoders):
            ema.shadow = {k: v.detach().clone() for k, v in e.state_dict().items()}
        vae_config = load_vae(folder).config
        self.shift_factor, self.scaling_factor = float(vae_config.shift_factor), float(vae_config.scaling_factor)
        with open(os.path.join(folder, "training.json")) as f:
            info = json.load(f)
        self.step = self.rewarm_from = int(info["step"])
        self.elapsed = float(info.get("train_minutes", 0.0)) * 60
        self.log(f"initialised from {folder} at step {self.step}")
        pipe = self.pipeline()
        self.validate(pipe)
        self.best_loss = self.validation_loss(pipe)
        self.save()

    def log(self, line):
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with open(self.log_path, "a") as f:
            f.write(f"{stamp} {line}\n")
        print(f"{stamp} {line}", flush=True)

    # -- data ----------------------------------------------------------------------------------
    @torch.no_grad()
    def measure_latents(self):
        """SD3's latent normalisation for this VAE: (shift, scale) with (z - shift) * scale of unit
        std, measured on `--latent-scenes` fresh scenes."""
        rng = np.random.default_rng([self.args.seed, PHASE_MMDIT, 0, 2])
        images, _ = scenes.sample_batch(rng, self.args.latent_scenes)
        z = torch.cat([self.vae.encode(chunk.to(self.device)).latent_dist.mode().cpu() for chunk in to_pixels(images).split(64)])
        shift, scale = float(z.mean()), float(1 / (z - z.mean()).std())
        self.log(f"latents: shift_factor {shift:.4f} scaling_factor {scale:.4f}")
        return shift, scale

    def batch(self, step, n):
        rng = np.random.default_rng([self.args.seed, PHASE_MMDIT, step])
        images, captions, masks = scenes.sample_batch(rng, n, with_masks=True, count_weights=self.args.count_weights)
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        return to_pixels(images), captions, gen, torch.from_numpy(masks).float()

    def token_ids(self, captions):
        missing = [c for c in set(captions) if c not in self.token_cache]
        if missing:
            ids = self.tokenizer(missing, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                                 return_tensors="pt").input_ids
            self.token_cache.update(zip(missing, ids))
        return torch.stack([self.token_cache[c] for c in captions])

    def encode_text(self, captions, encoders=None):
        """(text tokens (batch, 77 + 1, 2 hidden), pooled (batch, 2 projection)) as the pipeline builds
        them without T5, its 256 zero rows stood in by one (see JointAttentionRecorder)."""
        encoders = encoders or self.encoders
        ids = self.token_ids(captions).to(encoders[0].device)
        outs = [e(ids, output_hidden_states=True) for e in encoders]
        tokens = torch.cat([o.hidden_states[-2] for o in outs], -1)
        pooled = torch.cat([o.text_embeds for o in outs], -1)
        return torch.cat([tokens, tokens.new_zeros(tokens.shape[0], 1, tokens.shape[-1])], 1), pooled

    def sample_sigmas(self, n, gen):
        if self.args.timesteps == "logit-normal":
            return torch.sigmoid(torch.randn(n, generator=gen))
        return torch.rand(n, generator=gen)

    # -- training step -------------------------------------------------------------------------
    def train_step(self):
        a = self.args
        pixels, captions, gen, masks = self.batch(self.step, a.batch)
        drop = torch.rand(len(captions), generator=gen) < a.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        positions = default_positions(len(captions), masks.shape[1])
        if a.colour_dropout > 0:
            rng = np.random.default_rng([a.seed, PHASE_MMDIT, self.step, 1])
            captions, positions = drop_colour_words(captions, rng, a.colour_dropout)
        # Random draws on the CPU, computation on --device: the same run wherever it trains.
        dev = self.device
        pixels, masks, positions, keep = pixels.to(dev), masks.to(dev), positions.to(dev), (~drop).to(dev)
        with torch.no_grad():
            posterior = self.vae.encode(pixels).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen).to(dev)
            x0 = (z - self.shift_factor) * self.scaling_factor
        noise = torch.randn(x0.shape, generator=gen).to(dev)
        s = self.sample_sigmas(len(captions), gen).to(dev)
        x_t = (1 - s[:, None, None, None]) * x0 + s[:, None, None, None] * noise
        lr = lr_at(self.step, a.lr, a.warmup, a.steps)
        if self.rewarm_from:
            lr *= min(1.0, (self.step - self.rewarm_from + 1) / a.warmup)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.transformer.train()
        for e in self.encoders:
            e.train()
        tokens, pooled = self.encode_text(captions)
        supervise = a.attn_loss > 0
        self.attn_store["active"], self.attn_store["maps"] = supervise, []
        pred = self.transformer(hidden_states=x_t, encoder_hidden_states=tokens, pooled_projections=pooled,
                                timestep=s * self.scheduler.config.num_train_timesteps).sample
        self.attn_store["active"] = False
        flow = F.mse_loss(pred, noise - x0)
        attn = (
            attention_localisation_loss(self.attn_store["maps"], masks, keep, "mask-kl", a.attn_floor, positions)
            if supervise else torch.zeros(())
        )
        self.attn_store["maps"] = []
        self.opt.zero_grad(set_to_none=True)
        (flow + a.attn_loss * attn).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.transformer_ema.update(self.transformer, self.step)
        for ema, e in zip(self.encoder_emas, self.encoders):
            ema.update(e, self.step)
        return dict(loss=flow.item(), attn=attn.item(), gnorm=float(grad_norm))

    @torch.no_grad()
    def validation_loss(self, pipe):
        """Flow-matching loss of the EMA model on fixed validation scenes and noise, at sigmas spread
        evenly over (0, 1): comparable between exports."""
        n = self.args.validation_scenes
        rng = np.random.default_rng([scenes.VALIDATION_SEED, PHASE_MMDIT])
        images, captions = scenes.sample_batch(rng, n)
        gen = torch.Generator().manual_seed(scenes.VALIDATION_SEED)
        z = self.vae.encode(to_pixels(images)).latent_dist.mode()
        x0 = (z - self.shift_factor) * self.scaling_factor
        noise = torch.randn(x0.shape, generator=gen)
        s = (torch.arange(n) + 0.5) / n
        tokens, pooled = self.encode_text(captions, [pipe.text_encoder, pipe.text_encoder_2])
        transformer = copy.deepcopy(pipe.transformer)  # the pipeline keeps diffusers' own processors
        transformer.set_attn_processor(JointAttentionRecorder({"active": False, "multiplicity": T5_ZEROS}))
        x_t = (1 - s[:, None, None, None]) * x0 + s[:, None, None, None] * noise
        pred = transformer(hidden_states=x_t, encoder_hidden_states=tokens, pooled_projections=pooled,
                           timestep=s * self.scheduler.config.num_train_timesteps).sample
        return F.mse_loss(pred, noise - x0).item()

    # -- export --------------------------------------------------------------------------------
    def pipeline(self):
        """The EMA model as a StableDiffusion3Pipeline with diffusers' own attention processors."""
        from diffusers import StableDiffusion3Pipeline
        from diffusers.models.attention_processor import JointAttnProcessor2_0

        transformer = copy.deepcopy(self.transformer).to("cpu")
        transformer.load_state_dict(self.transformer_ema.shadow)
        transformer.set_attn_processor(JointAttnProcessor2_0())
        encoders = []
        for ema, e in zip(self.encoder_emas, self.encoders):
            encoder = type(e)(e.config)
            encoder.load_state_dict(ema.shadow)
            encoders.append(encoder)
        vae = copy.deepcopy(self.vae).to("cpu")
        vae.register_to_config(shift_factor=float(self.shift_factor), scaling_factor=float(self.scaling_factor))
        for m in (transformer, vae, *encoders):
            m.eval().requires_grad_(False)
        pipe = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=self.scheduler, vae=vae,
            text_encoder=encoders[0], tokenizer=self.tokenizer,
            text_encoder_2=encoders[1], tokenizer_2=self.tokenizer,
            text_encoder_3=None, tokenizer_3=None,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _save_pipeline(self, pipe, target, info):
        return save_pipeline(pipe, target, info, write_guidance_settings)

    def export(self, force=False):
        """Export the EMA model to `<out>/latest`; it replaces `--export-to` when its validation loss
        is the best so far, or when forced. (The read-back rate is logged and recorded too: on 48
        captions it moves by several points between exports that differ only by noise.)"""
        pipe = self.pipeline()
        rate = self.validate(pipe)
        val_loss = self.validation_loss(pipe)
        self.log(f"validation loss step {self.step}: {val_loss:.5f}")
        info = dict(
            family="sd3", step=self.step, seed=self.args.seed, train_minutes=round(self.elapsed / 60, 1),
            exported=time.strftime("%Y-%m-%d %H:%M:%S"), caption_words=list(scenes.CAPTION_WORDS), ema=True,
            validation_rate=rate, validation_loss=val_loss, t5_zeros=T5_ZEROS,
            args={k: portable(v) for k, v in vars(self.args).items() if k not in ("out", "export_to", "export")},
        )
        self._save_pipeline(pipe, os.path.join(self.out, "latest"), info)
        if force or self.best_loss is None or val_loss <= self.best_loss:
            self.best_loss = val_loss if self.best_loss is None else min(val_loss, self.best_loss)
            size = self._save_pipeline(pipe, self.args.export_to, info)
            self.log(f"exported step {self.step} (validation {rate:.1%}, loss {val_loss:.5f}) to {self.args.export_to} ({size / 1e6:.1f} MB)")
        else:
            self.log(f"kept the best export: step {self.step} validates at loss {val_loss:.5f} > best {self.best_loss:.5f} ({rate:.1%} read back)")

    @torch.no_grad()
    def validate(self, pipe, n=None):
        """Read-back rate (right colours and count) on validation captions; saves a sample sheet."""
        n = n or self.args.validation
        captions = [scenes.make_scene(scenes.VALIDATION_SEED + k).caption for k in range(n)]
        images, _, ok = scenes.generate_and_read(pipe, captions, seed=0, steps=self.args.validation_steps, guidance_scale=5.0)
        path = os.path.join(self.out, "samples", f"step{self.step:06d}.png")
        scenes.caption_sheet(images[:16], captions[:16], ok[:16]).save(path)
        rate = float(np.mean(ok))
        self.log(f"validation step {self.step}: read back {sum(ok)}/{n} = {rate:.1%} ({path})")
        return rate

    def run(self):
        a = self.args
        last_ckpt = last_export = t_prev = time.time()
        hist = []
        while True:
            if a.stop_at is not None and self.step >= a.stop_at:
                self.save()
                self.log(f"stopped at step {self.step} (--stop-at)")
                return
            if self.step >= a.steps:
                self.save()
                self.export()
                self.log("done")
                return
            stats = self.train_step()
            self.step += 1
            now = time.time()
            self.elapsed += now - t_prev
            hist.append((now - t_prev, stats))
            t_prev = now
            if self.step % a.log_every == 0:
                mean = {k: np.mean([s[k] for _, s in hist]) for k in hist[-1][1]}
                sec = np.mean([d for d, _ in hist])
                self.log(f"step={self.step} " + " ".join(f"{k}={v:.5f}" for k, v in mean.items())
                         + f" lr={self.opt.param_groups[0]['lr']:.2e} s/step={sec:.2f}")
                hist = []
            if now - last_ckpt > a.ckpt_minutes * 60:
                self.save()
                last_ckpt = time.time()
            if now - last_export > a.export_minutes * 60:
                self.save()
                self.export()
                last_ckpt = last_export = t_prev = time.time()  # export time is not training time


def parser():
    p = argparse.ArgumentParser(prog="python -m sgfast train --family sd3", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=["sd3"], default="sd3")
    p.add_argument("--out", default="training/mmdit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-from", default=default_model_path(), help="the pipeline folder whose (trained) VAE is used, frozen")
    p.add_argument("--layers", type=int, default=4, help="joint transformer blocks")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--text-hidden", type=int, default=64, help="hidden size of each CLIP text encoder")
    p.add_argument("--text-layers", type=int, default=2)
    p.add_argument("--text-projection", type=int, default=32, help="each encoder's pooled projection size")
    p.add_argument("--shift", type=float, default=1.0, help="FlowMatchEulerDiscreteScheduler shift of the sampling sigmas")
    p.add_argument("--timesteps", choices=["logit-normal", "uniform"], default="logit-normal", help="training sigma distribution")
    p.add_argument("--steps", type=int, default=30000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--colour-dropout", type=float, default=0.0, help="chance that an object's colour word is left out")
    p.add_argument("--count-weights", type=lambda text: [float(w) for w in text.split(",")], default=None,
                   help="relative frequency of 1, 2, 3-object scenes, e.g. 1,1,2 (default: uniform)")
    p.add_argument("--attn-loss", type=float, default=0.005, help="weight of the mask-kl attention loss (0: off)")
    p.add_argument("--attn-floor", type=float, default=0.05)
    p.add_argument("--ckpt-minutes", type=float, default=4.0)
    p.add_argument("--export-minutes", type=float, default=15.0)
    p.add_argument("--export-to", default=mmdit_model_path())
    p.add_argument("--init-from", default=None, help="start from this exported SD3 pipeline when --out has no checkpoint")
    p.add_argument("--export", action="store_true", help="export the latest checkpoint (unconditionally) and exit")
    p.add_argument("--stop-at", type=int, default=None, help="save and stop at this step")
    p.add_argument("--validation", type=int, default=48, help="validation captions generated at each export")
    p.add_argument("--validation-steps", type=int, default=25)
    p.add_argument("--validation-scenes", type=int, default=64, help="scenes of the validation loss")
    p.add_argument("--latent-scenes", type=int, default=512, help="scenes the latent shift and scale are measured on")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="where the training steps run (cuda on a GPU); exports and validation run on the CPU")
    p.add_argument("--log-every", type=int, default=25)
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    trainer = Trainer(args)
    if args.export:
        trainer.export(force=True)
        return
    trainer.log(f"start step={trainer.step} args={vars(args)}")
    trainer.run()
