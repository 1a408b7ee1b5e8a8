"""Edit fidelity in pixels: do the edits do what they say on the built-in model?

For each held-out two-object caption and seed, generate the unedited image, read it with the scene
reader, apply each edit, read the edited image and compare:

- move: requested vs measured centroid displacement of the moved object (error in pixels), and the
  IoU of the other object with itself before the move (keep);
- resize: requested vs measured area ratio;
- copy appearance: colour distance (RGB, 0-255) of the edited object to the source object's colour,
  before and after, and how often the reader now reads the source colour;
- copy layout: IoU of the edited objects' masks with the source's, against the unedited image's.

    python -m benchmarks.quality --seeds 20                  # table, JSON and an example sheet
    python -m benchmarks.quality --seeds 20 --results        # also updates benchmarks/RESULTS.md
    python -m benchmarks.quality --settings tuned --scale 1,1.5,2   # a sweep of the self-guidance scale v
"""

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np
import torch

from sgfast import SelfGuidancePipeline, copy_appearance, copy_layout, move, resize
from sgfast.shapes import model as default_model
from sgfast.shapes.scenes import COLOURS, HELDOUT_SEED, by_colour, make_scene, matches_caption, parse_caption, read_scene

# Settings compared: the paper's (raw gradients, its schedule, its relative weights, v = 1) and the
# one tuned by hand on the built-in model (`sgfast.shapes.guidance_settings`, `KEEP_OTHERS`).
# Each is (call arguments for an edit kind and a step count, keep arguments of move and resize).
SETTINGS = {
    "paper defaults": (lambda kind, steps: {"self_guidance_scale": 1.0}, {}),
    "tuned": (default_model.guidance_settings, default_model.KEEP_OTHERS),
}


def captions(count, first_seed=HELDOUT_SEED + 50_000):
    """Held-out captions of two objects with different shapes (so a shape word names one object)."""
    found, seed = [], first_seed
    while len(found) < count:
        caption = make_scene(seed).caption
        objects = parse_caption(caption)
        if len(objects) == 2 and objects[0][1] != objects[1][1]:
            found.append(caption)
        seed += 1
    return found


def to_array(image):
    return np.asarray(image.convert("RGB")) if hasattr(image, "convert") else np.asarray(image)


def iou(a, b):
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def nearest(objects, centroid):
    if not objects:
        return None
    return min(objects, key=lambda o: (o.centroid[0] - centroid[0]) ** 2 + (o.centroid[1] - centroid[1]) ** 2)


def measure_move(before, after, colour, other_colour, dx, dy, size=64):
    """(error in pixels, measured (dx, dy), IoU of the other object) or None when unreadable."""
    a0, a1 = by_colour(before, colour), by_colour(after, colour)
    b0, b1 = by_colour(before, other_colour), by_colour(after, other_colour)
    if a0 is None or a1 is None:
        return None
    measured = (a1.centroid[0] - a0.centroid[0], a1.centroid[1] - a0.centroid[1])
    error = float(np.hypot(measured[0] - dx, measured[1] - dy) * size)
    keep = iou(b0.mask, b1.mask) if b0 is not None and b1 is not None else 0.0
    return error, measured, keep


def measure_resize(before, after, colour):
    a0, a1 = by_colour(before, colour), by_colour(after, colour)
    if a0 is None or a1 is None:
        return None
    return a1.area / a0.area


def mean_colour(image, mask):
    return image[mask].astype(np.float64).mean(0)


def measure_appearance(image_before, image_after, before, after, colour, source_colour):
    """(distance before, distance after, read as the source colour) for the object at `colour`'s place."""
    a0 = by_colour(before, colour)
    if a0 is None:
        return None
    target = np.array(COLOURS[source_colour], dtype=np.float64)
    edited = nearest(after, a0.centroid)
    mask = edited.mask if edited is not None else a0.mask
    distance_before = float(np.linalg.norm(mean_colour(image_before, a0.mask) - target))
    distance_after = float(np.linalg.norm(mean_colour(image_after, mask) - target))
    return distance_before, distance_after, edited is not None and edited.colour == source_colour


def measure_layout(before, after, source, colours):
    """(mean IoU edited vs source, mean IoU unedited vs source) over the caption's objects."""
    def mean_iou(objects):
        values = []
        for colour in colours:
            a, s = by_colour(objects, colour), by_colour(source, colour)
            values.append(iou(a.mask, s.mask) if a is not None and s is not None else 0.0)
        return float(np.mean(values))

    return mean_iou(after), mean_iou(before)


def summary(values):
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    spread = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


def run(sg, seeds, steps, guidance_scale, setting, progress=print, scale=None):
    """Measurements for every seed; images of the first seed for the example sheet. `scale`, when
    given, replaces the setting's self-guidance scale v for every edit kind."""
    settings_for, keep = SETTINGS[setting]
    guided = settings_for if scale is None else (lambda kind, n: {**settings_for(kind, n), "self_guidance_scale": scale})
    rows, skipped, example = [], 0, None
    spare = [c for c in COLOURS]
    for k, caption in enumerate(captions(seeds)):
        (colour_a, shape_a), (colour_b, _) = parse_caption(caption)
        base = sg(caption, num_inference_steps=steps, guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(k))
        image0 = to_array(base.images[0])
        read0 = read_scene(image0)
        if not matches_caption(read0, caption):
            skipped += 1
            continue
        a0 = by_colour(read0, colour_a)
        dx = 0.25 if a0.centroid[0] < 0.5 else -0.25
        common = dict(num_inference_steps=steps, guidance_scale=guidance_scale, trace=base.trace)
        row = {"caption": caption, "seed": k}

        moved = sg(caption, edits=[move(shape_a, dx=dx, **keep)], **guided("move", steps), **common)
        image1 = to_array(moved.images[0])
        row["move"] = measure_move(read0, read_scene(image1), colour_a, colour_b, dx, 0.0)

        bigger = sg(caption, edits=[resize(shape_a, 2.0, **keep)], **guided("resize", steps), **common)
        image2 = to_array(bigger.images[0])
        row["resize"] = measure_resize(read0, read_scene(image2), colour_a)

        source_colour = next(c for c in spare if c not in (colour_a, colour_b))
        source = sg(f"a {source_colour} {shape_a}", num_inference_steps=steps, guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(1000 + k))
        looked = sg(caption, edits=[copy_appearance(shape_a, source.trace)], **guided("copy_appearance", steps), **common)
        image3 = to_array(looked.images[0])
        row["copy_appearance"] = measure_appearance(image0, image3, read0, read_scene(image3), colour_a, source_colour)

        layout_source = sg(caption, num_inference_steps=steps, guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(2000 + k))
        laid = sg(caption, edits=[copy_layout(layout_source.trace)], **guided("copy_layout", steps), **common)
        image4 = to_array(laid.images[0])
        row["copy_layout"] = measure_layout(read0, read_scene(image4), read_scene(to_array(layout_source.images[0])), [colour_a, colour_b])
        rows.append(row)
        if example is None:
            example = (caption, [image0, image1, image2, to_array(source.images[0]), image3, to_array(layout_source.images[0]), image4])
        progress(f"  [{setting}] {k + 1}/{seeds} {caption!r}")
    return rows, skipped, example


def table(results):
    header = (
        "| path | weights | images read | move error (px) | keep IoU | resize ratio (asked 2.0) | "
        "appearance distance before -> after | read as source colour | layout IoU unedited -> edited |"
    )
    lines = [header, "|" + "---|" * 9]
    for (mode, setting), (rows, skipped) in results.items():
        moves = [r["move"] for r in rows if r["move"]]
        looks = [r["copy_appearance"] for r in rows if r["copy_appearance"]]
        layouts = [r["copy_layout"] for r in rows]
        lines.append(
            f"| {mode} | {setting} | {len(rows)}/{len(rows) + skipped} | {summary([m[0] for m in moves])} | "
            f"{summary([m[2] for m in moves])} | {summary([r['resize'] for r in rows])} | "
            f"{summary([l[0] for l in looks])} -> {summary([l[1] for l in looks])} | "
            f"{sum(l[2] for l in looks)}/{len(looks)} | "
            f"{summary([l[1] for l in layouts])} -> {summary([l[0] for l in layouts])} |"
        )
    return "\n".join(lines)


def example_sheet(example, path):
    import PIL.Image

    caption, images = example
    tiles = [PIL.Image.fromarray(i).resize((128, 128), PIL.Image.NEAREST) for i in images]
    sheet = PIL.Image.new("RGB", (128 * len(tiles), 128), "white")
    for n, tile in enumerate(tiles):
        sheet.paste(tile, (128 * n, 0))
    sheet.save(path)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help='"default", "tiny" or a local pipeline folder')
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--modes", default="reference,fast")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--out", default=os.path.join("outputs", "bench"))
    parser.add_argument("--scale", default=None, help="comma-separated self-guidance scales v that replace each setting's own (a sweep)")
    parser.add_argument("--results", action="store_true", help="write the table into benchmarks/RESULTS.md")
    args = parser.parse_args(argv)

    from sgfast.shapes import load_pipeline

    pipe, name = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    os.makedirs(args.out, exist_ok=True)
    results, examples, start = {}, {}, time.perf_counter()
    for mode in args.modes.split(","):
        sg = SelfGuidancePipeline.from_pipe(pipe, mode=mode)
        for setting in args.settings.split(","):
            for scale in [None] if args.scale is None else [float(v) for v in args.scale.split(",")]:
                label = setting if scale is None else f"{setting}, v={scale:g}"
                rows, skipped, example = run(sg, args.seeds, args.steps, args.guidance_scale, setting, scale=scale)
                results[(mode, label)] = (rows, skipped)
                examples[(mode, label)] = example
    elapsed = time.perf_counter() - start
    text = table(results)
    print(f"\nmodel: {name}; {args.seeds} seeds, {args.steps} DDIM steps, guidance scale {args.guidance_scale}; {elapsed:.0f} s\n")
    print(text)
    json_path = os.path.join(args.out, "quality.json")
    with open(json_path, "w") as f:
        json.dump({f"{m}/{s}": {"rows": r, "skipped": k} for (m, s), (r, k) in results.items()}, f, default=float, indent=1)
    written = [json_path]
    for (mode, setting), example in examples.items():
        if example is not None:
            name_ = f"quality_{mode}_{setting.replace(', ', '_').replace(' ', '_').replace('=', '')}.png"
            written.append(example_sheet(example, os.path.join(args.out, name_)))
    print("\nwrote " + ", ".join(written))
    print("sheet columns: original | move | resize | appearance source | copy appearance | layout source | copy layout")
    if args.results:
        command = "python -m benchmarks.quality " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
        trained = os.path.join(getattr(pipe, "name_or_path", "") or "", "training.json")
        step = f", training step {json.load(open(trained))['step']}" if os.path.exists(trained) else ""
        section = (
            f"## Edit fidelity ({args.model} model{step})\n\n"
            f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__}; `{command.strip()}` ({elapsed:.0f} s)\n\n"
            f"{args.seeds} held-out two-object captions, one seed each, {args.steps} DDIM steps, guidance scale "
            f"{args.guidance_scale}; an image counts when the reader finds the caption's objects in the unedited image. "
            f"Mean ± standard deviation over those images.\n\n{text}\n"
        )
        replace_section("benchmarks/RESULTS.md", "## Edit fidelity", section)


def replace_section(path, heading, section):
    """Put `section` in place of the one starting with `heading`, up to the next heading of any level
    (so hand-written subsections after it stay), or append it."""
    text = open(path).read() if os.path.exists(path) else "# Results\n"
    start = text.find(heading)
    if start < 0:
        text = text.rstrip() + "\n\n" + section
    else:
        end = text.find("\n#", start + len(heading))
        text = text[:start] + section + ("" if end < 0 else text[end:])
    with open(path, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
