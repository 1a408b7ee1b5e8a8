"""Editing photos the built-in model never generated: scenes drawn by `sgfast.shapes.scenes` (its
training data generator, not its output) at seeds outside the training, held-out and validation
ranges, inverted with `sg.invert`, then regenerated, moved and resized.

- reconstruction: PSNR of the regeneration against the photo (and the VAE's own, the ceiling); the
  scene reader finds the same objects (colours) within 0.03 of the image width of where they are;
- move by 0.2 of the width: the moved object within 0.05 of its target, the others within 0.03 of
  where they were, every colour still read;
- resize x2 and x0.5: the object's area ratio within 25% of the request.

    python -m benchmarks.photo_edit --scenes 50 --results    # the table in benchmarks/RESULTS.md
"""

import argparse
import json
import os
import platform
import time

import numpy as np
import PIL.Image
import torch

from sgfast import SelfGuidancePipeline, move, resize
from sgfast.invert import edit_arguments
from sgfast.shapes import load_pipeline
from sgfast.shapes.scenes import GAP, MARGIN, SIZE, make_scene, read_scene

# Photos: seeds apart from the training streams, the held-out (1e6) and validation (2e6) scenes.
PHOTO_SEED = 3_000_000
MOVE_DX = 0.2


def photos(count, first_seed=PHOTO_SEED):
    """Scenes with distinct colours and a shape named once (the word the edits move and resize) that
    has room to move by MOVE_DX (`free_move`)."""
    found, seed = [], first_seed
    while len(found) < count:
        scene = make_scene(seed)
        colours = [o.colour for o in scene.objects]
        unique = [o for o in scene.objects if [p.shape for p in scene.objects].count(o.shape) == 1]
        if len(set(colours)) == len(colours) and unique and free_move(scene, unique[0]) is not None:
            found.append((seed, scene, unique[0]))
        seed += 1
    return found


# Move offsets tried in turn (image fractions): the first whose target is free is asked for.
MOVES = ((MOVE_DX, 0.0), (-MOVE_DX, 0.0), (0.0, MOVE_DX), (0.0, -MOVE_DX))


def free_move(scene, word_object):
    """The first offset of MOVES that keeps the object inside the image and clear of the others
    (the generator's own margin and gap): a move onto another object asks the model to overlap two
    objects it never saw overlap. None when no offset is free."""
    x0, y0, x1, y1 = word_object.bbox
    for dx, dy in MOVES:
        sx, sy = round(dx * SIZE), round(dy * SIZE)
        box = (x0 + sx, y0 + sy, x1 + sx, y1 + sy)
        inside = box[0] >= MARGIN and box[1] >= MARGIN and box[2] <= SIZE - MARGIN and box[3] <= SIZE - MARGIN
        clear = all(
            box[0] >= o.bbox[2] + GAP or o.bbox[0] >= box[2] + GAP or box[1] >= o.bbox[3] + GAP or o.bbox[1] >= box[3] + GAP
            for o in scene.objects if o is not word_object
        )
        if inside and clear:
            return dx, dy
    return None


def by_colour(objects, colour):
    found = [o for o in objects if o.colour == colour]
    return found[0] if len(found) == 1 else None


def same_places(before, after, colours, tolerance=0.03):
    """Every colour of `colours` read once after, its centroid within `tolerance` of before."""
    for colour in colours:
        a, b = by_colour(before, colour), by_colour(after, colour)
        if a is None or b is None or np.hypot(a.centroid[0] - b.centroid[0], a.centroid[1] - b.centroid[1]) > tolerance:
            return False
    return True


def check_reconstruction(scene, image):
    read = read_scene(np.asarray(image))
    colours = [o.colour for o in scene.objects]
    return len(read) == len(colours) and same_places(scene.objects, read, colours)


def check_move(scene, target_object, offset, image):
    read = read_scene(np.asarray(image))
    moved = by_colour(read, target_object.colour)
    if moved is None:
        return False, None
    target = (target_object.centroid[0] + offset[0], target_object.centroid[1] + offset[1])
    error = float(np.hypot(moved.centroid[0] - target[0], moved.centroid[1] - target[1]))
    others = [o.colour for o in scene.objects if o.colour != target_object.colour]
    held = same_places(scene.objects, read, others) and len(read) == len(scene.objects)
    return error <= 0.05 and held, error


def check_resize(target_object, scale, image):
    grown = by_colour(read_scene(np.asarray(image)), target_object.colour)
    if grown is None:
        return False, None
    ratio = grown.area / target_object.area
    return abs(ratio / scale - 1) <= 0.25, ratio


def edit(sg, inverted, caption, edits):
    """A bare call: weights, keep terms, strength and guidance are the model's own photo settings."""
    return sg(caption, edits=edits, trace=inverted, **edit_arguments(inverted, edits=edits)).images[0]


def measure(sg, seed, scene, word_object, steps, kinds=("move", "resize"), move_arguments=None):
    """One photo: reconstruction, and the edits of `kinds`. Returns a row and the images."""
    photo = PIL.Image.fromarray(scene.image)
    inverted = sg.invert(photo, scene.caption, num_inference_steps=steps)
    info = inverted.inversion
    row = dict(seed=seed, caption=scene.caption, word=word_object.shape, psnr=info["psnr"], vae_psnr=info["vae_psnr"])
    row["reconstruction_ok"] = check_reconstruction(scene, info["reconstruction"])
    images = [photo, info["reconstruction"]]
    offset = free_move(scene, word_object)
    if "move" in kinds and offset is not None:
        image = edit(sg, inverted, scene.caption, [move(word_object.shape, dx=offset[0], dy=offset[1], **(move_arguments or {}))])
        row["move_ok"], row["move_error"] = check_move(scene, word_object, offset, image)
        images.append(image)
    if "resize" in kinds:
        for scale in (2.0, 0.5):
            image = edit(sg, inverted, scene.caption, [resize(word_object.shape, scale)])
            row[f"resize_{scale:g}_ok"], row[f"resize_{scale:g}_ratio"] = check_resize(word_object, scale, image)
            images.append(image)
    return row, images


def share(rows, key):
    values = [r[key] for r in rows if key in r]
    return f"{sum(values)}/{len(values)} ({100 * sum(values) / max(len(values), 1):.0f}%)"


def table(rows):
    psnr = [r["psnr"] for r in rows]
    errors = [1.0 if r.get("move_error") is None else r["move_error"] for r in rows if "move_ok" in r]  # 1: object lost
    vae = [r["vae_psnr"] for r in rows]
    lines = [
        "| measure | result | target |",
        "|---|---|---|",
        f"| reconstruction PSNR (dB), mean / min | {np.mean(psnr):.1f} / {np.min(psnr):.1f} (VAE alone {np.mean(vae):.1f}) | |",
        f"| reader: same objects, same places (0.03) | {share(rows, 'reconstruction_ok')} | >= 95% |",
        f"| move {MOVE_DX} of the width: on target (0.05), others held (0.03), every colour read | {share(rows, 'move_ok')} | >= 80% |",
        f"| move: distance to target, median / 90th percentile | {np.median(errors):.3f} / {np.percentile(errors, 90):.3f} | |",
        f"| resize x2: area ratio within 25% | {share(rows, 'resize_2_ok')} | >= 70% |",
        f"| resize x0.5: area ratio within 25% | {share(rows, 'resize_0.5_ok')} | >= 70% |",
    ]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.photo_edit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=50)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--out", default=os.path.join("outputs", "bench"))
    parser.add_argument("--results", action="store_true", help="write the table into benchmarks/RESULTS.md")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (on a small shared CPU more threads run slower)")
    parser.add_argument("--only", default=None, help="comma-separated scene numbers (1-based, of the --scenes drawn) to run, e.g. 3,8,18")
    parser.add_argument("--kinds", default="move,resize", help="the edits to measure: move, resize or both (comma-separated)")
    parser.add_argument("--move", default=None, help='extra move arguments as JSON, e.g. \'{"keep_own_shape_weight": 4}\' (over the photo settings)')
    args = parser.parse_args(argv)
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    if not kinds or set(kinds) - {"move", "resize"}:
        parser.error(f"--kinds takes move and/or resize, got {args.kinds!r}")
    only = None
    if args.only:
        try:
            only = sorted({int(n) for n in args.only.split(",")})
        except ValueError:
            parser.error(f"--only takes comma-separated scene numbers, got {args.only!r}")
        if only[0] < 1 or only[-1] > args.scenes:
            parser.error(f"--only: scene numbers must be in [1, {args.scenes}], got {args.only!r}")
    move_arguments = json.loads(args.move) if args.move else None
    if move_arguments is not None and not isinstance(move_arguments, dict):
        parser.error(f"--move takes a JSON object of move arguments, got {args.move!r}")
    if args.results and (only is not None or kinds != ("move", "resize") or move_arguments):
        parser.error("--results writes the full table: run it without --only, --kinds and --move")
    # A 64x64 model's ops are too small to split: with 2 threads on a busy 2-core machine, torch's
    # thread team spun against other processes and a scene took ~10x longer than with one.
    torch.set_num_threads(args.threads)
    pipe, name = load_pipeline("default")
    pipe.set_progress_bar_config(disable=True)
    sg = SelfGuidancePipeline.from_pipe(pipe)
    os.makedirs(args.out, exist_ok=True)
    rows, start = [], time.perf_counter()
    for n, (seed, scene, word_object) in enumerate(photos(args.scenes)):
        if only is not None and n + 1 not in only:
            continue
        row, images = measure(sg, seed, scene, word_object, args.steps, kinds, move_arguments)
        row["scene"] = n + 1
        rows.append(row)
        print(f"  {n + 1}/{args.scenes} {scene.caption!r}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if k not in ("caption", "seed", "scene")), flush=True)
        if n == 0:
            sheet = PIL.Image.new("RGB", (128 * len(images), 128), "white")
            for i, image in enumerate(images):
                sheet.paste(image.resize((128, 128), PIL.Image.NEAREST), (128 * i, 0))
            sheet.save(os.path.join(args.out, "photo_edit.png"))
    elapsed = time.perf_counter() - start
    text = table(rows)
    print(f"\n{len(rows)} photos, {args.steps} DDIM steps; {elapsed:.0f} s\n{text}")
    print(f"wrote {os.path.join(args.out, 'photo_edit.png')} (photo | reconstruction | move | resize x2 | resize x0.5)")
    if "move" in kinds:
        print("move misses (scene numbers): " + ", ".join(str(r["scene"]) for r in rows if "move_ok" in r and not r["move_ok"]))
    if args.results:
        from benchmarks.quality import replace_section

        command = "python -m benchmarks.photo_edit " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
        section = (
            f"## Photo editing (built-in model)\n\n{time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__}; `{command.strip()}` ({elapsed:.0f} s)\n\n"
            f"{len(rows)} scenes drawn by `sgfast.shapes.scenes` at seeds from {PHOTO_SEED} (outside the training, held-out "
            f"and validation ranges), inverted with `sg.invert` (negative-prompt inversion, {args.steps} DDIM steps, "
            f"guidance scale 5), edited by bare calls with the built-in model's photo settings (its `self_guidance.json`, "
            f"\"photo\": `{json.dumps(sg.settings.photo)}` over its tuned weights and keep terms). Moves ask for {MOVE_DX} of the width in the first direction of "
            f"right, left, down, up whose target is inside the image and clear of the other objects (`free_move`; "
            f"scenes with no free direction are skipped). "
            f"Example (first scene): `outputs/bench/photo_edit.png`, photo | reconstruction | move | resize x2 | resize x0.5.\n\n{text}\n"
        )
        replace_section("benchmarks/RESULTS.md", "## Photo editing", section)


if __name__ == "__main__":
    main()
