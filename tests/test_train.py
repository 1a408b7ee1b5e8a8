"""The training losses of the built-in model, against plain per-word loops in float64."""

import math

import pytest
import torch
import torch.nn.functional as F

from sgfast.shapes.train import attention_localisation_loss

KEYS = 13  # "<bos> a c s and a c s and a c s <eos>" fits; the loss reads positions 4j+2, 4j+3


def random_case(seed, batch=3, objects=3, size=12, sides=(6, 3)):
    g = torch.Generator().manual_seed(seed)
    logits = [torch.randn(batch, side * side, KEYS, generator=g, dtype=torch.float64) * 3 for side in sides]
    maps = [x.softmax(-1) for x in logits]
    masks = (torch.rand(batch, objects, size, size, generator=g, dtype=torch.float64) > 0.7).double()
    masks[0, 2] = 0  # an absent object (a two-object caption)
    keep = torch.tensor([True, False, True])  # the second caption was dropped
    return logits, maps, masks, keep


def loop_reference(maps, masks, keep, kind, floor, positions=None):
    """The loss as a loop over each present object's words: tokens 4j+2 and 4j+3 (its colour and shape
    words in the random case), or `positions[b, j]` (negative: a word left out)."""
    layer_losses = []
    for m in maps:
        side = math.isqrt(m.shape[1])
        total, count = 0.0, 0
        for b in range(m.shape[0]):
            for j in range(masks.shape[1]):
                if not keep[b] or masks[b, j].max() == 0:
                    continue
                # area share of each latent cell covered by the object (cells tile the image exactly)
                cell = masks.shape[-1] // side
                cover = masks[b, j].reshape(side, cell, side, cell).mean((1, 3)).reshape(-1)
                tokens = (4 * j + 2, 4 * j + 3) if positions is None else [p for p in positions[b, j].tolist() if p >= 0]
                for token in tokens:
                    word_map = m[b, :, token]
                    if kind == "outside":
                        total += 1 - (word_map * cover).sum() / word_map.sum()
                    else:
                        target = (1 - floor) * cover / cover.sum() + floor / len(cover)
                        spread = word_map / word_map.sum()
                        total += (target * (target / spread).log()).sum()
                    count += 1
        layer_losses.append(total / count)
    return sum(layer_losses) / len(layer_losses)


@pytest.mark.parametrize("kind", ["outside", "mask-kl"])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_per_word_loops(kind, seed):
    logits, maps, masks, keep = random_case(seed)
    floor = 0.07
    got = attention_localisation_loss(maps, masks, keep, kind, floor)
    want = loop_reference(maps, masks, keep, kind, floor)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12), (got, want)

    leaves = [x.clone().requires_grad_(True) for x in logits]
    attention_localisation_loss([x.softmax(-1) for x in leaves], masks, keep, kind, floor).backward()
    grads = [x.grad for x in leaves]
    leaves = [x.clone().requires_grad_(True) for x in logits]
    loop_reference([x.softmax(-1) for x in leaves], masks, keep, kind, floor).backward()
    for a, b in zip(grads, [x.grad for x in leaves]):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-12)


def test_mask_kl_is_zero_at_its_target_and_positive_elsewhere():
    _, maps, masks, keep = random_case(2, sides=(6,))
    floor = 0.05
    cover = F.adaptive_avg_pool2d(masks, 6).flatten(2)  # (batch, objects, 36)
    target = (1 - floor) * cover / cover.sum(-1, keepdim=True).clamp_min(1e-12) + floor / 36
    exact = maps[0].clone()
    for j in range(3):
        for token in (4 * j + 2, 4 * j + 3):
            exact[:, :, token] = target[:, j] * 0.01  # any scale: the loss normalises over positions
    assert attention_localisation_loss([exact], masks, keep, "mask-kl", floor).abs() < 1e-12
    assert attention_localisation_loss(maps, masks, keep, "mask-kl", floor) > 0.1


def test_mask_kl_pulls_saturated_maps_where_the_share_outside_does_not():
    # A word map peaked on one pixel of its object, ~1e-15 elsewhere: the share outside is already ~0
    # and its gradient vanishes; the mask KL still asks the map to spread over the object.
    side = 4
    masks = torch.zeros(1, 1, side, side, dtype=torch.float64)
    masks[0, 0, 1:3, 1:3] = 1
    logits = torch.zeros(1, side * side, 5, dtype=torch.float64)
    logits[0, :, 2:4] = -35.0  # the colour and the shape word alike
    logits[0, 5, 2:4] = 5.0  # pixel (1, 1), inside the object
    keep = torch.tensor([True])
    norms = {}
    for kind in ("outside", "mask-kl"):
        x = logits.clone().requires_grad_(True)
        attention_localisation_loss([x.softmax(-1)], masks, keep, kind, 0.05).backward()
        norms[kind] = x.grad[0, :, 2:4].abs().max().item()
    assert norms["outside"] < 1e-12
    assert norms["mask-kl"] > 0.01


def test_unknown_kind_and_bad_floor_are_refused():
    _, maps, masks, keep = random_case(0)
    with pytest.raises(ValueError, match="outside.*mask-kl"):
        attention_localisation_loss(maps, masks, keep, "entropy")
    for floor in (0.0, 1.0, -0.1):  # 0 would put log(0) in the target's entropy
        with pytest.raises(ValueError, match=r"floor must be in \(0, 1\)"):
            attention_localisation_loss(maps, masks, keep, "mask-kl", floor)


def test_left_out_colour_words_shift_the_positions_the_loss_reads():
    """A caption without some colour words ("a circle and a blue square") names its words at other
    positions: the loss reads those, and skips the left-out words, as a per-word loop over the
    caption's own tokens does."""
    import numpy as np

    from transformers import CLIPTokenizer

    from sgfast.shapes.model import default_model_path
    from sgfast.shapes.train import drop_colour_words

    tokenizer = CLIPTokenizer.from_pretrained(f"{default_model_path()}/tokenizer")
    captions = ["a red circle and a blue square and a green triangle", "a purple square and a yellow circle", ""]
    out, positions = drop_colour_words(captions, np.random.default_rng(3), 0.5)
    assert out[0] != captions[0] and out[2] == ""  # some words left out; a dropped caption stays empty
    for caption, rows in zip(out, positions.tolist()):
        ids = tokenizer(caption).input_ids
        named = [tokenizer.convert_ids_to_tokens(ids[p]).removesuffix("</w>") for row in rows for p in row if p >= 0]
        assert named == [w for w in caption.split() if w not in ("a", "and")]
    assert (drop_colour_words(captions, np.random.default_rng(0), 0.0)[1] >= 0).sum() == 2 * (3 + 2)

    logits, maps, masks, keep = random_case(1)
    got = attention_localisation_loss(maps, masks, keep, "mask-kl", 0.07, positions)
    # The reference: a loop over each present object's named words at their own positions.
    want = loop_reference(maps, masks, keep, "mask-kl", 0.07, positions)
    assert torch.allclose(got, want, rtol=1e-10)
