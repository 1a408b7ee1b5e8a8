"""Exact FLOPs per denoising step of the MMDiT architectures (SD3-medium, SD3.5-large, FLUX.1-dev), on
the meta device (no GPU, no weights), through `python -m benchmarks.flops --arch sd3-medium | sd35-large | flux-dev`.

Rows: the plain step (SD3: one transformer forward at batch 2 for CFG; FLUX.1-dev, guidance-distilled:
one forward at batch 1); the floor for growing depths (the unconditional forward without gradients,
the conditional forward, and the backward to the latents from one word's map at the last captured
block: nothing else); sgfast's guided step with the default blocks, in reference mode (full graph) and
with the graph cut after the last captured block (fast mode's), the energies of a move holding the
other objects. FLOPs are torch.utils.flop_counter's (matmuls and attention; elementwise work is not
counted); the word maps' math is counted as its PyTorch reference (the fused kernel's Triton work is
not seen by the counter). "saved" is what autograd keeps for the conditional pass's backward (each
storage once, weights excluded), in bfloat16 with SDPA as the memory-efficient kernel.
"""

import json
from pathlib import Path

import torch

from benchmarks.measure import CountFlops, SavedForBackward

GIB = 1024**3
ARCHS = {
    # arch: (config file, published parameters in millions as the folder's README lists them, resolution)
    "sd3-medium": ("sd3_medium_transformer.json", 2028.33, 1024),
    "sd35-large": ("sd35_large_transformer.json", 8056.63, 1024),
    "flux-dev": ("flux1_dev_transformer.json", 11901.41, 1024),
}
PROMPT_WORDS = ["a", "red", "circle", "and", "a", "blue", "square"]
T5_TOKENS = {"sd3": 256, "flux": 512}  # the pipelines' default max_sequence_length


def transformer_on_meta(arch, arch_dir):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    config = json.loads((Path(arch_dir) / ARCHS[arch][0]).read_text())
    cls = FluxTransformer2DModel if config.pop("_class_name") == "FluxTransformer2DModel" else SD3Transformer2DModel
    with torch.device("meta"):
        model = cls.from_config(config)
    return model.to(torch.bfloat16).eval().requires_grad_(False)


def pipeline_of(transformer):
    """The family's diffusers pipeline around the transformer alone (no encoders, no VAE: not counted)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

    flux = hasattr(transformer, "single_transformer_blocks")
    cls = FluxPipeline if flux else StableDiffusion3Pipeline
    names = ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    if not flux:
        names += ("text_encoder_3", "tokenizer_3")
    return cls(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), **{n: None for n in names})


def inputs(transformer, resolution, rows):
    """The transformer's keyword inputs at `rows` batch rows, as the pipelines build them (VAE factor 8)."""
    config = transformer.config
    latent = resolution // 8
    meta = dict(device="meta", dtype=torch.bfloat16)
    if hasattr(transformer, "single_transformer_blocks"):
        tokens, text = (latent // 2) ** 2, T5_TOKENS["flux"]
        ids = dict(txt_ids=torch.zeros(text, 3, device="meta"), img_ids=torch.zeros(tokens, 3, device="meta"))
        guidance = torch.zeros(rows, device="meta") if config.guidance_embeds else None
        return dict(hidden_states=torch.zeros(rows, tokens, config.in_channels, **meta), timestep=torch.zeros(rows, **meta),
                    guidance=guidance, pooled_projections=torch.zeros(rows, config.pooled_projection_dim, **meta),
                    encoder_hidden_states=torch.zeros(rows, text, config.joint_attention_dim, **meta), **ids,
                    return_dict=False), (latent // 2, latent // 2), 0
    text = 77 + T5_TOKENS["sd3"]
    patch = config.patch_size
    return dict(hidden_states=torch.zeros(rows, config.in_channels, latent, latent, **meta), timestep=torch.zeros(rows, **meta),
                encoder_hidden_states=torch.zeros(rows, text, config.joint_attention_dim, **meta),
                pooled_projections=torch.zeros(rows, config.pooled_projection_dim, **meta), return_dict=False), \
        (latent // patch, latent // patch), 77


def prompt_words(offset):
    from sgfast.trace import PromptWords

    return PromptWords(" ".join(PROMPT_WORDS), PROMPT_WORDS, [[offset + i + 1] for i in range(len(PROMPT_WORDS))])


def guided_step(sg, kwargs, grid, edits, words, references, cfg):
    """A guided step as sgfast.mmdit_pipeline takes it: the negative rows without gradients, the
    conditional rows with gradients to the latents through the captured blocks, the energy's gradient."""
    from sgfast.sampler import edit_selection, energy_of

    transformer = sg.pipe.transformer
    if cfg:
        with torch.no_grad():
            transformer(**kwargs)
    edit_words, tokens = edit_selection([edits], [words], "meta")
    features = any(e.needs_features for e in edits)
    z = kwargs["hidden_states"].detach().requires_grad_(True)
    with torch.enable_grad():
        with sg.capture().record(*tokens, grid, features=features):
            transformer(**dict(kwargs, hidden_states=z))
        energy = energy_of([edits], sg.capture(), [words], edit_words, references, 500)
        torch.autograd.grad(energy, z)


def record_reference(sg, kwargs, grid, words):
    from sgfast.sampler import record_traces
    from sgfast.trace import Trace, selection

    trace = Trace(words.prompt, list(dict.fromkeys(words.words)))
    tokens = selection([words], [trace.words], "meta")
    with torch.no_grad(), sg.capture().record(*tokens, grid):
        sg.pipe.transformer(**kwargs)
        record_traces([trace], sg.capture(), [trace.words], 500)
    return trace


def floor_layers(sg, arch):
    """Growing depths of the last captured block (one layer each: the floor depends on the last only)."""
    from sgfast.mmdit_capture import joint_attention_layers

    layers = list(joint_attention_layers(sg.pipe.transformer))
    double = [n for n in layers if n.startswith("transformer_blocks.")]
    single = [n for n in layers if n.startswith("single_transformer_blocks.")]
    picks = [double[len(double) // 4 - 1], double[len(double) // 2 - 1], double[3 * len(double) // 4 - 1], double[-1]]
    if single:
        picks = [double[len(double) // 2 - 1], double[-1], single[len(single) // 2 - 1], single[-1]]
    return picks


def flop_table(arch, arch_dir, resolution=None):
    from sgfast import move
    from sgfast.mmdit_pipeline import MMDiTSelfGuidancePipeline

    transformer = transformer_on_meta(arch, arch_dir)
    resolution = resolution or ARCHS[arch][2]
    pipe = pipeline_of(transformer)
    flux = hasattr(transformer, "single_transformer_blocks")
    cfg = not flux  # FLUX.1-dev: guidance-distilled, one conditional pass
    full, grid, offset = inputs(transformer, resolution, 2 if cfg else 1)
    one, _, _ = inputs(transformer, resolution, 1)
    words = prompt_words(offset)
    rows = []

    def measure(name, fn, layers=None, kind=None, saved=True):
        from benchmarks.flops import efficient_attention_on_meta

        with CountFlops() as counter:
            fn()
        row = dict(name=name, flops=counter.total, layers=layers, kind=kind)
        if saved:
            with efficient_attention_on_meta(), SavedForBackward(transformer) as keeper:
                fn()
            row["saved_bytes"] = keeper.nbytes
        rows.append(row)
        return row

    def plain():
        with torch.no_grad():
            transformer(**full)

    measure("plain step (forward, batch 2 for CFG)" if cfg else "plain step (forward, batch 1: guidance-distilled)",
            plain, saved=False)
    floors = {}
    for layer in floor_layers(MMDiTSelfGuidancePipeline(pipe), arch):
        sg = MMDiTSelfGuidancePipeline(pipe, layers=[layer], mode="fast")  # graph cut after the block
        sg.capture().feature_layer, sg.capture().feature_module = None, None

        def floor(sg=sg):
            from sgfast.trace import selection

            if cfg:
                with torch.no_grad():
                    transformer(**one)
            tokens = selection([words], [["circle"]], "meta")
            z = one["hidden_states"].detach().requires_grad_(True)
            with sg.capture(), torch.enable_grad():
                with sg.capture().record(*tokens, grid, features=False):
                    transformer(**dict(one, hidden_states=z))
                energy = sum(m.float().sum() for m in sg.capture().maps.values())
                torch.autograd.grad(energy, z)

        row = measure(f"floor, last captured block {layer.rsplit('.', 1)[0]}", floor, layers=[layer], kind="floor")
        floors[layer] = row["flops"]

    for mode in ("reference", "fast"):
        sg = MMDiTSelfGuidancePipeline(pipe, mode=mode)
        with sg.capture():
            reference = record_reference(sg, one, grid, words)
            edits = [move("circle", dx=0.25)]
            label = "full graph" if mode == "reference" else "graph cut after the last captured block"
            row = measure(f"sgfast {mode} ({label}): move + keep shape + keep appearance",
                          lambda: guided_step(sg, one if not cfg else one, grid, edits, words, [reference], cfg),
                          layers=list(sg.layers), kind="sgfast")
            row["feature_layer"] = sg.feature_layer
    plain_flops = rows[0]["flops"]
    for row in rows:
        row["x_plain"] = row["flops"] / plain_flops
    params = sum(p.numel() for p in transformer.parameters())
    info = dict(arch=arch, resolution=resolution, grid=grid, params=params, published_m=ARCHS[arch][1],
                text_tokens=full["encoder_hidden_states"].shape[1], cfg=cfg)
    return info, rows


def format_table(info, rows):
    lines = [
        f"{info['arch']} transformer ({info['params'] / 1e6:.2f} M params; the architectures README: "
        f"{info['published_m']:.2f} M) at {info['resolution']}px ({info['grid'][0]}x{info['grid'][1]} image tokens, "
        f"{info['text_tokens']} text tokens), batch 1, meta device, bfloat16",
        "",
        "| step | TFLOP | x plain | saved for backward (GiB) |",
        "|---|---|---|---|",
    ]
    for row in rows:
        saved = f"{row['saved_bytes'] / GIB:.2f}" if "saved_bytes" in row else ""
        lines.append(f"| {row['name']} | {row['flops'] / 1e12:.3f} | {row['x_plain']:.3f} | {saved} |")
    sgfast = [r for r in rows if r["kind"] == "sgfast"]
    if sgfast:
        lines.append("")
        lines.append(f"sgfast's default blocks: {', '.join(sgfast[0]['layers'])}; features from {sgfast[0]['feature_layer']}")
    return "\n".join(lines)
