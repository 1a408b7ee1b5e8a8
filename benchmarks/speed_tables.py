"""The tables `python -m benchmarks` prints (Markdown): time per step and image, cost per step and image
(FLOPs, memory, passes), and scaling with resolution and batch; with the run's header."""

MIB = 2**20


def fmt_ms(summary):
    if not summary:
        return "n/a"
    spread = f"{summary['q1'] * 1e3:.1f}-{summary['q3'] * 1e3:.1f}" if summary["n"] >= 4 else f"{summary['min'] * 1e3:.1f}-{summary['max'] * 1e3:.1f}"
    return f"{summary['median'] * 1e3:.1f} ({spread})"


def fmt_s(summary):
    if not summary:
        return "n/a"
    return f"{summary['median']:.3f} ({summary['min']:.3f}-{summary['max']:.3f})"


def fmt_bytes(n, unit=MIB, digits=1):
    return "n/a" if n is None else f"{n / unit:.{digits}f}"


def _failed(r):
    return f"| {r.get('name', '?')} | failed: {r['error'].strip().splitlines()[-1][:150]} |"


def time_table(results, batch):
    """Time per step and per image. Ratios are within each row's own process (the diffusers plain
    step and image are timed interleaved with the row's)."""
    lines = [
        (
            "| row | ms / plain step | ms / unguided step | ms / guided step | guided / plain | s / image "
            f"| image / plain image | images/s (b=1) | images/s (b={batch}) | J / image |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(_failed(r))
            continue
        ratio = f"{r['guided_over_plain']:.2f}" if "guided_over_plain" in r else "n/a"
        x_image = f"{r['image_over_plain']:.2f}" if "image_over_plain" in r else "n/a"
        ips = f"{r['images_per_s']:.2f}" if "images_per_s" in r else "n/a"
        ips_b = f"{r['images_per_s_batch']:.2f}" if "images_per_s_batch" in r else "n/a"
        joules = f"{r['energy_j_per_image']:.1f}" if r.get("energy_j_per_image") is not None else "n/a"
        unguided = fmt_ms(r["unguided_step_s"]) if "unguided_step_s" in r else "= plain"
        lines.append(
            f"| {r['name']} | {fmt_ms(r.get('plain_step_s'))} | {unguided} | {fmt_ms(r.get('guided_step_s'))} | {ratio} | "
            f"{fmt_s(r.get('image_s'))} | {x_image} | {ips} | {ips_b} | {joules} |"
        )
    return "\n".join(lines)


def cost_table(results, cuda):
    memory = "peak CUDA memory over resident, n-step call (MiB)" if cuda else "peak RSS over resident, n-step call (MiB)"
    lines = [
        (
            "| row | GFLOP / unguided step | GFLOP / guided step | x floor (same layers) | GFLOP / image "
            f"| {memory} | saved for backward (MiB) | attention data kept / step (KiB) | per image: UNet fwd / with grad / backward |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(_failed(r))
            continue
        c = r.get("counts", {})
        passes = f"{c.get('unet_forward', '?')} / {c.get('unet_forward_grad', '?')} / {c.get('backward', '?')}"
        if "refinement_steps" in c:
            passes += (
                f" ({c.get('guided_steps')} guided steps; {c['refinement_steps']} refinements of "
                f"{c['refinement_iterations']} iterations in all)"
            )
        elif "guided_steps" in c:
            passes += f" ({c['guided_steps']} guided steps)"
        guided = f"{r['guided_step_flops'] / 1e9:.3f}" if "guided_step_flops" in r else "n/a"
        x_floor = f"{r['x_floor']:.3f}" if "x_floor" in r else "n/a"
        image = f"{r['image_flops'] / 1e9:.2f}" if "image_flops" in r else "n/a"
        saved = fmt_bytes(r.get("saved_bytes"), MIB, 2) if "saved_bytes" in r else "n/a"
        attention = fmt_bytes(r.get("attention_bytes"), 1024, 1) if "attention_bytes" in r else "0"
        lines.append(
            f"| {r['name']} | {r['unguided_step_flops'] / 1e9:.3f} | {guided} | {x_floor} | {image} | "
            f"{fmt_bytes(r.get('peak_over_resident_bytes'))} | {saved} | {attention} | {passes} |"
        )
    return "\n".join(lines)


def scaling_table(results, cuda=False):
    memory = "peak CUDA memory over resident (MiB)" if cuda else "peak RSS over resident (MiB)"
    lines = [
        f"| row | image px | batch | ms / plain step | ms / guided step | guided / plain | saved for backward (MiB) | {memory} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(_failed(r))
            continue
        lines.append(
            f"| {r['name']} | {r['image_size']} | {r['batch_size']} | {fmt_ms(r['plain_step_s'])} | {fmt_ms(r['guided_step_s'])} | "
            f"{r['guided_over_plain']:.2f} | {fmt_bytes(r.get('saved_bytes'), MIB, 2)} | {fmt_bytes(r.get('peak_over_resident_bytes'))} |"
        )
    return "\n".join(lines)


def header(info, notes):
    lines = [
        f"{info['date']}  {info['cpu']} ({info['cores']} cores, torch threads {info['torch_threads']})"
        + (f"  GPU {info['gpu']}, CUDA {info['cuda']}" if "gpu" in info else ""),
        f"python {info['python']}, torch {info['torch']}, diffusers {info['diffusers']}, transformers {info['transformers']}"
        + (f", triton {info['triton']}" if "triton" in info else ""),
        f"{info['command']}",
        (
            f"{info['steps']} steps per image; per-step costs from calls of {info['step_call']} steps; larger batch {info['batch']}; "
            f"{info['warmup']} warm-up, {info['repeats']} step repeats, {info['image_repeats']} image repeats "
            f"({info['batch_repeats']} at batch {info['batch']}); times: median (IQR with >= 4 samples, else min-max)"
        ),
    ]
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)
