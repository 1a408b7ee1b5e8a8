"""The edit-fidelity benchmark's measurements, on scenes whose truth is known, and a smoke run."""

import json

import numpy as np
import pytest

from benchmarks import quality
from sgfast.shapes.scenes import make_scene, parse_caption, read_scene


def two_object_scene():
    caption = quality.captions(1)[0]
    seed = quality.HELDOUT_SEED + 50_000
    while make_scene(seed).caption != caption:
        seed += 1
    return make_scene(seed)


def test_captions_name_two_objects_of_different_shapes():
    for caption in quality.captions(5):
        (_, shape_a), (_, shape_b) = parse_caption(caption)
        assert shape_a != shape_b


def test_move_measured_in_fractions_of_the_width():
    scene = two_object_scene()
    (_, shape_a), _ = parse_caption(scene.caption)
    shifted = np.full_like(scene.image, 240)
    shifted[:, 3:] = scene.image[:, :-3]  # everything 3 px to the right
    moved = quality.measure_move(scene.image, shifted, scene.caption, shape_a, dx=3 / 64, dy=0.0)
    assert moved["error_x"] == pytest.approx(0.0, abs=1e-6) and moved["error_y"] == pytest.approx(0.0, abs=1e-6)
    assert moved["measured"][0] == pytest.approx(3 / 64) and moved["area"] == pytest.approx(1.0, abs=0.05)
    assert 0.0 < moved["other_iou"] < 1.0  # the other object moved too, so it was not kept
    assert moved["other_colour"] == pytest.approx(0.0, abs=1.0)  # but it kept its colour
    still = quality.measure_move(scene.image, scene.image, scene.caption, shape_a, dx=0.25, dy=0.0)
    assert still["error_x"] == pytest.approx(0.25) and still["error_y"] == 0.0 and still["error"] == pytest.approx(0.25)
    assert still["other_iou"] == 1.0 and still["other_colour"] == 0.0 and still["area"] == 1.0
    assert not quality.move_lands(still) and quality.move_lands(moved)


def test_a_move_that_grows_its_object_does_not_land():
    # The moved object drawn twice its size at the target: on target, but its size not held.
    scene = two_object_scene()
    (colour_a, shape_a), _ = parse_caption(scene.caption)
    objects = read_scene(scene.image)
    a = quality.by_colour(objects, colour_a)
    grown = np.where(a.mask[..., None], 240, scene.image).astype(np.uint8)
    rows, cols = np.nonzero(a.mask)
    centre = rows.mean(), cols.mean()
    for r, c in zip(rows, cols):  # scale the mask by sqrt(2) about its centre
        for dr in (0, 1):
            for dc in (0, 1):
                rr = int(round(centre[0] + (r - centre[0]) * 1.41)) + dr
                cc = int(round(centre[1] + (c - centre[1]) * 1.41)) + dc
                if 0 <= rr < 64 and 0 <= cc < 64:
                    grown[rr, cc] = quality.COLOURS[colour_a]
    measured = quality.measure_move(scene.image, grown, scene.caption, shape_a, dx=0.0, dy=0.0)
    assert measured["error"] < quality.ON_TARGET and measured["area"] > quality.AREA_HELD[1]
    assert not quality.move_lands(measured)


def test_resize_layout_and_appearance_measures():
    scene = two_object_scene()
    (colour_a, shape_a), (colour_b, _) = parse_caption(scene.caption)
    objects = read_scene(scene.image)
    same = quality.measure_resize(scene.image, scene.image, scene.caption, shape_a)
    assert same == dict(ratio=1.0, drift=0.0, other_area=1.0, other_iou=1.0, other_colour=0.0)
    without_b = np.where(quality.by_colour(objects, colour_b).mask[..., None], 240, scene.image).astype(np.uint8)
    lost = quality.measure_resize(scene.image, without_b, scene.caption, shape_a)
    assert (lost["ratio"], lost["other_area"], lost["other_iou"]) == (1.0, 0.0, 0.0) and lost["other_colour"] != lost["other_colour"]
    shifted = np.full_like(scene.image, 240)
    shifted[:, 3:] = scene.image[:, :-3]
    assert quality.measure_resize(scene.image, shifted, scene.caption, shape_a)["drift"] == pytest.approx(3 / 64)
    assert quality.resize_lands(dict(ratio=2.4, drift=0.05), 2.0) and not quality.resize_lands(dict(ratio=2.6, drift=0.0), 2.0)
    assert not quality.resize_lands(dict(ratio=2.0, drift=0.07), 2.0)
    recoloured_b = scene.image.copy()
    recoloured_b[quality.by_colour(objects, colour_b).mask] = (np.array(quality.COLOURS[colour_b]) * 0.8).astype(np.uint8)
    held = quality.measure_held(scene.image, recoloured_b, [colour_b])
    assert held["other_iou"] == 1.0 and held["other_colour"] == pytest.approx(np.linalg.norm(np.array(quality.COLOURS[colour_b]) * 0.2), abs=1.5)
    assert quality.measure_layout(objects, objects, objects, [colour_a, colour_b]) == (1.0, 1.0)
    before, after, read_as = quality.measure_appearance(scene.image, scene.image, objects, objects, colour_a, colour_b)
    assert before == after > 50 and not read_as
    recoloured = scene.image.copy()
    recoloured[quality.by_colour(objects, colour_a).mask] = quality.COLOURS[colour_b]
    _, after, read_as = quality.measure_appearance(scene.image, recoloured, objects, read_scene(recoloured), colour_a, colour_b)
    assert after == pytest.approx(0.0) and read_as


def test_open_caption_appearance_measure():
    # The caption leaves the object's colour out; the object is the one not of the other's colour.
    assert quality.caption_without_colour("a red circle and a blue square", "red") == "a circle and a blue square"
    assert quality.caption_without_colour("a blue square and a red circle", "red") == "a blue square and a circle"
    scene = two_object_scene()
    (colour_a, shape_a), (colour_b, shape_b) = parse_caption(scene.caption)
    source = next(c for c in quality.COLOURS if c not in (colour_a, colour_b))
    objects = read_scene(scene.image)
    recoloured = scene.image.copy()
    recoloured[quality.by_colour(objects, colour_a).mask] = quality.COLOURS[source]
    before, after, read_before, read_after = quality.measure_open_appearance(
        scene.image, recoloured, objects, read_scene(recoloured), shape_a, colour_b, shape_b, source)
    assert before > 50 and after == pytest.approx(0.0) and not read_before and read_after
    # The other object lost: not read as a transfer, whatever colour the edited one has.
    lost = np.where(quality.by_colour(objects, colour_b).mask[..., None], 240, recoloured).astype(np.uint8)
    assert not quality.measure_open_appearance(scene.image, lost, objects, read_scene(lost), shape_a, colour_b, shape_b, source)[3]
    # The source colour on the other object's shape: not the edited object.
    assert not quality.measure_open_appearance(scene.image, recoloured, objects, read_scene(recoloured), shape_b, colour_b, shape_a, source)[3]


def test_smoke_run_prints_the_table(tmp_path, capsys):
    # The built-in model draws a readable scene, so every edit of the benchmark runs and is measured.
    # At the benchmark's own 25 steps: at 10 the step-25300 model's x0.5 lost the circle of this caption.
    quality.main(["--model", "default", "--seeds", "1", "--steps", "25", "--modes", "fast", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "| fast | model | 1/1 |" in printed
    rows = json.loads((tmp_path / "quality.json").read_text())["fast/model"]["rows"]
    assert all(rows[0][key] is not None for key in ("move", "resize x2", "resize x0.5", "copy_appearance", "copy_layout",
                                                    "copy_appearance held", "copy_layout held"))
    assert "Side effects" in printed and "move: on target and area held" in printed
    assert (tmp_path / "quality_fast_model.png").exists()


def test_unknown_edit_kind_is_an_error(capsys):
    with pytest.raises(SystemExit):
        quality.main(["--edits", "move,spin"])
    assert "unknown edit kinds ['spin']; allowed: move, resize, copy_appearance, copy_layout" in capsys.readouterr().err


def test_another_scheduler_is_one_the_model_can_use(tmp_path, capsys):
    with pytest.raises(SystemExit):
        quality.main(["--scheduler", "NoSuchScheduler", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert "--scheduler 'NoSuchScheduler' is not a scheduler this model can use; allowed: " in err
    assert "UniPCMultistepScheduler" in err and not list(tmp_path.iterdir())
    with pytest.raises(SystemExit):
        quality.main(["--scheduler", "UniPCMultistepScheduler", "--results", "--out", str(tmp_path)])
    assert "--results writes the table of the model's own scheduler" in capsys.readouterr().err
    quality.main(["--model", "tiny", "--seeds", "1", "--steps", "3", "--edits", "move", "--scheduler", "UniPCMultistepScheduler",
                  "--out", str(tmp_path)])
    assert "3 UniPCMultistepScheduler steps" in capsys.readouterr().out


def test_calls_are_bare_unless_a_scale_is_swept():
    # A stand-in pipeline that draws the caption's true scene and records the guidance arguments.
    scene, calls = two_object_scene(), []

    class Source:  # what copy edits ask of a trace when they are built
        def index(self, word):
            return word

    class Drawn:
        images, trace = [scene.image], Source()

    def sg(prompt, edits=None, **kwargs):
        if edits:
            calls.append((type(edits[0]).__name__, {k for k in kwargs if k not in ("trace", "num_inference_steps", "guidance_scale")},
                          kwargs.get("self_guidance_scale"), edits[0]))
        return Drawn()

    quality.run(sg, 1, 10, 5.0, progress=lambda line: None)
    assert [c[0] for c in calls] == ["Move", "Resize", "Resize", "CopyAppearance", "CopyAppearance", "CopyLayout"]
    assert all(extra == set() for _, extra, _, _ in calls)  # the model's own settings decide the rest
    assert calls[0][3].unset == ("weight", "keep_shape_weight", "keep_appearance_weight", "keep_centroid_weight", "keep_size_weight",
                                 "keep_own_shape_weight", "keep_own_size_weight", "keep_own_appearance_weight", "shape_centroid_weight")
    calls.clear()
    quality.run(sg, 1, 10, 5.0, progress=lambda line: None, scale=2.5, edits=("resize",))
    assert [(c[0], c[2]) for c in calls] == [("Resize", 2.5), ("Resize", 2.5)]
    # The tuning captions and seeds are not the reported ones.
    unedited = []

    def first_calls(prompt, edits=None, generator=None, **kwargs):
        unedited.append((prompt, generator.initial_seed()))
        return Drawn()

    for tuning in (False, True, (1_070_000, 500)):
        quality.run(first_calls, 2, 10, 5.0, progress=lambda line: None, edits=(), tuning=tuning)
    assert unedited[:2] == [(c, k) for k, c in enumerate(quality.captions(2))]
    assert unedited[2:4] == [(c, quality.TUNING_SEEDS + k) for k, c in enumerate(quality.captions(2, quality.TUNING_CAPTIONS))]
    assert unedited[4:] == [(c, 500 + k) for k, c in enumerate(quality.captions(2, 1_070_000))]


def test_results_section_is_replaced_up_to_the_next_heading(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Results\n\n## Edit fidelity (old)\n\nold table\n\n### Reading\n\nkept\n\n## Speed\n\nkept too\n")
    quality.replace_section(str(path), "## Edit fidelity", "## Edit fidelity (new)\n\nnew table\n")
    text = path.read_text()
    assert "old table" not in text and "new table" in text
    assert text.index("new table") < text.index("### Reading\n\nkept") < text.index("## Speed\n\nkept too")
    quality.replace_section(str(path), "## Missing", "## Missing\n\nappended\n")
    assert path.read_text().endswith("## Missing\n\nappended\n")
