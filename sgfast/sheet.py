"""Pictures of what the guidance sees: images with each edited word's attention map, its centroid and
its centroid's track over the denoising steps."""

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch
import torch.nn.functional as F

from sgfast import properties

CELL = 192


def _to_image(image):
    if isinstance(image, PIL.Image.Image):
        return image.convert("RGB")
    return PIL.Image.fromarray((np.clip(np.asarray(image), 0, 1) * 255).round().astype(np.uint8))


def word_map(trace, word, timestep=None):
    """The word's map at `timestep` (default: the middle recorded step), averaged over layers at the
    finest captured resolution: [H, W] in [0, 1]."""
    steps = sorted(trace.steps)
    view = trace.view(steps[len(steps) // 2] if timestep is None else timestep)
    finest = max(m.shape[-1] for m in view.maps.values())
    return properties.normalize(view.mean_map(trace.index(word), (finest, finest)))[0, 0]


def centroid_track(trace, word):
    """The word's centroid (x, y) at each recorded step, from the noisiest to the cleanest."""
    key = trace.index(word)
    return [trace.view(t).centroid(key).mean(0).tolist() for t in sorted(trace.steps, reverse=True)]


def heat(map_, size):
    """A [H, W] map in [0, 1] as a red-yellow heat image of `size` pixels."""
    up = F.interpolate(map_[None, None].float(), size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    v = up.clamp(0, 1).numpy()
    rgb = np.stack([np.clip(2 * v, 0, 1), np.clip(2 * v - 1, 0, 1), np.zeros_like(v)], -1)
    return PIL.Image.fromarray((rgb * 255).astype(np.uint8))


def draw_centroid(draw, xy, colour, size=CELL, radius=6):
    x, y = xy[0] * size, xy[1] * size
    draw.line([(x - radius, y), (x + radius, y)], fill=colour, width=2)
    draw.line([(x, y - radius), (x, y + radius)], fill=colour, width=2)


def sheet(rows, words, path):
    """One row per (title, image, trace): the image with each word's centroid track, then each word's
    attention map with its centroid. Writes a PNG to `path` and returns it."""
    columns = 1 + len(words)
    canvas = PIL.Image.new("RGB", (columns * CELL, len(rows) * (CELL + 18)), "white")
    draw = PIL.ImageDraw.Draw(canvas)
    colours = [(255, 0, 255), (0, 200, 255), (0, 255, 0), (255, 128, 0)]
    for r, (title, image, trace) in enumerate(rows):
        top = r * (CELL + 18)
        draw.text((4, top + 2), title, fill="black")
        tile = _to_image(image).resize((CELL, CELL), PIL.Image.NEAREST)
        tile_draw = PIL.ImageDraw.Draw(tile)
        for w, word in enumerate(words):
            track = [(x * CELL, y * CELL) for x, y in centroid_track(trace, word)]
            tile_draw.line(track, fill=colours[w % len(colours)], width=2)
            draw_centroid(tile_draw, centroid_track(trace, word)[-1], colours[w % len(colours)])
        canvas.paste(tile, (0, top + 18))
        for w, word in enumerate(words):
            map_ = word_map(trace, word)
            tile = heat(map_, CELL)
            centre = properties.centroid(map_[None, None])[0, 0].tolist()
            draw_centroid(PIL.ImageDraw.Draw(tile), centre, colours[w % len(colours)])
            canvas.paste(tile, ((w + 1) * CELL, top + 18))
            draw.text(((w + 1) * CELL + 4, top + 2), f'"{word}"', fill="black")
    canvas.save(path)
    return path
