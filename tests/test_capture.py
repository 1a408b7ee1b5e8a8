"""Capture: the recorded maps are diffusers' own attention probabilities; only chosen layers change."""

import json
import os
import sys

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

import sgfast.capture as capture_module
from benchmarks.models import default_arch_dir
from sgfast.capture import (
    Capture,
    check_feature_layer,
    cross_attention_layers,
    default_feature_layer,
    default_layers,
    grid_size,
    resolve_layers,
    xformers_attention,
)
from sgfast.trace import PromptWords, selection


def unet_inputs(pipe, prompt, seed=1):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 16, 16, generator=g)
    ids = pipe.tokenizer([prompt] * 2, padding="max_length", max_length=77, return_tensors="pt").input_ids
    embeds = pipe.text_encoder(ids)[0]
    return latents, embeds


def diffusers_probabilities(pipe, layer, latents, embeds):
    """Head-averaged probabilities [B, N, T] of one layer from diffusers' own get_attention_scores."""
    attn = cross_attention_layers(pipe.unet)[layer]
    seen = {}

    def keep_input(module, args, kwargs):
        seen["hidden"] = args[0] if args else kwargs["hidden_states"]
        seen["context"] = kwargs["encoder_hidden_states"]

    handle = attn.register_forward_pre_hook(keep_input, with_kwargs=True)
    try:
        pipe.unet(latents, 500, encoder_hidden_states=embeds)
    finally:
        handle.remove()
    q = attn.head_to_batch_dim(attn.to_q(seen["hidden"]))
    k = attn.head_to_batch_dim(attn.to_k(seen["context"]))
    probs = attn.get_attention_scores(q, k)
    return probs.reshape(latents.shape[0], attn.heads, *probs.shape[1:]).mean(1)


def test_maps_equal_diffusers_attention_scores(tiny_pipe):
    prompt = "a red circle and a blue catdog"
    latents, embeds = unet_inputs(tiny_pipe, prompt)
    words = PromptWords.from_tokenizer(tiny_pipe.tokenizer, prompt)
    chosen = ["circle", "catdog"]  # "catdog" is three sub-tokens: its map is their mean
    layers = default_layers(tiny_pipe.unet)
    with torch.no_grad(), Capture(tiny_pipe.unet, layers) as capture:
        with capture.record(*selection([words, words], [chosen, chosen], "cpu"), (16, 16)):
            tiny_pipe.unet(latents, 500, encoder_hidden_states=embeds)
            recorded = dict(capture.maps)
    assert set(recorded) == set(layers)
    for layer in layers:
        expected = diffusers_probabilities(tiny_pipe, layer, latents, embeds)
        for slot, word in enumerate(chosen):
            positions = words.positions[words.index(word)]
            want = expected[:, :, positions].mean(-1)
            got = recorded[layer][:, slot].flatten(1)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert len(words.positions[words.index("catdog")]) == 3


def test_xformers_output_path(tiny_pipe, monkeypatch):
    # xformers runs on GPUs only: here an explicit attention in its [B, N, heads, d] layout stands in
    # for it, given to the capture where it asks for xformers, to check the processor's layout around
    # the call against the SDPA path.
    def attention_bnhd(q, k, v):
        probs = (torch.einsum("bnhd,bthd->bhnt", q, k) * q.shape[-1] ** -0.5).softmax(-1)
        calls.append(q.shape)
        return torch.einsum("bhnt,bthd->bnhd", probs, v)

    calls = []
    assert xformers_attention(tiny_pipe.unet) is None  # on the CPU: SDPA
    latents, embeds = unet_inputs(tiny_pipe, "a red circle")
    layers = default_layers(tiny_pipe.unet)
    with torch.no_grad(), Capture(tiny_pipe.unet, layers) as capture:
        sdpa = tiny_pipe.unet(latents, 500, encoder_hidden_states=embeds).sample
    assert not calls
    monkeypatch.setattr(capture_module, "xformers_attention", lambda unet: attention_bnhd)
    with torch.no_grad(), Capture(tiny_pipe.unet, layers) as capture:
        stand_in = tiny_pipe.unet(latents, 500, encoder_hidden_states=embeds).sample
    assert len(calls) == len(layers)
    torch.testing.assert_close(stand_in, sdpa, rtol=1e-4, atol=1e-5)


def test_xformers_is_taken_for_a_unet_on_a_gpu_only(monkeypatch):
    """With xformers installed, a UNet on CUDA gets its attention and one on the CPU SDPA (None);
    without xformers every UNet gets SDPA."""
    import types

    def memory_efficient_attention(q, k, v):
        return v

    def unet_on(device):  # what xformers_attention reads of a UNet: its parameters' device
        return types.SimpleNamespace(parameters=lambda: iter([types.SimpleNamespace(device=torch.device(device))]))

    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = memory_efficient_attention
    monkeypatch.setitem(sys.modules, "xformers", types.ModuleType("xformers"))
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    assert xformers_attention(unet_on("cuda")) is memory_efficient_attention
    assert xformers_attention(unet_on("cuda:1")) is memory_efficient_attention
    assert xformers_attention(unet_on("cpu")) is None
    assert xformers_attention(unet_on("meta")) is None
    monkeypatch.setitem(sys.modules, "xformers.ops", None)  # not installed: the import fails
    assert xformers_attention(unet_on("cuda")) is None


@pytest.mark.parametrize("config", [
    {},
    {"residual_connection": True},
    {"rescale_output_factor": 2.5},
    {"cross_attention_norm": "layer_norm"},
    {"residual_connection": True, "rescale_output_factor": 0.5, "cross_attention_norm": "layer_norm"},
], ids=lambda c: "-".join(c) or "plain")
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "mask-per-query"])
def test_the_capture_processor_is_diffusers_own_on_any_cross_attention(config, masked):
    """Plugged into a diffusers Attention as any processor is, ours gives AttnProcessor2_0's output
    (float64), whatever the layer's residual, output rescale and context normalisation, also with an
    attention mask of one row per query."""
    from types import SimpleNamespace

    from sgfast.capture import CaptureAttnProcessor

    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=24, heads=4, dim_head=8, **config).double().eval()
    with torch.no_grad():  # a layer norm at its default weights would be the identity on a shifted input
        for p in attn.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hidden = torch.randn(3, 35, 32, dtype=torch.float64)
    context = torch.randn(3, 11, 24, dtype=torch.float64)
    mask = None
    if masked:
        mask = torch.where(torch.rand(3, 35, 11) < 0.3, -1e4, 0.0).double()
    idle = SimpleNamespace(recording=False, attention=None)  # not recording, no xformers
    with torch.no_grad():
        attn.set_processor(AttnProcessor2_0())
        expected = attn(hidden, encoder_hidden_states=context, attention_mask=mask)
        attn.set_processor(CaptureAttnProcessor(idle, "layer"))
        ours = attn(hidden, encoder_hidden_states=context, attention_mask=mask)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    assert ours.dtype == torch.float64


def test_processors_of_their_own_are_refused_by_name_and_left_in_place(tiny_pipe):
    class OwnProcessor(AttnProcessor2_0):
        pass

    class OtherProcessor(AttnProcessor2_0):
        pass

    unet = tiny_pipe.unet
    layers = default_layers(unet)
    assert len(layers) >= 2
    before = dict(unet.attn_processors)
    modules = cross_attention_layers(unet)
    try:
        modules[layers[0]].set_processor(OwnProcessor())
        modules[layers[-1]].set_processor(OtherProcessor())
        own = dict(unet.attn_processors)
        with pytest.raises(ValueError) as raised:
            with Capture(unet, layers):
                pass
        assert str(raised.value) == (
            "self-guidance replaces the attention processors of the captured layers, and these have their own: "
            f"{layers[0]} (OwnProcessor), {layers[-1]} (OtherProcessor); restore plain attention there "
            "(unet.set_default_attn_processor()) or capture other layers (layers=...)"
        )
        assert unet.attn_processors == own
        assert Capture(unet, layers[1:-1]).foreign_processors() == {}
    finally:
        unet.set_attn_processor(before)


def test_capture_changes_no_output_and_touches_only_chosen_layers(tiny_pipe):
    latents, embeds = unet_inputs(tiny_pipe, "a red circle")
    unet = tiny_pipe.unet
    before = dict(unet.attn_processors)
    layers = default_layers(unet)[:1]
    with torch.no_grad():
        plain = unet(latents, 10, encoder_hidden_states=embeds).sample
        with Capture(unet, layers) as capture:
            inside = unet.attn_processors
            words = PromptWords.from_tokenizer(tiny_pipe.tokenizer, "a red circle")
            with capture.record(*selection([words], [["red"]], "cpu"), (16, 16), batch_slice=slice(1, 2)):
                captured = unet(latents, 10, encoder_hidden_states=embeds).sample
            assert capture.maps[layers[0]].shape[0] == 1  # the chosen rows of the batch only
    torch.testing.assert_close(captured, plain, rtol=1e-6, atol=1e-6)
    for name, processor in inside.items():
        layer = name.removesuffix(".processor")
        assert (processor is before[name]) == (layer not in layers)
    assert unet.attn_processors == before


def test_processors_restored_after_error(tiny_pipe):
    unet = tiny_pipe.unet
    before = dict(unet.attn_processors)
    with pytest.raises(RuntimeError, match="boom"):
        with Capture(unet, default_layers(unet), "up_blocks.0"):
            raise RuntimeError("boom")
    assert unet.attn_processors == before
    assert not unet.up_blocks[0]._forward_hooks


def test_unknown_layer_is_a_clear_error(tiny_pipe):
    with pytest.raises(ValueError, match="unknown cross-attention layer 'up_blocks.9'.*up_blocks.0.attentions.0"):
        resolve_layers(tiny_pipe.unet, ["up_blocks.9"])
    assert resolve_layers(tiny_pipe.unet, "up_blocks.1") == [
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
        "up_blocks.1.attentions.1.transformer_blocks.0.attn2",
    ]


def test_default_layers_on_sd15_architecture():
    path = os.path.join(default_arch_dir(), "sd15_unet.json")
    if not os.path.exists(path):
        pytest.skip("SD1.5 architecture config not present")
    with open(path) as f:
        config = json.load(f)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    layers = default_layers(unet)
    assert sorted({name.split(".")[1] for name in layers}) == ["1", "2"]  # the 16x16 and 32x32 up blocks
    assert len(layers) == 6 and all(name.endswith("attn2") for name in layers)
    assert default_feature_layer(unet, layers) == "up_blocks.1"
    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())


TINY_CROSS_ATTENTION = [
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2",
    "up_blocks.0.attentions.0.transformer_blocks.0.attn2",
    "up_blocks.0.attentions.1.transformer_blocks.0.attn2",
    "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
    "up_blocks.1.attentions.1.transformer_blocks.0.attn2",
    "mid_block.attentions.0.transformer_blocks.0.attn2",
]


def test_layer_names_resolve_to_every_match_in_order_once(tiny_pipe):
    unet = tiny_pipe.unet
    # None: the decoder's layers (two up blocks with attention: none left out).
    assert resolve_layers(unet, None) == TINY_CROSS_ATTENTION[2:6]
    # Several names: each one's matches in turn, none twice.
    names = ["up_blocks.1", TINY_CROSS_ATTENTION[3], "up_blocks.1.attentions.0", "mid_block"]
    assert resolve_layers(unet, names) == TINY_CROSS_ATTENTION[4:6] + [TINY_CROSS_ATTENTION[3], TINY_CROSS_ATTENTION[6]]
    # An unknown name lists every cross-attention layer the UNet has, comma-separated.
    with pytest.raises(ValueError) as error:
        resolve_layers(unet, ["up_blocks.0", "down_blocks.7"])
    assert str(error.value) == "unknown cross-attention layer 'down_blocks.7'; this UNet has 7: " + ", ".join(
        TINY_CROSS_ATTENTION
    )


def test_default_layers_order_up_blocks_by_number():
    """The finest up block is the highest-numbered one, also past 9 (a numeric, not a text, order)."""
    from diffusers.models.attention_processor import Attention

    class ManyUpBlocks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up_blocks = torch.nn.ModuleList(
                [torch.nn.ModuleDict({"attn2": Attention(8, cross_attention_dim=8, heads=1, dim_head=8)}) for _ in range(11)]
            )

    unet = ManyUpBlocks()
    layers = default_layers(unet)
    assert layers == [f"up_blocks.{i}.attn2" for i in range(10)]  # block 10, the finest, left out
    # The features: the block before the finest captured one, not before the first captured one;
    # with no up block captured, up_blocks.0.
    assert default_feature_layer(unet, layers) == "up_blocks.8"
    assert default_feature_layer(unet, ["up_blocks.7.attn2"]) == "up_blocks.7"
    assert default_feature_layer(unet, ["mid_block.attentions.0.transformer_blocks.0.attn2"]) == "up_blocks.0"


def test_an_unknown_feature_layer_names_the_unets_blocks(tiny_pipe):
    unet = tiny_pipe.unet
    blocks = [f"down_blocks.{i}" for i in range(len(unet.down_blocks))] + [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]
    for name in ("up_blocks.9", "", "mid_block.nope"):
        with pytest.raises(ValueError) as raised:
            check_feature_layer(unet, name)
        assert str(raised.value) == f"unknown feature layer {name!r}; choose a UNet block such as: " + ", ".join(blocks)
    assert check_feature_layer(unet, "up_blocks.1") is unet.up_blocks[1]


def halvings(tokens, height, width):
    """The grid a layer sees: the first of (ceil(h / 2**k), ceil(w / 2**k)), k = 0, 1, ..., whose
    size is `tokens`, written out; None when no k gives it."""
    for k in range(max(height, width).bit_length() + 1):
        grid = (-(-height // 2**k), -(-width // 2**k))
        if grid[0] * grid[1] == tokens:
            return grid
    return None


@pytest.mark.parametrize("height, width", [(9, 9), (1, 9), (9, 1), (2, 1), (1, 2), (7, 12), (64, 40), (1, 1)])
def test_grid_size_follows_the_downsamplers_on_odd_and_thin_latents(height, width):
    seen = set()
    for k in range(max(height, width).bit_length() + 1):
        grid = (-(-height // 2**k), -(-width // 2**k))
        tokens = grid[0] * grid[1]
        if tokens in seen:
            continue
        seen.add(tokens)
        assert grid_size(tokens, height, width) == halvings(tokens, height, width) == grid
    for tokens in (0, height * width + 1) + ((3,) if halvings(3, height, width) is None else ()):
        with pytest.raises(ValueError) as raised:
            grid_size(tokens, height, width)
        assert str(raised.value) == f"cannot place {tokens} queries on a grid for latents {height}x{width}"


def test_a_masked_cross_attention_under_capture_is_diffusers_own(tiny_pipe):
    """An `encoder_attention_mask` (tokens left out of cross-attention) reaches the captured layers as
    it reaches diffusers' own processors: the UNet's output is the same, and the mask changes it."""
    latents, embeds = unet_inputs(tiny_pipe, "a red circle and a blue square")
    mask = torch.ones(2, embeds.shape[1])
    mask[0, 5:] = 0
    mask[1, 9:] = 0
    unet = tiny_pipe.unet
    layers = default_layers(unet)
    words = PromptWords.from_tokenizer(tiny_pipe.tokenizer, "a red circle and a blue square")
    with torch.no_grad():
        plain = unet(latents, 10, encoder_hidden_states=embeds, encoder_attention_mask=mask).sample
        unmasked = unet(latents, 10, encoder_hidden_states=embeds).sample
        with Capture(unet, layers) as capture:
            with capture.record(*selection([words, words], [["red"], ["red"]], "cpu"), (16, 16)):
                captured = unet(latents, 10, encoder_hidden_states=embeds, encoder_attention_mask=mask).sample
    torch.testing.assert_close(captured, plain, rtol=1e-5, atol=1e-5)
    assert (plain - unmasked).abs().max() > 1e-3


def test_captured_bytes_are_the_recorded_maps_and_features(tiny_pipe):
    latents, embeds = unet_inputs(tiny_pipe, "a red circle")
    unet = tiny_pipe.unet
    layers = default_layers(unet)
    words = PromptWords.from_tokenizer(tiny_pipe.tokenizer, "a red circle")
    for feature_layer in (None, default_feature_layer(unet, layers)):
        with torch.no_grad(), Capture(unet, layers, feature_layer=feature_layer) as capture:
            assert capture.captured_bytes() == 0
            with capture.record(*selection([words], [["red", "circle"]], "cpu"), (16, 16), batch_slice=slice(1, 2),
                                features=feature_layer is not None):
                unet(latents, 10, encoder_hidden_states=embeds)
            expected = sum(m.numel() * m.element_size() for m in capture.maps.values())
            if feature_layer is not None:
                assert capture.features is not None
                expected += capture.features.numel() * capture.features.element_size()
            assert len(capture.maps) == len(layers) and capture.captured_bytes() == expected > 0


def test_a_layer_the_capture_cannot_take_is_named():
    from diffusers import UNet2DConditionModel as Unet

    unet = Unet(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
    layer = default_layers(unet)[0]
    with pytest.raises(ValueError) as raised:
        Capture(unet, ["down_blocks.0.nope"])
    assert str(raised.value) == "unknown cross-attention layer 'down_blocks.0.nope'"
    cross_attention_layers(unet)[layer].group_norm = torch.nn.GroupNorm(8, 32)
    with pytest.raises(ValueError) as raised:
        Capture(unet, [layer])
    assert str(raised.value) == f"layer {layer!r} uses a normalisation the capture does not support"


@pytest.mark.parametrize("with_features", [False, True])
def test_the_graph_is_cut_or_the_unet_stopped_once_everything_is_recorded(tiny_pipe, with_features):
    """cut_graph: the UNet's output past the last recorded layer (and feature layer) carries no graph,
    while the maps do; without it the output does; stop=True ends the UNet call there."""
    from sgfast.capture import RecordingDone

    latents, embeds = unet_inputs(tiny_pipe, "a red circle")
    latents.requires_grad_(True)
    unet = tiny_pipe.unet
    layers = default_layers(unet)[:1]
    feature_layer = "down_blocks.1" if with_features else None
    words = PromptWords.from_tokenizer(tiny_pipe.tokenizer, "a red circle")
    chosen = selection([words, words], [["red"], ["red"]], "cpu")
    seen = []  # a down block returns (hidden states, skip states): the features are the hidden states
    hook = unet.down_blocks[1].register_forward_hook(lambda module, args, output: seen.append(output[0]))
    for cut in (True, False):
        with Capture(unet, layers, feature_layer=feature_layer, cut_graph=cut) as capture:
            with capture.record(*chosen, (16, 16), features=with_features):
                out = unet(latents, 10, encoder_hidden_states=embeds).sample
                assert capture.maps[layers[0]].requires_grad
                if with_features:
                    assert torch.equal(capture.features, seen[-1])
                else:
                    assert capture.features is None
                assert out.requires_grad == (not cut)
            assert torch.is_grad_enabled()
    hook.remove()
    with Capture(unet, layers, feature_layer=feature_layer) as capture:
        assert capture.cut_graph is False
        with capture.record(*chosen, (16, 16), features=with_features, stop=True):
            with pytest.raises(RecordingDone):
                unet(latents, 10, encoder_hidden_states=embeds)
            assert capture.maps[layers[0]].requires_grad
