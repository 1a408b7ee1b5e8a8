"""Exact FLOPs per denoising step on the real architectures, on the meta device (no GPU, no weights).

    python -m benchmarks.flops --arch sd15            # SD1.5 UNet at 512px (64x64 latents)
    python -m benchmarks.flops --arch sdxl --json out.json   # diffusers' StableDiffusionXLPipeline at 1024px
    python -m benchmarks.flops --arch sd3-medium | sd35-large | flux-dev   # MMDiT: benchmarks.flops_mmdit

Rows: the plain CFG step (one forward at batch 2); the floor for growing sets of decoder layers
(uncond forward + cond forward + backward to the latents through the layers up to the last
captured one, nothing else: the backward starts at the captured layers' queries); the naive batch-2
gradient; sgfast's guided step in each available mode, driven through `sgfast.sampler.guided_energy`
and `torch.autograd.grad` exactly as `sgfast.sampler.denoise` does; and diffusers' Attend-and-Excite
guided step (its own attention processors, aggregation and update) and one refinement iteration.

FLOPs are torch.utils.flop_counter's (matmuls, convolutions, attention; elementwise work is not
counted). On meta, SDPA runs its math decomposition, counted as bmm. "saved" is what autograd keeps
for the backward of the conditional pass (each storage once, weights excluded), measured in a second
pass in fp16 with SDPA routed to the memory-efficient kernel, as a GPU would run it.
"""

import argparse
import contextlib
import json
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks.measure import CountFlops, SavedForBackward
from benchmarks.models import EDITED_WORD, PROMPT, _sdxl_added_conditioning, default_arch_dir, random_pipeline, sdxl_pipeline

GIB = 1024**3


# ---------------------------------------------------------------- layers


def layer_resolution(name, unet, latent_size):
    """Query grid side of a UNet block's attention layers (from the block index)."""
    parts = name.split(".")
    levels = len(unet.config.block_out_channels)
    if parts[0] == "down_blocks":
        return latent_size // 2 ** int(parts[1])
    if parts[0] == "up_blocks":
        return latent_size // 2 ** (levels - 1 - int(parts[1]))
    return latent_size // 2 ** (levels - 1)  # mid block


def up_block_groups(unet, latent_size):
    """[(label, [cross-attention layer names])] for growing sets of decoder blocks, coarse to fine:
    "16x16", "16x16 + 32x32", ... (SD1.5 at 512px)."""
    from sgfast.capture import cross_attention_layers

    layers = [n for n in cross_attention_layers(unet) if n.startswith("up_blocks.")]
    blocks = sorted({int(n.split(".")[1]) for n in layers})
    groups, chosen, labels = [], [], []
    for block in blocks:
        chosen += [n for n in layers if int(n.split(".")[1]) == block]
        side = layer_resolution(f"up_blocks.{block}", unet, latent_size)
        labels.append(f"{side}x{side}")
        groups.append((" + ".join(labels), list(chosen)))
    return groups


def attend_excite_attn_res(unet, latent_size):
    """Attend-and-Excite's map resolution: its default (16, 16) is the latents / 4 of SD1.x at 512px;
    the same fraction where the UNet has cross-attention there, else the coarsest cross-attention
    resolution (the tiny UNet's)."""
    from sgfast.capture import cross_attention_layers

    sides = {layer_resolution(n, unet, latent_size) for n in cross_attention_layers(unet)}
    target = latent_size // 4
    return (target, target) if target in sides else (min(sides), min(sides))


def attend_excite_layers(unet, latent_size, attn_res):
    """The cross-attention layers whose maps Attend-and-Excite aggregates (those at `attn_res`)."""
    from sgfast.capture import cross_attention_layers

    return [n for n in cross_attention_layers(unet) if layer_resolution(n, unet, latent_size) == attn_res[0]]


# ---------------------------------------------------------------- steps


def plain_step(unet, latents, timestep, cond, uncond):
    """diffusers' CFG step: one forward at batch 2."""
    with torch.no_grad():
        unet(torch.cat([latents] * 2), timestep, encoder_hidden_states=torch.cat([uncond, cond]))


def floor_step(unet, layers, latents, timestep, cond, uncond, batch2=False):
    """The floor: uncond forward (no grad), cond forward with the graph cut after the last captured
    layer, and a backward to the latents that starts at the captured layers' queries (all a map
    needs). `batch2`: the naive step instead, gradient through the whole batch-2 CFG forward."""
    from sgfast.capture import cross_attention_layers

    modules = cross_attention_layers(unet)
    queries = []

    def keep(module, inputs, output):
        queries.append(output)
        if not batch2 and len(queries) == len(layers):
            torch.set_grad_enabled(False)  # nothing after the last captured layer needs a graph

    if batch2:
        z = torch.cat([latents] * 2).detach().requires_grad_(True)
        embeds = torch.cat([uncond, cond])
    else:
        with torch.no_grad():
            unet(latents, timestep, encoder_hidden_states=uncond)
        z, embeds = latents.detach().requires_grad_(True), cond
    hooks = [modules[n].to_q.register_forward_hook(keep) for n in layers]
    try:
        with torch.enable_grad():
            unet(z, timestep, encoder_hidden_states=embeds)
        total = sum(q.float().sum() for q in queries)
        torch.autograd.grad(total, z)
    finally:
        for hook in hooks:
            hook.remove()


def unet_kwargs(pipe, rows, resolution, dtype):
    """The UNet's added conditioning for `rows` batch rows as the SDXL pipeline passes it (pooled text
    embedding, here zeros, and the micro-conditioning ids of an uncropped `resolution` image); none for SD."""
    if not hasattr(pipe, "text_encoder_2"):
        return {}
    device = pipe.unet.device
    pooled = pipe.text_encoder_2.config.projection_dim
    ids = pipe._get_add_time_ids((resolution, resolution), (0, 0), (resolution, resolution), dtype, pooled)
    added = dict(text_embeds=torch.zeros(rows, pooled, device=device, dtype=dtype), time_ids=ids.to(device).repeat(rows, 1))
    return dict(added_cond_kwargs=added)


def record_reference(sg, latents, timestep, cond, extra=None):
    """An unedited trace of one step (every word's maps and appearance), recorded with the capture."""
    from sgfast.sampler import record_traces
    from sgfast.trace import PromptWords, Trace, selection

    words = PromptWords.from_tokenizer(sg.pipe.tokenizer, PROMPT)
    trace = Trace(PROMPT, list(dict.fromkeys(words.words)), latents=latents, image_size=None)
    tokens = selection([words], [trace.words], latents.device)
    with sg.capture() as capture, torch.no_grad(), capture.record(*tokens, tuple(latents.shape[-2:])):
        sg.pipe.unet(latents, timestep, encoder_hidden_states=cond, **(extra or {}))
        record_traces([trace], capture, [trace.words], timestep)
    return trace


def sgfast_step(sg, edits, reference, latents, timestep, cond, uncond, attention_bytes=None, extra=None):
    """sgfast's guided step as `sgfast.sampler.denoise` runs it: uncond forward without grad, the
    conditional pass through `guided_energy` with the edits' words captured, and the gradient of the
    energy with respect to the latents only."""
    from sgfast.sampler import edit_selection, guided_energy
    from sgfast.trace import PromptWords

    pipe = sg.pipe
    words = [PromptWords.from_tokenizer(pipe.tokenizer, PROMPT)]
    with sg.capture() as capture:
        chosen, tokens = edit_selection([edits], words, latents.device)
        with torch.no_grad():
            pipe.unet(latents, timestep, encoder_hidden_states=uncond, **(extra or {}))
        z = latents.detach().requires_grad_(True)
        with torch.enable_grad():
            _, energy = guided_energy(pipe, capture, z, timestep, cond, [(edits, reference)], words, chosen, tokens,
                                      unet_kwargs=extra)
            if attention_bytes is not None:
                attention_bytes.append(capture.captured_bytes())
            torch.autograd.grad(energy, z)


class AttendExcite:
    """diffusers' StableDiffusionAttendAndExcitePipeline on the same components, driven one step at a
    time with its own processors (unfused attention everywhere), aggregation, loss and update. Its
    loss is taken with tensor ops (the pipeline's `max(0, 1 - x)` needs a value, which meta tensors
    do not have); the counted work is identical."""

    def __init__(self, pipe, latent_size):
        from diffusers import StableDiffusionAttendAndExcitePipeline
        from diffusers.pipelines.deprecated.stable_diffusion_attend_and_excite.pipeline_stable_diffusion_attend_and_excite import (
            AttentionStore,
        )

        self.pipe = StableDiffusionAttendAndExcitePipeline(
            vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
            scheduler=pipe.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        self.attn_res = attend_excite_attn_res(pipe.unet, latent_size)
        self.index = token_index(self.pipe, EDITED_WORD)
        self.pipe.attention_store = AttentionStore(self.attn_res)
        self.saved_processors = dict(pipe.unet.attn_processors)
        self.pipe.register_attention_control()

    def close(self):
        self.pipe.unet.set_attn_processor(dict(self.saved_processors))

    def store_bytes(self):
        store = self.pipe.attention_store.attention_store
        return sum(t.numel() * t.element_size() for maps in store.values() for t in maps)

    def cond_pass(self, latents, timestep, cond):
        """Forward with grad, the token's max attention loss, and the gradient step on the latents."""
        pipe = self.pipe
        latent = latents.clone().detach().requires_grad_(True)
        with torch.enable_grad():
            pipe.unet(latent, timestep, encoder_hidden_states=cond)
            maxima = pipe._aggregate_and_get_max_attention_per_token(indices=[self.index])
            loss = torch.stack([(1.0 - m).clamp_min(0) for m in maxima]).max()
            return pipe._update_latent(latents=latent, loss=loss, step_size=1.0)

    def step(self, latents, timestep, cond, uncond, attention_bytes=None):
        latents = self.cond_pass(latents, timestep, cond)
        if attention_bytes is not None:
            attention_bytes.append(self.store_bytes())
        with torch.no_grad():
            self.pipe.unet(torch.cat([latents] * 2), timestep, encoder_hidden_states=torch.cat([uncond, cond]))


def token_index(pipe, word):
    """Position of `word` in the encoded prompt (what Attend-and-Excite's token_indices take)."""
    for index, token in pipe.get_indices(PROMPT).items():
        if token.replace("</w>", "") == word:
            return index
    raise ValueError(f"{word!r} is not one token of {PROMPT!r}")


# ---------------------------------------------------------------- the table


def efficient_attention_on_meta():
    """Route SDPA to the memory-efficient kernel's meta implementation (what a GPU saves)."""
    original = F.scaled_dot_product_attention

    def efficient(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if query.device.type != "meta":
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kwargs)
        needs_lse = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, attn_mask, needs_lse, dropout_p, is_causal, scale=scale
        )[0]

    @contextlib.contextmanager
    def patched():
        F.scaled_dot_product_attention = efficient
        try:
            yield
        finally:
            F.scaled_dot_product_attention = original

    return patched()


def available_modes(pipe):
    """sgfast modes this checkout has: "reference" always; "fast" once from_pipe accepts it."""
    from sgfast import SelfGuidancePipeline

    modes = ["reference"]
    try:
        SelfGuidancePipeline.from_pipe(pipe, mode="fast")
        modes.append("fast")
    except (TypeError, ValueError):
        pass
    finally:
        pipe.unet.requires_grad_(True)
    return modes


def flop_table(arch="sd15", arch_dir=None, resolution=None, dtype=torch.float16, attend_excite=True):
    """Rows of {name, flops, layers, saved, attention} for one UNet on the meta device."""
    from sgfast import SelfGuidancePipeline, move

    resolution = resolution or {"sd15": 512, "sdxl": 1024}[arch]
    if arch == "sdxl":
        # diffusers' own SDXL pipeline; the rows that call the UNet directly (plain, floor, naive,
        # Attend-and-Excite, which diffusers has for SD only) get the same added conditioning.
        pipe = sdxl_pipeline(arch_dir or default_arch_dir(), device="meta", dtype=dtype, resolution=resolution)
        _sdxl_added_conditioning(pipe.unet, resolution)
    else:
        pipe = random_pipeline(arch, arch_dir or default_arch_dir(), device="meta", dtype=dtype, resolution=resolution)
    unet = pipe.unet
    latent = resolution // pipe.vae_scale_factor
    latents = torch.zeros(1, unet.config.in_channels, latent, latent, device="meta", dtype=dtype)
    width = unet.config.cross_attention_dim
    cond = torch.zeros(1, pipe.tokenizer.model_max_length, width, device="meta", dtype=dtype)
    uncond = torch.zeros_like(cond)
    pipe.scheduler.set_timesteps(50)
    timestep = pipe.scheduler.timesteps[10]
    extra = unet_kwargs(pipe, 1, resolution, dtype)
    rows = []

    def measure(name, fn, layers=None, note="", saved=True, frozen=None, **extra):
        # frozen: None leaves the weights' requires_grad as the step's owner set it.
        with CountFlops() as counter:
            fn(None)
        row = dict(name=name, flops=counter.total, by_op=dict(counter.by_op), layers=layers, note=note, **extra)
        if saved:
            if frozen is not None:
                unet.requires_grad_(not frozen)
            attention = []
            with efficient_attention_on_meta(), SavedForBackward(unet) as keeper:
                fn(attention)
            if frozen is not None:
                unet.requires_grad_(True)
            row["saved_bytes"] = keeper.nbytes
            if attention:
                row["attention_bytes"] = attention[0]
        rows.append(row)
        return row

    measure("plain CFG step (forward, batch 2)", lambda _: plain_step(unet, latents, timestep, cond, uncond), saved=False)
    groups = up_block_groups(unet, latent)
    floors = {}
    for label, layers in groups:
        row = measure(
            f"floor, maps from the {label} up-block layers",
            lambda _, layers=layers: floor_step(unet, layers, latents, timestep, cond, uncond),
            layers=layers, saved=True, frozen=True, kind="floor",
        )
        floors[tuple(layers)] = row["flops"]
    for label, layers in groups[-2:]:
        measure(
            f"naive: gradient through the batch-2 forward ({label})",
            lambda _, layers=layers: floor_step(unet, layers, latents, timestep, cond, uncond, batch2=True),
            layers=layers, saved=True, kind="naive",
        )

    edits = {
        "move": lambda: [move(EDITED_WORD, dx=0.25, keep_others=False)],
        "move + keep shape + keep appearance": lambda: [move(EDITED_WORD, dx=0.25)],
    }
    for mode in available_modes(pipe):
        sg = SelfGuidancePipeline.from_pipe(pipe, mode=mode)
        reference = record_reference(sg, latents, timestep, cond, extra)
        for edit_name, make in edits.items():
            measure(
                f"sgfast {mode}: {edit_name}",
                lambda attention, sg=sg, make=make, reference=reference: sgfast_step(
                    sg, make(), reference, latents, timestep, cond, uncond, attention, extra
                ),
                layers=list(sg.layers), feature_layer=sg.feature_layer, kind="sgfast", mode=mode,
            )
        unet.requires_grad_(True)

    if attend_excite:
        ae = AttendExcite(pipe, latent)
        try:
            layers = attend_excite_layers(unet, latent, ae.attn_res)
            floors.setdefault(tuple(layers), None)
            measure(
                "diffusers Attend-and-Excite guided step",
                lambda attention: ae.step(latents, timestep, cond, uncond, attention),
                layers=layers, kind="attend_excite", note=f"maps at {ae.attn_res[0]}x{ae.attn_res[1]}",
            )
            measure(
                "  + each Attend-and-Excite refinement iteration",
                lambda _: ae.cond_pass(latents, timestep, cond),
                layers=layers, kind="attend_excite_refinement", saved=False,
            )
        finally:
            ae.close()

    # Floors for layer sets that are not one of the groups (Attend-and-Excite's, a custom default).
    for row in rows:
        key = tuple(row["layers"] or ())
        if row["layers"] and floors.get(key) is None:
            with CountFlops() as counter:
                floor_step(unet, row["layers"], latents, timestep, cond, uncond)
            floors[key] = counter.total
    plain = rows[0]["flops"]
    for row in rows:
        row["x_plain"] = row["flops"] / plain
        floor = floors.get(tuple(row["layers"] or ()))
        if floor and row.get("kind") in ("sgfast", "attend_excite", "floor"):
            row["x_floor"] = row["flops"] / floor
    encoders = [m for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None]
    info = dict(arch=arch, resolution=resolution, latent=latent, dtype=str(dtype).replace("torch.", ""),
                unet_params=sum(p.numel() for p in unet.parameters()), timestep=int(timestep),
                pipeline=type(pipe).__name__, scheduler=type(pipe.scheduler).__name__,
                text_encoder_params=[sum(p.numel() for p in m.parameters()) for m in encoders])
    return info, rows


def format_table(info, rows):
    lines = [
        (
            f"{info['arch'].upper()} UNet ({info['unet_params'] / 1e6:.2f} M params) at {info['resolution']}px "
            f"({info['latent']}x{info['latent']} latents), batch 1, meta device; saved for backward in {info['dtype']}"
        ),
        (
            f"{info['pipeline']} ({info['scheduler']}); text encoders "
            + " + ".join(f"{n / 1e6:.2f} M" for n in info["text_encoder_params"]) + " params"
        ),
        "",
        "| step | TFLOP | x plain | x floor (same layers) | saved for backward (GiB) | attention data kept (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        saved = f"{row['saved_bytes'] / GIB:.2f}" if "saved_bytes" in row else ""
        attention = f"{row['attention_bytes'] / 2**20:.3f}" if "attention_bytes" in row else ""
        x_floor = f"{row['x_floor']:.3f}" if "x_floor" in row else ""
        flops = row["flops"] / 1e12
        sign = "+" if row["name"].startswith("  +") else ""
        name = row["name"].strip() + (f" ({row['note']})" if row.get("note") else "")
        lines.append(f"| {name} | {sign}{flops:.3f} | {sign}{row['x_plain']:.3f} | {x_floor} | {saved} | {attention} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=("sd15", "sdxl", "sd3-medium", "sd35-large", "flux-dev"), default="sd15")
    parser.add_argument("--arch-dir", default=None, help="folder of the architecture configs (default: ../shared/architectures)")
    parser.add_argument("--resolution", type=int, default=None, help="image side in pixels (default 512 / 1024)")
    parser.add_argument("--no-attend-excite", action="store_true", help="leave out Attend-and-Excite")
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    quiet()
    start = time.perf_counter()
    if args.arch in ("sd15", "sdxl"):
        info, rows = flop_table(args.arch, args.arch_dir, args.resolution, attend_excite=not args.no_attend_excite)
        table = format_table
    else:  # the MMDiT families
        from benchmarks import flops_mmdit

        info, rows = flops_mmdit.flop_table(args.arch, args.arch_dir or default_arch_dir(), args.resolution)
        table = flops_mmdit.format_table
    info["seconds"] = round(time.perf_counter() - start, 1)
    info["command"] = "python -m benchmarks.flops " + " ".join(argv if argv is not None else sys.argv[1:])
    print(table(info, rows))
    print(f"\n{info['command']}  ({info['seconds']} s; FLOPs: torch.utils.flop_counter formulas, SDPA counted as its math path)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(info=info, rows=rows), f, indent=1)
    return info, rows


def quiet():
    """Silence diffusers' / transformers' informational warnings in benchmark output."""
    import logging
    import warnings

    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)


if __name__ == "__main__":
    main()
