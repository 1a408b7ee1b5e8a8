"""Edit fidelity in pixels: do the edits do what they say on the built-in model?

For each held-out two-object caption and seed, generate the unedited image, read it with the scene
reader, apply each edit with a bare call (the model's own settings, `self_guidance.json`), read the
edited image and compare:

- move (0.25 of the width, toward the far side): the error of the moved object's centroid in x and
  in y (fractions of the width), and the IoU of the other object with itself before the move;
- resize x2 and x0.5: the measured area ratio, and the other object's;
- copy appearance (from a second generation of the same shape in a third colour), as the paper
  composes it: the caption names the object without a colour ("a circle and a blue square"), so that
  the prompt does not contradict the source; how often the reader reads the source colour there
  before (chance) and after the edit, and the colour distance (RGB, 0-255) before and after. Also
  the harder case, the caption naming the object's own colour ("a red circle ..."): how often the
  source colour wins against it;
- copy layout: IoU of the edited objects' masks with the source's, against the unedited image's.

    python -m benchmarks.quality --seeds 20                  # table, JSON and an example sheet
    python -m benchmarks.quality --seeds 20 --results        # also updates benchmarks/RESULTS.md
    python -m benchmarks.quality --settings paper            # the paper's defaults instead of the model's
    python -m benchmarks.quality --settings my.json          # another settings file (same format)
    python -m benchmarks.quality --scale 1,1.5,2             # a sweep of the self-guidance scale v
    python -m benchmarks.quality --seeds 6 --tuning --edits move,resize   # the captions settings are tuned on
    python -m benchmarks.quality --cases-from 1070000,500 --steps 30     # cases of neither set
    python -m benchmarks.quality --scheduler UniPCMultistepScheduler --steps 20 --edits move   # another sampler

Besides what each edit asked, a second table reads its side effects: the moved object's area ratio
(a move holds its size), the resized object's centroid drift (a resize holds its place), and the
other objects' IoU and colour shift (RGB distance of their mean colours) for every edit.
"""

import argparse
import json
import math
import os
import platform
import statistics
import time

import numpy as np
import torch

from sgfast import SelfGuidancePipeline, copy_appearance, copy_layout, move, resize
from sgfast.shapes.scenes import (
    COLOURS, HELDOUT_SEED, by_colour, make_scene, matches_caption, mean_colour, object_change, parse_caption, read_edit, read_scene,
)

MOVE = 0.25  # of the width
SCALES = (2.0, 0.5)


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


def other_objects(change):
    """(lowest IoU, largest colour shift) of the objects an edit was not asked to change; an object
    lost in the edited image counts as IoU 0 and colour shift NaN."""
    others = list(change["others"].values())
    if not others:
        return float("nan"), float("nan")
    lost = any(o is None for o in others)
    return (0.0 if lost else min(o["iou"] for o in others)), (float("nan") if lost else max(o["colour"] for o in others))


def measure_move(image_before, image_after, caption, word, dx, dy):
    """The move of `word`'s object by (dx, dy), read in pixels: dict of error_x, error_y (fractions of
    the width), error (their length), measured (dx, dy), area (the moved object's area ratio),
    other_iou and other_colour (`other_objects`); None when the moved object is not read."""
    change = read_edit(caption, word, image_before, image_after)
    if change is None or change["object"] is None:
        return None
    moved = change["object"]
    error_x, error_y = abs(moved["dx"] - dx), abs(moved["dy"] - dy)
    other_iou, other_colour = other_objects(change)
    return dict(error_x=error_x, error_y=error_y, error=math.hypot(error_x, error_y), measured=(moved["dx"], moved["dy"]),
                area=moved["area"], other_iou=other_iou, other_colour=other_colour)


def measure_held(image_before, image_after, colours):
    """dict(other_iou, other_colour): the lowest IoU and the largest colour shift (`object_change`) of
    the objects of `colours` between two images; a lost object counts as IoU 0 and colour shift NaN."""
    read_before, read_after = read_scene(image_before), read_scene(image_after)
    changes = []
    for colour in colours:
        a, b = by_colour(read_before, colour), by_colour(read_after, colour)
        changes.append(None if a is None or b is None else object_change(image_before, image_after, a, b))
    other_iou, other_colour = other_objects({"others": dict(enumerate(changes))})
    return dict(other_iou=other_iou, other_colour=other_colour)


def measure_resize(image_before, image_after, caption, word):
    """The resize of `word`'s object, read in pixels: dict of ratio (its area ratio), drift (how far its
    centroid moved, fractions of the width), other_area (the other objects' smallest area ratio; 0 for
    a lost one), other_iou and other_colour (`other_objects`); None when the object is not read."""
    change = read_edit(caption, word, image_before, image_after)
    if change is None or change["object"] is None:
        return None
    resized = change["object"]
    other_iou, other_colour = other_objects(change)
    areas = [0.0 if o is None else o["area"] for o in change["others"].values()]
    return dict(ratio=resized["area"], drift=math.hypot(resized["dx"], resized["dy"]), other_area=min(areas, default=float("nan")),
                other_iou=other_iou, other_colour=other_colour)


def measure_appearance(image_before, image_after, before, after, colour, source_colour):
    """(distance before, distance after, read as the source colour) for the object at `colour`'s place;
    it counts as read only when the edited image still holds as many objects as the original (a
    guidance step that breaks the image up can leave a blob of any colour there)."""
    a0 = by_colour(before, colour)
    if a0 is None:
        return None
    target = np.array(COLOURS[source_colour], dtype=np.float64)
    edited = nearest(after, a0.centroid)
    mask = edited.mask if edited is not None else a0.mask
    distance_before = float(np.linalg.norm(mean_colour(image_before, a0.mask) - target))
    distance_after = float(np.linalg.norm(mean_colour(image_after, mask) - target))
    return distance_before, distance_after, edited is not None and edited.colour == source_colour and len(after) == len(before)


def caption_without_colour(caption, colour):
    """The caption with `colour`'s word left out: "a circle and a blue square"."""
    return " and ".join(part.replace(f"a {colour} ", "a ", 1) for part in caption.split(" and "))


def measure_open_appearance(image_before, image_after, before, after, shape, other_colour, other_shape, source_colour):
    """(distance before, distance after, read as the source before, after) for the object the caption
    leaves uncoloured: the largest read object not of `other_colour`. It reads as the source when the
    image holds two objects, the other one still of its colour and shape, and this one of its own
    shape and the source's colour (a source colour that lands on the other's shape does not count)."""
    target = np.array(COLOURS[source_colour], dtype=np.float64)

    def measure(image, objects):
        edited = max((o for o in objects if o.colour != other_colour), key=lambda o: o.area, default=None)
        if edited is None:
            return float("nan"), False
        other = by_colour(objects, other_colour)
        read = (len(objects) == 2 and other is not None and other.shape == other_shape
                and edited.colour == source_colour and edited.shape == shape)
        return float(np.linalg.norm(mean_colour(image, edited.mask) - target)), read

    (d0, r0), (d1, r1) = measure(image_before, before), measure(image_after, after)
    return d0, d1, r0, r1


def measure_layout(before, after, source, colours):
    """(mean IoU edited vs source, mean IoU unedited vs source) over the caption's objects."""
    def mean_iou(objects):
        values = []
        for colour in colours:
            a, s = by_colour(objects, colour), by_colour(source, colour)
            values.append(iou(a.mask, s.mask) if a is not None and s is not None else 0.0)
        return float(np.mean(values))

    return mean_iou(after), mean_iou(before)


def median(values):
    values = [v for v in values if v is not None and v == v]  # not None, not NaN
    return statistics.median(values) if values else float("nan")


def settings_for(setting):
    """from_pipe's `settings` for a --settings value: "model" (the folder's own), "paper", or a file."""
    return None if setting == "model" else setting


EDITS = ("move", "resize", "copy_appearance", "copy_layout")


# Captions and seeds that settings are tuned on (`--tuning`), apart from the reported ones.
TUNING_CAPTIONS, TUNING_SEEDS = HELDOUT_SEED + 60_000, 100


def run(sg, seeds, steps, guidance_scale, setting="model", progress=print, scale=None, edits=EDITS, tuning=False):
    """Measurements for every seed; images of the first seed for the example sheet. Edits are bare
    calls: the pipeline's settings decide scale, normalisation, schedule and keep weights; `scale`,
    when given, is passed as every call's self-guidance scale v; `edits`: the kinds to measure;
    `tuning`: the tuning captions and seeds instead of the reported ones, or (first held-out scene,
    first generator seed) of other cases."""
    guided = {} if scale is None else {"self_guidance_scale": scale}
    rows, skipped, example = [], 0, None
    first_caption, first_seed = tuning if isinstance(tuning, tuple) else (TUNING_CAPTIONS, TUNING_SEEDS) if tuning else (HELDOUT_SEED + 50_000, 0)
    for k, caption in enumerate(captions(seeds, first_caption)):
        (colour_a, shape_a), (colour_b, shape_b) = parse_caption(caption)
        common = dict(num_inference_steps=steps, guidance_scale=guidance_scale)
        base = sg(caption, generator=torch.Generator().manual_seed(first_seed + k), **common)
        image0 = to_array(base.images[0])
        read0 = read_scene(image0)
        if not matches_caption(read0, caption):
            skipped += 1
            continue
        a0 = by_colour(read0, colour_a)
        dx = MOVE if a0.centroid[0] < 0.5 else -MOVE
        edit = dict(trace=base.trace, **guided, **common)
        row = {"caption": caption, "seed": first_seed + k}

        moved = resized = looked = laid = source = layout_source = None
        if "move" in edits:
            moved = to_array(sg(caption, edits=[move(shape_a, dx=dx)], **edit).images[0])
            row["move"] = measure_move(image0, moved, caption, shape_a, dx, 0.0)
        resized = []
        for factor in SCALES if "resize" in edits else ():
            resized.append(to_array(sg(caption, edits=[resize(shape_a, factor)], **edit).images[0]))
            row[f"resize x{factor:g}"] = measure_resize(image0, resized[-1], caption, shape_a)

        if "copy_appearance" in edits:
            source_colour = next(c for c in COLOURS if c not in (colour_a, colour_b))
            source = sg(f"a {source_colour} {shape_a}", generator=torch.Generator().manual_seed(1000 + first_seed + k), **common)
            # The paper's composition: the target's caption names the object, the source gives its look.
            open_caption = caption_without_colour(caption, colour_a)
            open_base = sg(open_caption, generator=torch.Generator().manual_seed(first_seed + k), **common)
            open0 = to_array(open_base.images[0])
            looked = to_array(sg(open_caption, edits=[copy_appearance(shape_a, source.trace)], **{**edit, "trace": open_base.trace}).images[0])
            row["copy_appearance"] = measure_open_appearance(open0, looked, read_scene(open0), read_scene(looked), shape_a, colour_b, shape_b, source_colour)
            row["copy_appearance held"] = measure_held(open0, looked, [colour_b])
            # The harder case: the caption names the object's own colour, which the source contradicts.
            named = to_array(sg(caption, edits=[copy_appearance(shape_a, source.trace)], **edit).images[0])
            row["copy_appearance named"] = measure_appearance(image0, named, read0, read_scene(named), colour_a, source_colour)
        if "copy_layout" in edits:
            layout_source = sg(caption, generator=torch.Generator().manual_seed(2000 + first_seed + k), **common)
            laid = to_array(sg(caption, edits=[copy_layout(layout_source.trace)], **edit).images[0])
            row["copy_layout"] = measure_layout(read0, read_scene(laid), read_scene(to_array(layout_source.images[0])), [colour_a, colour_b])
            row["copy_layout held"] = measure_held(image0, laid, [colour_a, colour_b])
        rows.append(row)
        if example is None:
            sources = [to_array(t.images[0]) if t is not None else None for t in (source, layout_source)]
            tiles = [image0, moved, *resized, sources[0], looked, sources[1], laid]
            example = (caption, [t if t is not None else np.full_like(image0, 255) for t in tiles])
        progress(f"  [{setting}] {k + 1}/{seeds} {caption!r}")
    return rows, skipped, example


def within(values, target, tolerance):
    """'n/N' of values within `tolerance` (relative) of `target`."""
    values = [v for v in values if v is not None]
    return f"{sum(abs(v / target - 1) <= tolerance for v in values)}/{len(values)}"


def table(results):
    """Medians (the targets are medians) and how many images reach each target."""
    header = (
        "| path | settings | images read | move: median error x / y (of the width) | move: other's IoU, median | "
        "resize x2: ratio median (within 20%) | x2: other's area | resize x0.5: ratio median (within 20%) | x0.5: other's area | "
        "copy appearance (caption without its colour): read as source, unedited -> edited | colour distance before -> after | "
        "copy appearance, caption names its colour: read as source | copy layout: IoU unedited -> edited, median |"
    )
    lines = [header, "|" + "---|" * 13]
    for (mode, setting), (rows, skipped) in results.items():
        moves = [r["move"] for r in rows if r.get("move")]
        looks = [r["copy_appearance"] for r in rows if r.get("copy_appearance")]
        named = [r["copy_appearance named"] for r in rows if r.get("copy_appearance named")]
        layouts = [r["copy_layout"] for r in rows if "copy_layout" in r]
        cells = [mode, setting, f"{len(rows)}/{len(rows) + skipped}",
                 f"{median([m['error_x'] for m in moves]):.3f} / {median([m['error_y'] for m in moves]):.3f}",
                 f"{median([m['other_iou'] for m in moves]):.2f}"]
        for factor in SCALES:
            sizes = [r[f"resize x{factor:g}"] for r in rows if r.get(f"resize x{factor:g}")]
            cells += [f"{median([s['ratio'] for s in sizes]):.2f} ({within([s['ratio'] for s in sizes], factor, 0.2)})",
                      f"{median([s['other_area'] for s in sizes]):.2f} (within 15%: {within([s['other_area'] for s in sizes], 1.0, 0.15)})"]
        cells += [f"{sum(l[2] for l in looks)}/{len(looks)} -> {sum(l[3] for l in looks)}/{len(looks)}",
                  f"{median([l[0] for l in looks]):.0f} -> {median([l[1] for l in looks]):.0f}",
                  f"{sum(n[2] for n in named)}/{len(named)}",
                  f"{median([l[1] for l in layouts]):.2f} -> {median([l[0] for l in layouts]):.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


ON_TARGET = 0.08  # of the width: a move lands when its centroid ends this near its target
AREA_HELD = (0.8, 1.25)  # the moved object's area ratio that counts as its size held
RATIO_TOLERANCE = 0.25  # a resize lands within 25% of its asked area ratio ...
IN_PLACE = 0.06  # ... with its centroid within this of where it was (of the width)


def count(flags):
    flags = list(flags)
    return f"{sum(flags)}/{len(flags)}"


def move_lands(m):
    """On target, with the moved object's size held."""
    return m["error"] <= ON_TARGET and AREA_HELD[0] <= m["area"] <= AREA_HELD[1]


def resize_lands(r, factor):
    """Within RATIO_TOLERANCE of the asked ratio, in place."""
    return abs(r["ratio"] / factor - 1) <= RATIO_TOLERANCE and r["drift"] <= IN_PLACE


def held(entries):
    """"IoU / colour shift" medians of the objects an edit was not asked to change."""
    return f"{median([e['other_iou'] for e in entries]):.2f} / {median([e['other_colour'] for e in entries]):.0f}"


def side_effects_table(results):
    """What each edit did besides what it asked: the moved object's area, the resized object's drift,
    the other objects' IoU and colour shift (RGB distance of their mean colours, 0-255)."""
    header = (
        f"| path | settings | move: on target ({ON_TARGET}) | moved object's area ratio, median (in {AREA_HELD[0]}x-{AREA_HELD[1]}x) | "
        f"move: on target and area held | move: other's IoU / colour shift, median | "
        + " | ".join(f"resize x{f:g}: within {RATIO_TOLERANCE:.0%} | x{f:g}: drift, median (within {IN_PLACE}) | "
                     f"x{f:g}: within {RATIO_TOLERANCE:.0%} and in place | x{f:g}: other's IoU / colour shift" for f in SCALES)
        + " | copy appearance: other's IoU / colour shift | copy layout: objects' colour shift, median |"
    )
    lines = [header, "|" + "---|" * (6 + 4 * len(SCALES) + 2)]
    for (mode, setting), (rows, skipped) in results.items():
        moves = [r["move"] for r in rows if r.get("move")]
        cells = [mode, setting, count(m["error"] <= ON_TARGET for m in moves),
                 f"{median([m['area'] for m in moves]):.2f} ({count(AREA_HELD[0] <= m['area'] <= AREA_HELD[1] for m in moves)})",
                 count(move_lands(m) for m in moves), held(moves)]
        for factor in SCALES:
            sizes = [r[f"resize x{factor:g}"] for r in rows if r.get(f"resize x{factor:g}")]
            cells += [count(abs(s["ratio"] / factor - 1) <= RATIO_TOLERANCE for s in sizes),
                      f"{median([s['drift'] for s in sizes]):.3f} ({count(s['drift'] <= IN_PLACE for s in sizes)})",
                      count(resize_lands(s, factor) for s in sizes), held(sizes)]
        cells += [held([r["copy_appearance held"] for r in rows if r.get("copy_appearance held")]),
                  f"{median([r['copy_layout held']['other_colour'] for r in rows if r.get('copy_layout held')]):.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
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
    parser.add_argument("--modes", default="fast", help="SelfGuidancePipeline modes, comma-separated (reference and fast give the same figures)")
    parser.add_argument("--settings", default="model", help='comma-separated: "model" (the model folder\'s own), "paper", or settings files')
    parser.add_argument("--out", default=os.path.join("outputs", "bench"))
    parser.add_argument("--edits", default=",".join(EDITS), help="the edit kinds to measure, comma-separated")
    parser.add_argument("--scale", default=None, help="comma-separated self-guidance scales v that replace each setting's own (a sweep)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: OpenMP's spinning threads slow every step on a shared machine)")
    parser.add_argument("--device", default="cpu", help="torch device of the pipeline (cpu, cuda); the initial noise is drawn on the CPU either way")
    parser.add_argument("--scheduler", default=None, metavar="CLASS",
                        help="sample with this diffusers scheduler (one of the model's compatible classes, e.g. "
                             "UniPCMultistepScheduler), built from the model's scheduler config, instead of its own")
    parser.add_argument("--results", action="store_true", help="write the table into benchmarks/RESULTS.md")
    parser.add_argument("--tuning", action="store_true", help="the captions and seeds settings are tuned on, not the reported ones")
    parser.add_argument("--cases-from", default=None, metavar="SCENE,SEED",
                        help="cases of neither set: captions from held-out scene SCENE on, generator seeds from SEED on")
    args = parser.parse_args(argv)
    if args.cases_from is not None:
        try:
            scene, seed = (int(v) for v in args.cases_from.split(","))
        except ValueError:
            parser.error(f"--cases-from takes SCENE,SEED (two ints), got {args.cases_from!r}")
        args.tuning = (scene, seed)
    if args.results and args.scheduler is not None:
        parser.error("--results writes the table of the model's own scheduler into RESULTS.md; run --scheduler without it")
    unknown = set(args.edits.split(",")) - set(EDITS)
    if unknown:
        parser.error(f"unknown edit kinds {sorted(unknown)}; allowed: {', '.join(EDITS)}")

    from sgfast.shapes import load_pipeline

    torch.set_num_threads(args.threads)

    pipe, name = load_pipeline(args.model)
    if args.scheduler is not None:
        compatible = {cls.__name__: cls for cls in pipe.scheduler.compatibles}
        if args.scheduler not in compatible:
            parser.error(f"--scheduler {args.scheduler!r} is not a scheduler this model can use; allowed: {', '.join(sorted(compatible))}")
        pipe.scheduler = compatible[args.scheduler].from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(args.device)
    os.makedirs(args.out, exist_ok=True)
    results, examples, start = {}, {}, time.perf_counter()
    for mode in args.modes.split(","):
        for setting in args.settings.split(","):
            sg = SelfGuidancePipeline.from_pipe(pipe, mode=mode, settings=settings_for(setting))
            for scale in [None] if args.scale is None else [float(v) for v in args.scale.split(",")]:
                label = setting if scale is None else f"{setting}, v={scale:g}"
                rows, skipped, example = run(sg, args.seeds, args.steps, args.guidance_scale, setting, scale=scale, edits=args.edits.split(","), tuning=args.tuning)
                results[(mode, label)] = (rows, skipped)
                examples[(mode, label)] = example
    elapsed = time.perf_counter() - start
    text = table(results) + "\n\nSide effects (what each edit changed besides what it asked):\n\n" + side_effects_table(results)
    which = f"from scene {args.tuning[0]}, seed {args.tuning[1]}" if isinstance(args.tuning, tuple) else "tuning" if args.tuning else "reported"
    print(f"\nmodel: {name}; {args.seeds} seeds ({which} captions), {args.steps} {type(pipe.scheduler).__name__} steps, guidance scale {args.guidance_scale}; {elapsed:.0f} s\n")
    print(text)
    json_path = os.path.join(args.out, "quality.json")
    with open(json_path, "w") as f:
        json.dump({f"{m}/{s}": {"rows": r, "skipped": k} for (m, s), (r, k) in results.items()}, f, default=float, indent=1)
    written = [json_path]
    for (mode, setting), example in examples.items():
        if example is not None:
            label = os.path.splitext(os.path.basename(setting))[0]
            name_ = f"quality_{mode}_{label.replace(', ', '_').replace(' ', '_').replace('=', '')}.png"
            written.append(example_sheet(example, os.path.join(args.out, name_)))
    print("\nwrote " + ", ".join(written))
    print("sheet columns: original | move | resize x2 | resize x0.5 | appearance source | copy appearance | layout source | copy layout")
    if args.results:
        command = "python -m benchmarks.quality " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
        trained = os.path.join(getattr(pipe, "name_or_path", "") or "", "training.json")
        step = f", training step {json.load(open(trained))['step']}" if os.path.exists(trained) else ""
        section = (
            f"## Edit fidelity ({args.model} model{step})\n\n"
            f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, device {args.device}"
            f"{' (' + torch.cuda.get_device_name() + ')' if args.device.startswith('cuda') else ''}, "
            f"torch {torch.__version__}; `{command.strip()}` ({elapsed:.0f} s)\n\n"
            f"{args.seeds} held-out two-object captions, one seed each, {args.steps} {type(pipe.scheduler).__name__} steps, guidance scale "
            f"{args.guidance_scale}, bare calls (the model's own settings unless named); an image counts when the reader finds "
            f"the caption's objects in the unedited image. Medians over those images; in brackets, how many reach the target.\n\n{text}\n"
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
