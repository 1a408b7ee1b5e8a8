"""The synthetic shape scenes of the built-in model, and the reader that scores its images."""

import numpy as np
import pytest

from sgfast.shapes import scenes

SEEDS = range(300)


def _by_position(objects):
    return sorted(objects, key=lambda o: o.centroid)


def test_same_seed_same_scene():
    a, b = scenes.make_scene(7), scenes.make_scene(7)
    assert np.array_equal(a.image, b.image)
    assert a.caption == b.caption
    assert [(o.colour, o.shape, o.area, o.centroid) for o in a.objects] == [
        (o.colour, o.shape, o.area, o.centroid) for o in b.objects
    ]
    assert not np.array_equal(a.image, scenes.make_scene(8).image)


def test_batch_sampler_is_deterministic_and_varied():
    imgs1, caps1 = scenes.sample_batch(np.random.default_rng(3), 64)
    imgs2, caps2 = scenes.sample_batch(np.random.default_rng(3), 64)
    assert imgs1.shape == (64, scenes.SIZE, scenes.SIZE, 3) and imgs1.dtype == np.uint8
    assert np.array_equal(imgs1, imgs2) and caps1 == caps2
    assert len(set(caps1)) > 30
    counts = {len(scenes.parse_caption(c)) for c in caps1}
    assert counts == {1, 2, 3}


def test_count_weights_set_how_many_objects_a_scene_has():
    def counts(weights, n=300):
        _, captions = scenes.sample_batch(np.random.default_rng(5), n, count_weights=weights)
        return np.bincount([len(scenes.parse_caption(c)) for c in captions], minlength=4)[1:]

    assert counts([0, 0, 1]).tolist() == [0, 0, 300]
    assert counts([1, 0, 0]).tolist() == [300, 0, 0]
    one, two, three = counts([1, 2, 3], n=600)
    assert one < two < three and abs(three / 600 - 0.5) < 0.08
    for bad in ([1, 1], [1, -1, 1], [0, 0, 0]):
        with pytest.raises(ValueError, match="count_weights must be 3 numbers >= 0"):
            scenes.sample_batch(np.random.default_rng(5), 2, count_weights=bad)
    # without weights the stream is the uniform one (training runs stay reproducible)
    rng_a, rng_b = np.random.default_rng(9), np.random.default_rng(9)
    assert scenes.sample_batch(rng_a, 20)[1] == scenes.sample_batch(rng_b, 20, count_weights=None)[1]


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_ground_truth_matches_image(seed):
    scene = scenes.make_scene(seed)
    assert scene.caption == scenes.caption_for([(o.colour, o.shape) for o in scene.objects])
    assert [(o.colour, o.shape) for o in scene.objects] == scenes.parse_caption(scene.caption)
    covered = np.zeros(scene.image.shape[:2], dtype=int)
    for o in scene.objects:
        covered += o.mask
        assert (scene.image[o.mask] == scenes.COLOURS[o.colour]).all()
        assert o.area == o.mask.sum()
        rows, cols = np.nonzero(o.mask)
        assert o.centroid == pytest.approx(((cols + 0.5).mean() / 64, (rows + 0.5).mean() / 64))
        x0, y0, x1, y1 = o.bbox
        assert cols.min() >= x0 and cols.max() < x1 and rows.min() >= y0 and rows.max() < y1
    assert covered.max() <= 1  # no overlap
    assert (scene.image[covered == 0] == scenes.BACKGROUND).all()
    assert len({o.colour for o in scene.objects}) == len(scene.objects)


def test_scenes_cover_the_vocabulary():
    seen_colours, seen_shapes, counts = set(), set(), set()
    for seed in SEEDS:
        scene = scenes.make_scene(seed)
        seen_colours |= {o.colour for o in scene.objects}
        seen_shapes |= {o.shape for o in scene.objects}
        counts.add(len(scene.objects))
        # bounding boxes keep their gap
        boxes = [o.bbox for o in scene.objects]
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                assert (
                    a[0] >= b[2] + scenes.GAP or b[0] >= a[2] + scenes.GAP
                    or a[1] >= b[3] + scenes.GAP or b[1] >= a[3] + scenes.GAP
                )
    assert seen_colours == set(scenes.COLOURS) and seen_shapes == set(scenes.SHAPES)
    assert counts == {1, 2, 3}
    assert set(scenes.CAPTION_WORDS) >= {w for s in SEEDS for w in scenes.make_scene(s).caption.split()}


def test_reader_reads_generated_scenes_exactly():
    for seed in SEEDS:
        scene = scenes.make_scene(seed)
        read = scenes.read_scene(scene.image)
        truth = _by_position(scene.objects)
        assert len(read) == len(truth), seed
        for r, t in zip(read, truth):
            assert (r.colour, r.shape) == (t.colour, t.shape), seed
            assert r.area == t.area
            assert abs(r.centroid[0] - t.centroid[0]) * 64 < 0.5 and abs(r.centroid[1] - t.centroid[1]) * 64 < 0.5
            assert np.array_equal(r.mask, t.mask)
        assert scenes.matches_caption(read, scene.caption, check_shapes=True)


def test_reader_tolerates_blur_and_noise():
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(0)
    ok = 0
    for seed in range(60):
        scene = scenes.make_scene(seed)
        blurred = np.asarray(Image.fromarray(scene.image).filter(ImageFilter.GaussianBlur(1.0)), dtype=np.float32)
        noisy = np.clip(blurred + rng.normal(0, 6, blurred.shape), 0, 255).astype(np.uint8)
        read = scenes.read_scene(noisy)
        ok += scenes.matches_caption(read, scene.caption, check_shapes=True)
        if scenes.matches_caption(read, scene.caption):
            truth = {o.colour: o for o in scene.objects}  # colours are distinct within a scene
            for r in read:
                t = truth[r.colour]
                assert abs(r.centroid[0] - t.centroid[0]) < 1 / 64 and abs(r.centroid[1] - t.centroid[1]) < 1 / 64
    assert ok >= 57


def test_reader_ignores_specks_and_rejects_wrong_captions():
    image = np.full((64, 64, 3), scenes.BACKGROUND, dtype=np.uint8)
    image[10:13, 10:13] = scenes.COLOURS["red"]  # 9 pixels: a speck
    assert scenes.read_scene(image) == []
    scene = scenes.make_scene(5)
    read = scenes.read_scene(scene.image)
    assert not scenes.matches_caption(read[:-1], scene.caption)
    assert not scenes.matches_caption(read, "a red circle and a green square and a blue square and a yellow circle")
    with pytest.raises(ValueError):
        scenes.parse_caption("a cat")


def test_read_change_measures_an_objects_move_and_area():
    scene = next(s for s in (scenes.make_scene(k) for k in range(50)) if len(s.objects) == 2)
    (colour, shape), _ = scenes.parse_caption(scene.caption)
    shifted = np.full_like(scene.image, scene.image[0, 0])
    shifted[2:, 3:] = scene.image[:-2, :-3]  # 3 px right, 2 px down (the background is flat)
    (dx, dy), ratio = scenes.read_change(scene.caption, shape, scene.image, shifted)
    assert (dx, dy, ratio) == (pytest.approx(3 / 64), pytest.approx(2 / 64), pytest.approx(1.0))
    assert scenes.read_change(scene.caption, colour, scene.image, scene.image) == ((0.0, 0.0), 1.0)
    assert scenes.read_change(scene.caption, "hexagon", scene.image, shifted) is None  # not in the caption
    assert scenes.read_change("a photo of a cat", "cat", scene.image, shifted) is None  # not a scene caption
    blank = np.full_like(scene.image, scene.image[0, 0])
    assert scenes.read_change(scene.caption, shape, scene.image, blank) is None  # the object is gone


def test_read_edit_reads_the_edited_object_and_every_other_one():
    scene = next(s for s in (scenes.make_scene(k) for k in range(50)) if len(s.objects) == 2)
    (colour_a, shape_a), (colour_b, shape_b) = scenes.parse_caption(scene.caption)
    objects = scenes.read_scene(scene.image)
    edited = scene.image.copy()
    # The first object 3 px to the right (on the flat background), the second one darkened.
    a, b = scenes.by_colour(objects, colour_a), scenes.by_colour(objects, colour_b)
    edited[a.mask] = scenes.BACKGROUND
    rows, cols = np.nonzero(a.mask)
    edited[rows, cols + 3] = scenes.COLOURS[colour_a]
    darker = (np.array(scenes.COLOURS[colour_b]) * 0.9).astype(np.uint8)
    edited[b.mask] = darker
    change = scenes.read_edit(scene.caption, shape_a, scene.image, edited)
    moved, other = change["object"], change["others"][f"{colour_b} {shape_b}"]
    assert list(change["others"]) == [f"{colour_b} {shape_b}"]
    assert (moved["dx"], moved["dy"], moved["area"]) == (pytest.approx(3 / 64), pytest.approx(0.0), pytest.approx(1.0))
    assert 0.0 < moved["iou"] < 1.0 and moved["colour"] == pytest.approx(0.0)
    assert other["iou"] == 1.0 and other["area"] == 1.0
    assert other["colour"] == pytest.approx(np.linalg.norm(np.array(scenes.COLOURS[colour_b]) - darker))
    # Named by its colour word too; an object gone is None; not a scene caption or an object missing before: None.
    assert scenes.read_edit(scene.caption, colour_a, scene.image, edited)["object"] == moved
    gone = np.where(b.mask[..., None], np.array(scenes.BACKGROUND, np.uint8), scene.image)
    assert scenes.read_edit(scene.caption, shape_a, scene.image, gone)["others"][f"{colour_b} {shape_b}"] is None
    assert scenes.read_edit("a photo of a cat", "cat", scene.image, edited) is None
    assert scenes.read_edit(scene.caption, shape_a, gone, scene.image) is None
    assert scenes.read_edit(scene.caption, "hexagon", scene.image, edited) is None
    lines = scenes.describe_changes(scene.caption, scene.image, edited)
    assert lines[1].startswith(f"{colour_b} {shape_b}: dx=+0.00 dy=+0.00 area x1.00 IoU 1.00 colour shift {other['colour']:.0f}, reads {colour_b}")
