"""The command line demo writes its images and sheet; the tiny pipeline is built offline."""

import os

import PIL.Image
import pytest

from sgfast.__main__ import main
from sgfast.testing import TINY_WORDS, build_tokenizer


def test_tiny_tokenizer_knows_its_words_as_single_tokens():
    tokenizer = build_tokenizer()
    for word in TINY_WORDS:
        assert tokenizer.tokenize(word) == [word + "</w>"]
    # anything else still tokenizes, through the byte-level base vocabulary
    assert "".join(tokenizer.tokenize("zebra")).replace("</w>", "") == "zebra"


def test_demo_writes_images_and_sheet(tmp_path, capsys):
    out = tmp_path / "demo"
    main(["demo", "--model", "tiny", "--steps", "4", "--out", str(out)])
    printed = capsys.readouterr().out
    for name in ("original.png", "source.png", "move.png", "resize.png", "appearance.png", "sheet.png"):
        path = out / name
        assert path.exists() and str(path) in printed
        assert PIL.Image.open(path).size[0] >= 64
    # rows: original, move, resize, copy appearance; columns: the image, then "circle", "red", "blue", "square"
    assert PIL.Image.open(out / "sheet.png").size == (5 * 192, 4 * (192 + 18))


def test_demo_images_are_the_librarys(tmp_path):
    # What the demo writes is the library's output for its arguments: the seed's image, and the
    # move with the asked word and distance under the model's own settings (bare calls).
    import numpy as np
    import torch

    from sgfast import SelfGuidancePipeline, move
    from sgfast.testing import tiny_pipeline

    out = tmp_path / "demo"
    main(["demo", "--model", "tiny", "--steps", "3", "--seed", "4", "--dx", "0.4", "--weight", "300", "--out", str(out)])
    sg = SelfGuidancePipeline.from_pipe(tiny_pipeline())
    settings = dict(num_inference_steps=3, guidance_scale=5.0, self_guidance_scale=300.0)
    original = sg("a red circle and a blue square", generator=torch.Generator().manual_seed(4), **settings)
    moved = sg("a red circle and a blue square", edits=[move("circle", dx=0.4)], trace=original.trace, **settings)
    pixels = lambda image: np.asarray(image, np.int16)  # noqa: E731
    assert np.abs(pixels(moved.images[0]) - pixels(original.images[0])).max() > 2  # the move changes the image
    for name, image in (("original.png", original.images[0]), ("move.png", moved.images[0])):
        assert np.abs(pixels(PIL.Image.open(out / name)) - pixels(image)).max() <= 1, name


def test_demo_on_the_builtin_mmdit_model(tmp_path, capsys):
    # Every edited row's maps are read back from its image (trace_image), as on the UNet model.
    out = tmp_path / "demo"
    # 7 steps: the resize guides from step 5 to 80% of the steps (the model's settings)
    main(["demo", "--model", "default-mmdit", "--steps", "7", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "built-in MMDiT model" in printed
    for name in ("original.png", "source.png", "move.png", "resize.png", "appearance.png", "sheet.png"):
        assert (out / name).exists() and str(out / name) in printed
    assert PIL.Image.open(out / "move.png").size == (64, 64)
    assert PIL.Image.open(out / "sheet.png").size == (5 * 192, 4 * (192 + 18))


def test_demo_refuses_steps_its_models_settings_guide_none_of_before_writing_anything(tmp_path):
    # The built-in models' resize guides from step 5 to 80% of the steps: 7 steps at least.
    out = tmp_path / "demo"
    with pytest.raises(SystemExit, match="--steps 3: the model's resize settings guide none of the 3 steps; use --steps 7 or more"):
        main(["demo", "--model", "default-mmdit", "--steps", "3", "--out", str(out)])
    assert not out.exists()


def test_demo_side_effects_line():
    from argparse import Namespace

    from sgfast.__main__ import side_effects

    args = Namespace(dx=-0.3, scale=2.0)
    held = {"blue square": dict(dx=0.0, dy=0.0, area=1.0, iou=0.96, colour=3.4)}
    moved = {"object": dict(dx=-0.27, dy=0.04, area=1.05, iou=0.1, colour=2.0), "others": held}
    assert side_effects("move", moved, args) == "lands 0.05 from its target, its area x1.05; blue square IoU 0.96, colour shift 3"
    grown = {"object": dict(dx=0.03, dy=-0.04, area=1.9, iou=0.5, colour=2.0), "others": {"blue square": None}}
    assert side_effects("resize", grown, args) == "area x1.90 (x2 asked), centroid drift 0.05; blue square gone"
    assert side_effects("move", {"object": None, "others": held}, args) == "the edited object is not read in the edited image"


def test_demo_samples_each_built_in_model_at_its_own_guidance_scale():
    from argparse import Namespace

    from sgfast.__main__ import demo_guidance_scale
    from sgfast.shapes.mmdit import GUIDANCE_SCALE

    assert demo_guidance_scale(Namespace(model="default-mmdit", guidance_scale=None)) == GUIDANCE_SCALE == 2.0
    assert demo_guidance_scale(Namespace(model="default", guidance_scale=None)) == 5.0
    assert demo_guidance_scale(Namespace(model="default-mmdit", guidance_scale=7.0)) == 7.0


def test_demo_draws_each_built_in_model_from_its_own_seed():
    from argparse import Namespace

    from sgfast.__main__ import demo_seed
    from sgfast.shapes.mmdit import DEMO_SEED

    assert demo_seed(Namespace(model="default-mmdit", seed=None)) == DEMO_SEED == 6
    assert demo_seed(Namespace(model="default", seed=None)) == 24
    assert demo_seed(Namespace(model="default-mmdit", seed=0)) == 0
