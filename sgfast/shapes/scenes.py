"""Synthetic shape scenes: the training data of the built-in model, and a reader for its images.

A scene is a 64x64 RGB image of one to three flat-coloured objects (circle, square, triangle) in
distinct palette colours on a plain light-grey background, with a caption such as
"a red circle and a blue square" and the exact ground truth of every object. Objects never overlap
and keep a gap of a few pixels between their bounding boxes, so they can be read back exactly.

Coordinates follow the rest of the package: pixel centres, x = (j + 0.5) / W, y = (i + 0.5) / H,
origin top-left.

- `make_scene(seed)`: one scene, a pure function of the seed.
- `sample_batch(rng, n)`: many scenes for training, drawn from a numpy Generator (thousands a second).
- `read_scene(image)`: colour segmentation + connected components + shape classification; reads the
  generator's own scenes exactly and tolerates the blur of generated images.
"""

from dataclasses import dataclass, field

import numpy as np

SIZE = 64
BACKGROUND = (240, 240, 240)
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (150, 40, 170),
}
SHAPES = ("circle", "square", "triangle")
COLOUR_NAMES = tuple(COLOURS)
MIN_OBJECTS, MAX_OBJECTS = 1, 3
MIN_SIDE, MAX_SIDE = 12, 20  # bounding-box side of an object, pixels
MARGIN = 2  # pixels between an object and the image border
GAP = 4  # pixels between the bounding boxes of two objects

# Every word a caption can use; the built-in tokenizer knows each as a single token.
CAPTION_WORDS = ("a", "and") + COLOUR_NAMES + SHAPES

_PALETTE = np.array([COLOURS[c] for c in COLOUR_NAMES], dtype=np.float32)  # (C, 3)


@dataclass
class SceneObject:
    colour: str
    shape: str
    mask: np.ndarray = field(repr=False)  # (H, W) bool
    centroid: tuple  # (x, y) in [0, 1], pixel centres
    area: int  # pixels
    bbox: tuple = ()  # (x0, y0, x1, y1) pixels, exclusive end; empty for objects read from images


@dataclass
class Scene:
    image: np.ndarray = field(repr=False)  # (H, W, 3) uint8
    caption: str
    objects: list


def caption_for(objects):
    """'a red circle', 'a red circle and a blue square', ... in the objects' order."""
    return " and ".join(f"a {o[0]} {o[1]}" for o in objects)


_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5  # pixel centres


def shape_mask(shape, x0, y0, side, size=SIZE):
    """Pixels (bool, size x size) of `shape` whose bounding box is [x0, x0+side) x [y0, y0+side).

    A pixel belongs to the shape when its centre does: circle of radius side/2 about the box centre,
    the full box for a square, an upward isosceles triangle (apex at the top middle, base along the
    bottom edge) for a triangle.
    """
    if size == SIZE:
        yy, xx = _YY, _XX
    else:
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    cx, cy, r = x0 + side / 2, y0 + side / 2, side / 2
    if shape == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    inside_box = (xx >= x0) & (xx < x0 + side) & (yy >= y0) & (yy < y0 + side)
    if shape == "square":
        return inside_box
    if shape == "triangle":
        return inside_box & (np.abs(xx - cx) <= (yy - y0) / 2)
    raise ValueError(f"unknown shape {shape!r}")


def _draw_layout(rng, count_probabilities=None):
    """[(colour, shape, x0, y0, side)] for one scene: distinct colours, non-overlapping boxes. The
    object count is uniform, or drawn with `count_probabilities` (one per count from MIN_OBJECTS)."""
    while True:
        if count_probabilities is None:
            count = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
        else:
            count = int(rng.choice(np.arange(MIN_OBJECTS, MAX_OBJECTS + 1), p=count_probabilities))
        colours = rng.choice(len(COLOUR_NAMES), size=count, replace=False)
        layout = []
        for c in colours:
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            for _ in range(50):
                side = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
                x0 = int(rng.integers(MARGIN, SIZE - MARGIN - side + 1))
                y0 = int(rng.integers(MARGIN, SIZE - MARGIN - side + 1))
                if all(
                    x0 >= x + s + GAP or x >= x0 + side + GAP or y0 >= y + s + GAP or y >= y0 + side + GAP
                    for _, _, x, y, s in layout
                ):
                    layout.append((COLOUR_NAMES[int(c)], shape, x0, y0, side))
                    break
            else:
                break  # no room: draw the scene again
        if len(layout) == count:
            return layout


def _render(layout, with_objects=True):
    image = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    objects = []
    for colour, shape, x0, y0, side in layout:
        mask = shape_mask(shape, x0, y0, side)
        image[mask] = COLOURS[colour]
        if with_objects:
            rows, cols = np.nonzero(mask)
            objects.append(
                SceneObject(
                    colour=colour,
                    shape=shape,
                    mask=mask,
                    centroid=(float((cols + 0.5).mean() / SIZE), float((rows + 0.5).mean() / SIZE)),
                    area=int(rows.size),
                    bbox=(x0, y0, x0 + side, y0 + side),
                )
            )
    return image, objects


def scene_from_rng(rng):
    layout = _draw_layout(rng)
    image, objects = _render(layout)
    return Scene(image=image, caption=caption_for([(o.colour, o.shape) for o in objects]), objects=objects)


def make_scene(seed):
    """One scene with its caption and ground truth; the same seed always gives the same scene."""
    return scene_from_rng(np.random.default_rng(seed))


def sample_batch(rng, n, with_masks=False, count_weights=None):
    """(images uint8 (n, H, W, 3), captions list of n str) drawn from numpy Generator `rng`, object
    counts uniform or weighted by `count_weights`.

    With `with_masks`, also each object's mask in caption order, bool (n, MAX_OBJECTS, H, W) (all
    False past a scene's last object); the images and captions are the same either way.
    """
    counts = MAX_OBJECTS - MIN_OBJECTS + 1
    if count_weights is not None and not (
        len(count_weights) == counts and all(w >= 0 for w in count_weights) and sum(count_weights) > 0
    ):
        raise ValueError(
            f"count_weights must be {counts} numbers >= 0 (for {MIN_OBJECTS} to {MAX_OBJECTS} objects) with a "
            f"positive sum, got {count_weights!r}"
        )
    probabilities = None if count_weights is None else np.asarray(count_weights, dtype=float) / sum(count_weights)
    images = np.empty((n, SIZE, SIZE, 3), dtype=np.uint8)
    masks = np.zeros((n, MAX_OBJECTS, SIZE, SIZE), dtype=bool) if with_masks else None
    captions = []
    for k in range(n):
        layout = _draw_layout(rng, probabilities)
        images[k], _ = _render(layout, with_objects=False)
        captions.append(caption_for([(c, s) for c, s, *_ in layout]))
        if with_masks:
            for j, (_, shape, x0, y0, side) in enumerate(layout):
                masks[k, j] = shape_mask(shape, x0, y0, side)
    return (images, captions, masks) if with_masks else (images, captions)


def parse_caption(caption):
    """[(colour, shape)] named by a caption written by `caption_for`."""
    objects = []
    for part in caption.split(" and "):
        words = part.split()
        if len(words) != 3 or words[0] != "a" or words[1] not in COLOURS or words[2] not in SHAPES:
            raise ValueError(f"not a scene caption: {caption!r}")
        objects.append((words[1], words[2]))
    return objects


# ---------------------------------------------------------------------------------------------
# Reader


def by_colour(objects, colour):
    """The largest read object of `colour`, or None."""
    matches = [o for o in objects if o.colour == colour]
    return max(matches, key=lambda o: o.area) if matches else None


def read_change(caption, word, before, after):
    """How the object that `word` names in a scene caption changed between two RGB images (as
    `read_scene` takes them): (dx, dy) of its centroid in image fractions and its area ratio, read with
    `read_scene`; None when either image lacks an object of its colour (or the caption is not one)."""
    try:
        objects = parse_caption(caption)
    except ValueError:
        return None
    colour = next((c for c, s in objects if word in (c, s)), None)
    if colour is None:
        return None
    a, b = by_colour(read_scene(before), colour), by_colour(read_scene(after), colour)
    if a is None or b is None:
        return None
    return (b.centroid[0] - a.centroid[0], b.centroid[1] - a.centroid[1]), b.area / a.area


def mean_colour(image, mask):
    """Mean RGB (0-255) of an image's pixels under a mask."""
    return np.asarray(image)[..., :3][mask].astype(np.float64).mean(0)


def object_change(image_before, image_after, before, after):
    """How object `before` (read from the first image) became `after` (read from the second): dict of
    dx, dy (centroid, image fractions), area (ratio), iou (of the masks) and colour (distance of the
    mean colours, RGB 0-255)."""
    union = np.logical_or(before.mask, after.mask).sum()
    shift = mean_colour(image_after, after.mask) - mean_colour(image_before, before.mask)
    return dict(
        dx=after.centroid[0] - before.centroid[0], dy=after.centroid[1] - before.centroid[1], area=after.area / before.area,
        iou=float(np.logical_and(before.mask, after.mask).sum() / union) if union else 0.0, colour=float(np.linalg.norm(shift)),
    )


def read_edit(caption, word, before, after):
    """What an edit of the object `word` names did, read in pixels: {"object": its object_change,
    "others": {"blue square": object_change, ...}}, each change None where the object is not read in
    the edited image (followed by its colour); None when the caption is not a scene caption or the
    unedited image lacks one of its objects."""
    try:
        objects = parse_caption(caption)
    except ValueError:
        return None
    images = np.asarray(before), np.asarray(after)
    read_before, read_after = read_scene(images[0]), read_scene(images[1])
    changes = {}
    for colour, shape in objects:
        a, b = by_colour(read_before, colour), by_colour(read_after, colour)
        if a is None:
            return None
        changes[f"{colour} {shape}"] = None if b is None else object_change(*images, a, b)
    edited = next((name for name in changes if word in name.split()), None)
    if edited is None:
        return None
    return {"object": changes.pop(edited), "others": changes}


def describe_scene(image):
    """The objects the reader sees in an RGB image: "green circle, blue square" (or "nothing")."""
    return ", ".join(f"{o.colour} {o.shape}" for o in read_scene(np.asarray(image))) or "nothing"


def describe_changes(caption, before, after):
    """What happened to each object of a scene caption between two RGB images, as the reader sees it:
    one line per object ("red circle: dx=-0.29 dy=+0.01 area x1.02 IoU 0.10 colour shift 4, reads red
    circle"; the colour shift is the distance of the mean colours, RGB 0-255). An object
    is followed by its colour, or, when no object of its colour is left (a copied appearance), by the
    nearest object. [] when the caption is not a scene caption."""
    try:
        objects = parse_caption(caption)
    except ValueError:
        return []
    read_before, read_after = read_scene(before), read_scene(after)
    lines = []
    for colour, shape in objects:
        a = by_colour(read_before, colour)
        if a is None:
            lines.append(f"{colour} {shape}: not found in the original")
            continue
        b = by_colour(read_after, colour) or min(
            read_after, key=lambda o: (o.centroid[0] - a.centroid[0]) ** 2 + (o.centroid[1] - a.centroid[1]) ** 2, default=None
        )
        if b is None:
            lines.append(f"{colour} {shape}: gone")
            continue
        change = object_change(np.asarray(before), np.asarray(after), a, b)
        lines.append(
            f"{colour} {shape}: dx={change['dx']:+.2f} dy={change['dy']:+.2f} area x{change['area']:.2f} "
            f"IoU {change['iou']:.2f} colour shift {change['colour']:.0f}, reads {b.colour} {b.shape}"
        )
    return lines


def _components(labels):
    """4-connected components of equal positive labels: int array, 0 = none, k = component id.

    Pure numpy: every labelled pixel starts with its own id and repeatedly takes the smallest id
    among its same-label neighbours, with pointer jumping through the ids to converge quickly.
    """
    h, w = labels.shape
    big = h * w + 1
    ids = np.where(labels > 0, np.arange(1, h * w + 1).reshape(h, w), big)
    same_down = (labels[1:] == labels[:-1]) & (labels[1:] > 0)
    same_right = (labels[:, 1:] == labels[:, :-1]) & (labels[:, 1:] > 0)
    while True:
        new = ids.copy()
        np.minimum(new[1:], np.where(same_down, ids[:-1], big), out=new[1:])
        np.minimum(new[:-1], np.where(same_down, ids[1:], big), out=new[:-1])
        np.minimum(new[:, 1:], np.where(same_right, ids[:, :-1], big), out=new[:, 1:])
        np.minimum(new[:, :-1], np.where(same_right, ids[:, 1:], big), out=new[:, :-1])
        # pointer jumping: an id is a pixel index; follow it to that pixel's current id
        flat = new.reshape(-1)
        valid = flat < big
        flat[valid] = flat[flat[valid] - 1]
        if np.array_equal(new, ids):
            break
        ids = new
    out = np.zeros((h, w), dtype=np.int64)
    mask = ids < big
    _, out[mask] = np.unique(ids[mask], return_inverse=True)
    out[mask] += 1
    return out


def classify_shape(mask):
    """'triangle', 'square' or 'circle' of a mask.

    Triangles (apex up) are bottom-heavy: most of their pixels lie below the middle of their
    bounding box, even when blur has eaten the apex; circles and squares are symmetric. Squares fill
    their bounding box (~1.0), circles ~0.785.
    """
    rows, cols = np.nonzero(mask)
    top, bottom = rows.min(), rows.max()
    mid = (top + bottom) / 2
    lower = ((rows > mid).sum() + 0.5 * (rows == mid).sum()) / rows.size
    if lower > 0.58:
        return "triangle"
    fill = rows.size / ((bottom - top + 1) * (cols.max() - cols.min() + 1))
    return "square" if fill >= 0.88 else "circle"


def segment_colours(image, max_distance=80.0, min_strength=0.5):
    """(H, W) int: 1 + palette index of a pixel's colour, 0 for background or no colour.

    Each pixel is matched against the line from the background to every palette colour (where a
    blurred edge's pixels lie): it takes the colour whose line passes nearest, when that distance is
    within `max_distance` (RGB, 0-255) and the pixel lies at least `min_strength` of the way from the
    background to the colour. The half-way cut puts a blurred edge where the sharp edge was, so
    masks keep their size and shape.
    """
    pixels = np.asarray(image, dtype=np.float32)[..., :3]
    bg = np.array(BACKGROUND, dtype=np.float32)
    dirs = _PALETTE - bg  # (C, 3)
    rel = pixels[..., None, :] - bg  # (H, W, 1, 3)
    strength = (rel * dirs).sum(-1) / (dirs * dirs).sum(-1)  # (H, W, C)
    residual = np.sqrt(((rel - strength[..., None] * dirs) ** 2).sum(-1))  # distance to each line
    residual = np.where(strength >= min_strength, residual, np.inf)
    nearest = residual.argmin(-1)
    close = np.take_along_axis(residual, nearest[..., None], -1)[..., 0] <= max_distance
    return np.where(close, nearest + 1, 0)


def read_scene(image, min_area=16, max_distance=80.0):
    """The objects in an RGB image (uint8 (H, W, 3) array or PIL image), left to right.

    Each is a SceneObject with colour, shape, mask, centroid (x, y) at pixel centres and area;
    components smaller than `min_area` pixels are ignored.
    """
    image = np.asarray(image)
    h, w = image.shape[:2]
    labels = segment_colours(image, max_distance)
    comps = _components(labels)
    objects = []
    for k in range(1, comps.max() + 1):
        mask = comps == k
        rows, cols = np.nonzero(mask)
        if rows.size < min_area:
            continue
        colour = COLOUR_NAMES[int(labels[rows[0], cols[0]]) - 1]
        objects.append(
            SceneObject(
                colour=colour,
                shape=classify_shape(mask),
                mask=mask,
                centroid=(float((cols + 0.5).mean() / w), float((rows + 0.5).mean() / h)),
                area=int(rows.size),
            )
        )
    objects.sort(key=lambda o: o.centroid)
    return objects


def matches_caption(objects, caption, check_shapes=False):
    """Whether objects read from an image are exactly the caption's: same colours, same count
    (and the same shape for each colour when `check_shapes`)."""
    wanted = parse_caption(caption)
    if len(objects) != len(wanted):
        return False
    if sorted(o.colour for o in objects) != sorted(c for c, _ in wanted):
        return False
    if check_shapes:
        shape_of = {o.colour: o.shape for o in objects}
        return all(shape_of[c] == s for c, s in wanted)
    return True


# ---------------------------------------------------------------------------------------------
# Evaluation helpers (quality gate, training sample sheets)

# Held-out scenes: `make_scene(HELDOUT_SEED + k)`. Training draws its scenes from generators seeded
# with sequences (seed, phase, step), a different family of streams.
HELDOUT_SEED = 1_000_000
# Validation scenes, scored at each export during training to pick the model to ship:
# `make_scene(VALIDATION_SEED + k)`, apart from the held-out ones the quality gate reports on.
VALIDATION_SEED = 2_000_000


def generate_and_read(pipe, captions, seed=0, steps=25, guidance_scale=5.0, batch=16):
    """Generate one image per caption (64x64, DDIM as configured in `pipe`), read each back.

    Returns (images uint8 (n, H, W, 3), objects read per image, ok per image: colours and count
    match the caption).
    """
    import torch

    images = []
    for start in range(0, len(captions), batch):
        chunk = captions[start : start + batch]
        gen = torch.Generator().manual_seed(seed + start)
        out = pipe(
            chunk, height=SIZE, width=SIZE, num_inference_steps=steps, guidance_scale=guidance_scale,
            generator=gen, output_type="np",
        ).images
        images.append((np.clip(out, 0, 1) * 255).round().astype(np.uint8))
    images = np.concatenate(images)
    read = [read_scene(im) for im in images]
    ok = [matches_caption(r, c) for r, c in zip(read, captions)]
    return images, read, ok


def caption_sheet(images, captions, ok=None, columns=4, scale=3):
    """A PIL image: each picture (upscaled) above its caption, marked with OK/FAIL when given."""
    from PIL import Image, ImageDraw

    n = len(images)
    rows = -(-n // columns)
    cell_w, text_h = SIZE * scale, 28
    sheet = Image.new("RGB", (columns * cell_w, rows * (cell_w + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (im, cap) in enumerate(zip(images, captions)):
        x, y = (k % columns) * cell_w, (k // columns) * (cell_w + text_h)
        sheet.paste(Image.fromarray(im).resize((cell_w, cell_w), Image.NEAREST), (x, y))
        words = cap.replace(" and ", " & ")
        mark = "" if ok is None else ("OK " if ok[k] else "FAIL ")
        half = len(words) // 2
        cut = words.find(" ", half) if len(words) > 30 else -1
        lines = [mark + words] if cut < 0 else [mark + words[:cut], words[cut + 1 :]]
        for i, line in enumerate(lines):
            draw.text((x + 2, y + cell_w + 1 + 12 * i), line, fill="black" if ok is None or ok[k] else "red")
    return sheet
