"""The command line demo writes its images and sheet; the tiny pipeline is built offline."""

import os

import PIL.Image

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
