"""SD3 / SD3.5 and FLUX.1 (MMDiT) pipelines: drop-in against diffusers itself, word maps from joint
attention, every edit kind on both families, the refusals.

Tiny pipelines built offline (sgfast.testing): real diffusers / transformers classes, two CLIP
encoders and a T5 encoder (SD3), CLIP + T5 (FLUX), FlowMatchEulerDiscreteScheduler with shift.
"""

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from diffusers.models.attention_processor import JointAttnProcessor2_0
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from sgfast import (
    SelfGuidancePipeline,
    collage,
    copy_appearance,
    copy_layout,
    copy_shape,
    keep_appearance,
    keep_shape,
    move,
    place,
    resize,
    restyle,
)
from sgfast.families import load_pipeline
from sgfast.mmdit_capture import JointCapture, joint_attention_layers, text_column_maps
from sgfast.mmdit_families import CLIP_POSITIONS
from sgfast.mmdit_pipeline import MMDiTSelfGuidancePipeline
from sgfast.testing import tiny_flux_pipeline, tiny_sd3_pipeline

PROMPT = "a red circle and a blue square"
STEPS = 3


@pytest.fixture(scope="module")
def sd3():
    return tiny_sd3_pipeline()


@pytest.fixture(scope="module")
def flux():
    return tiny_flux_pipeline()


def same_call(pipe, sg, **kwargs):
    """(diffusers' images, the wrapper's) for one call, each from a fresh generator of the same seed."""
    def images(call):
        args = dict(kwargs)
        if "generator" not in args:
            args["generator"] = torch.Generator().manual_seed(0)
        else:
            args["generator"] = torch.Generator().manual_seed(args["generator"])
        return call(**args).images

    return images(pipe), images(sg)


FLUX_SIZE = dict(height=64, width=64)


def _scale_latents(pipe, i, t, tensors):
    return {"latents": tensors["latents"] * 0.9}


SD3_CALLS = {
    "plain": dict(prompt=PROMPT),
    "negative, two images, non-square": dict(prompt=[PROMPT, "a cat"], negative_prompt="a dog", num_images_per_prompt=2,
                                             height=48, width=80),
    "max_sequence_length, sigmas, guidance": dict(prompt=PROMPT, max_sequence_length=12, sigmas=[1.0, 0.6, 0.3],
                                                  guidance_scale=3.0, negative_prompt_3="a dog"),
    "callback": dict(prompt=PROMPT, callback_on_step_end=_scale_latents),
    "no CFG, skip-layer guidance arguments": dict(prompt=PROMPT, guidance_scale=1.0),
    "skip-layer guidance": dict(prompt=PROMPT, skip_guidance_layers=[1], skip_layer_guidance_start=0.0,
                                skip_layer_guidance_stop=1.0),
}
FLUX_CALLS = {
    "plain": dict(prompt=PROMPT, **FLUX_SIZE),
    "true CFG, two images, non-square": dict(prompt=[PROMPT, "a cat"], negative_prompt=["a dog", "a bird"], true_cfg_scale=2.0,
                                              num_images_per_prompt=2, height=48, width=80),
    "max_sequence_length, sigmas, guidance": dict(prompt=PROMPT, max_sequence_length=16, sigmas=[1.0, 0.5, 0.2],
                                                  guidance_scale=5.0, **FLUX_SIZE),
    "true_cfg_scale without a negative prompt": dict(prompt=PROMPT, true_cfg_scale=3.0, **FLUX_SIZE),
    "callback": dict(prompt=PROMPT, callback_on_step_end=_scale_latents, **FLUX_SIZE),
}


@pytest.mark.parametrize("name", SD3_CALLS)
def test_sd3_images_are_diffusers_own(sd3, name):
    sg = SelfGuidancePipeline.from_pipe(sd3)
    expected, got = same_call(sd3, sg, num_inference_steps=STEPS, output_type="np", **SD3_CALLS[name])
    assert isinstance(sg, MMDiTSelfGuidancePipeline)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("name", FLUX_CALLS)
def test_flux_images_are_diffusers_own(flux, name):
    sg = SelfGuidancePipeline.from_pipe(flux)
    expected, got = same_call(flux, sg, num_inference_steps=STEPS, output_type="np", **FLUX_CALLS[name])
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("variant", ["sd35-medium", "sd35-large"])
def test_sd35_images_are_diffusers_own_with_every_block_captured(variant):
    """SD3.5's dual attention and QK RMS-norm, every block's attention replaced by the capture's."""
    pipe = tiny_sd3_pipeline(variant=variant)
    sg = SelfGuidancePipeline.from_pipe(pipe, layers="transformer_blocks")
    expected, got = same_call(pipe, sg, prompt=PROMPT, num_inference_steps=2, output_type="np")
    np.testing.assert_array_equal(got, expected)


def test_flux_schnell_with_every_block_captured_is_diffusers_own():
    pipe = tiny_flux_pipeline(guidance_embeds=False)
    sg = SelfGuidancePipeline.from_pipe(pipe, layers=["transformer_blocks", "single_transformer_blocks"])
    expected, got = same_call(pipe, sg, prompt=PROMPT, num_inference_steps=2, output_type="np", **FLUX_SIZE)
    np.testing.assert_array_equal(got, expected)


def test_latent_output_and_tuple_return_are_diffusers_own(flux):
    sg = SelfGuidancePipeline.from_pipe(flux)
    kwargs = dict(prompt=PROMPT, num_inference_steps=2, output_type="latent", return_dict=False, **FLUX_SIZE)
    expected = flux(generator=torch.Generator().manual_seed(1), **kwargs)
    got = sg(generator=torch.Generator().manual_seed(1), **kwargs)
    assert isinstance(got, tuple) and len(got) == len(expected)
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)


@pytest.mark.parametrize("builder, cls", [(tiny_sd3_pipeline, StableDiffusion3Pipeline), (tiny_flux_pipeline, FluxPipeline)])
def test_load_pipeline_loads_saved_folders_as_their_class(tmp_path, builder, cls):
    pipe = builder()
    pipe.save_pretrained(tmp_path)
    loaded = load_pipeline(str(tmp_path))
    assert type(loaded) is cls
    loaded.set_progress_bar_config(disable=True)
    size = FLUX_SIZE if cls is FluxPipeline else {}
    expected, got = same_call(loaded, SelfGuidancePipeline.from_pipe(loaded), prompt=PROMPT, num_inference_steps=2,
                              output_type="np", **size)
    np.testing.assert_array_equal(got, expected)


# ---- words and maps -------------------------------------------------------------------------------


def test_sd3_words_sit_at_their_clip_positions_and_their_t5_pieces(sd3):
    sg = SelfGuidancePipeline.from_pipe(sd3)
    words = sg._prompt_words("a red circle and a bird", 32)
    assert words.words == ["a", "red", "circle", "and", "a", "bird"]
    clip_ids = sd3.tokenizer(words.prompt, padding="max_length", max_length=77).input_ids
    t5_ids = sd3.tokenizer_3(words.prompt, padding="max_length", max_length=32).input_ids
    circle = words.positions[words.index("circle")]
    clip_part = [p for p in circle if p < CLIP_POSITIONS]
    t5_part = [p - CLIP_POSITIONS for p in circle if p >= CLIP_POSITIONS]
    assert [sd3.tokenizer.convert_ids_to_tokens(clip_ids[p]) for p in clip_part] == ["circle</w>"]
    assert [sd3.tokenizer_3.convert_ids_to_tokens(t5_ids[p]) for p in t5_part] == ["▁circle"]


def test_flux_words_are_t5_pieces_and_an_unknown_word_is_all_its_pieces(flux):
    sg = SelfGuidancePipeline.from_pipe(flux)
    words = sg._prompt_words("a red sun", 512)
    assert words.words == ["a", "red", "sun"]
    ids = flux.tokenizer_2(words.prompt).input_ids
    assert [flux.tokenizer_2.convert_ids_to_tokens(ids[p]) for p in words.positions[2]] == ["▁s", "u", "n"]


def _explicit_maps(query, key, token_index, image, text, scale, softmax):
    """Every probability of the joint attention written out, then sliced."""
    logits = torch.einsum("bhnd,bhld->bhnl", query[:, :, image], key) * scale
    if softmax == "text":
        logits = logits[..., text]
    probabilities = logits.softmax(-1)
    if softmax == "joint":
        probabilities = probabilities[..., text]
    columns = torch.stack([probabilities[b][..., token_index[b]] for b in range(query.shape[0])])
    return columns.mean(1).transpose(1, 2)


@pytest.mark.parametrize("softmax", ["joint", "text"])
@pytest.mark.parametrize("image_first", [True, False])
def test_text_column_maps_are_the_joint_attentions_columns_forward_and_backward(softmax, image_first):
    torch.manual_seed(0)
    batch, heads, images, texts, dim = 2, 3, 7, 5, 6
    query = torch.randn(batch, heads, images + texts, dim, dtype=torch.float64, requires_grad=True)
    key = torch.randn(batch, heads, images + texts, dim, dtype=torch.float64, requires_grad=True)
    image, text = (slice(0, images), slice(images, None)) if image_first else (slice(texts, None), slice(0, texts))
    token_index = torch.tensor([[1, 3, 4], [0, 0, 2]])
    scale = dim**-0.5
    got = text_column_maps(query, key, token_index, image, text, scale, softmax)
    expected = _explicit_maps(query, key, token_index, image, text, scale, softmax)
    torch.testing.assert_close(got, expected)
    weights = torch.randn_like(got)
    grads = torch.autograd.grad((got * weights).sum(), (query, key))
    expected_grads = torch.autograd.grad((expected * weights).sum(), (query, key))
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e)


def _record_all_text(sg, pipe, call, layers):
    """The maps of every text position, at every captured layer, of one transformer pass."""
    capture = sg.capture()
    texts = {}
    grid = sg.family.grid(64, 64)

    def hook(module, args, kwargs):
        text_len = kwargs["encoder_hidden_states"].shape[1]
        index = torch.arange(text_len)[None].expand(kwargs["hidden_states"].shape[0], -1)
        weights = torch.eye(text_len)[None].expand(index.shape[0], -1, -1)
        texts["record"] = capture.record(index, weights, grid)
        texts["record"].__enter__()

    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    maps = []
    try:
        with capture:
            orig = pipe.transformer.forward

            def forward(*a, **k):
                out = orig(*a, **k)
                maps.append({layer: capture.maps[layer].clone() for layer in layers})
                texts["record"].__exit__(None, None, None)
                return out

            pipe.transformer.forward = forward
            try:
                pipe(**call)
            finally:
                del pipe.transformer.forward
    finally:
        handle.remove()
    return maps


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_maps_over_every_text_key_sum_to_one_renormalised_and_to_the_text_share_jointly(family, sd3, flux):
    """With every text position selected, the "text" maps sum to 1 at each pixel (the slices are the
    text keys, all of them), the "joint" ones to less: the rest went to image keys."""
    pipe = sd3 if family == "sd3" else flux
    layers = list(joint_attention_layers(pipe.transformer))[:2]
    call = dict(prompt=PROMPT, num_inference_steps=1, output_type="latent", guidance_scale=1.0, max_sequence_length=16,
                height=64, width=64, generator=torch.Generator().manual_seed(0))
    sums = {}
    for softmax in ("text", "joint"):
        sg = MMDiTSelfGuidancePipeline(pipe, layers=layers, softmax=softmax)
        maps = _record_all_text(sg, pipe, call, layers)
        sums[softmax] = {layer: m.sum(1) for layer, m in maps[0].items()}
    for layer in layers:
        torch.testing.assert_close(sums["text"][layer], torch.ones_like(sums["text"][layer]))
        assert (sums["joint"][layer] < 1 - 1e-3).all() and (sums["joint"][layer] > 0).all()


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_only_captured_blocks_get_the_capture_processor_and_all_are_restored(family, sd3, flux):
    pipe = sd3 if family == "sd3" else flux
    sg = SelfGuidancePipeline.from_pipe(pipe)
    layers = joint_attention_layers(pipe.transformer)
    before = {name: m.processor for name, m in layers.items()}
    seen = {}

    def look(module, args, kwargs):
        seen.update({name: type(m.processor).__name__ for name, m in layers.items()})

    handle = pipe.transformer.register_forward_pre_hook(look, with_kwargs=True)
    try:
        sg(PROMPT, [move("circle", dx=0.2)], num_inference_steps=STEPS, output_type="latent", height=64, width=64)
    finally:
        handle.remove()
    plain = (JointAttnProcessor2_0, FluxAttnProcessor)
    captured = {name for name, kind in seen.items() if kind.endswith("CaptureProcessor")}
    assert captured == set(sg.layers)
    assert all(isinstance(m.processor, plain) for m in layers.values())
    assert {name: m.processor for name, m in layers.items()} == before


def test_defaults_capture_mid_depth_blocks_and_features_from_the_block_before_the_last(sd3, flux):
    big_sd3 = tiny_sd3_pipeline(num_layers=8)
    sg = SelfGuidancePipeline.from_pipe(big_sd3)
    assert sg.layers == [f"transformer_blocks.{i}.attn" for i in (2, 3)]
    assert sg.feature_layer == "transformer_blocks.2"
    big_flux = tiny_flux_pipeline(num_layers=4)
    sg = SelfGuidancePipeline.from_pipe(big_flux)
    assert sg.layers == ["transformer_blocks.2.attn", "transformer_blocks.3.attn"]
    assert sg.feature_layer == "transformer_blocks.2"
    assert SelfGuidancePipeline.from_pipe(sd3).feature_layer == "pos_embed"  # before block 0: the patch embedding


def test_trace_holds_every_word_at_every_step_on_the_token_grid(flux):
    sg = SelfGuidancePipeline.from_pipe(flux)
    out = sg(PROMPT, num_inference_steps=STEPS, height=48, width=80, output_type="latent")
    trace = out.trace
    assert len(trace.calls) == STEPS and trace.words == list(dict.fromkeys(PROMPT.split()))
    for _, step in trace.calls:
        for m in step.maps.values():
            assert m.shape == (len(trace.words), 48 // 8, 80 // 8)
        assert step.appearance.shape == (len(trace.words), flux.transformer.inner_dim)


# ---- edits ----------------------------------------------------------------------------------------


EVERY_EDIT = {
    "move": lambda source: [move("circle", dx=0.25)],
    "place": lambda source: [place("square", x=0.3, y=0.3)],
    "resize": lambda source: [resize("square", 1.5)],
    # Alone on an unedited generation a keep edit is on target (no pull): each holds beside a move.
    "keep_shape": lambda source: [move("circle", dx=0.25), keep_shape(["square"])],
    "keep_appearance": lambda source: [move("circle", dx=0.25), keep_appearance(["square"])],
    "copy_shape": lambda source: [copy_shape("circle", source)],
    "copy_appearance": lambda source: [copy_appearance("circle", source)],
    "copy_layout": lambda source: [copy_layout(source)],
    "collage": lambda source: [collage([(source, ["circle", "square"])])],
    "restyle": lambda source: [restyle(source, style_words=["red"])],
}
EDITS = list(EVERY_EDIT)


@pytest.mark.parametrize("kind", EDITS)
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_every_edit_kind_runs_and_changes_the_image(family, kind, sd3, flux):
    pipe = sd3 if family == "sd3" else flux
    sg = SelfGuidancePipeline.from_pipe(pipe)
    call = dict(num_inference_steps=4, output_type="latent", height=64, width=64)
    source = sg("a red circle and a blue square", generator=torch.Generator().manual_seed(3), **call).trace
    plain = sg(PROMPT, generator=torch.Generator().manual_seed(0), **call)
    edited = sg(PROMPT, EVERY_EDIT[kind](source), trace=plain.trace, guidance_schedule=[1, 2], **call)
    assert [step for step, _ in edited.energies] == [1, 2]
    assert all(np.isfinite(e) for _, e in edited.energies)
    assert not torch.equal(edited.images, plain.images)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_zero_scale_edit_is_the_unedited_image_bit_for_bit(family, sd3, flux):
    pipe = sd3 if family == "sd3" else flux
    sg = SelfGuidancePipeline.from_pipe(pipe)
    kwargs = dict(num_inference_steps=4, output_type="np", height=64, width=64)
    if family == "sd3":
        kwargs["negative_prompt"] = "a dog"
    expected = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images
    got = sg(PROMPT, [move("circle", dx=0.25), resize("square", 2.0)], self_guidance_scale=0,
             generator=torch.Generator().manual_seed(0), **kwargs)
    np.testing.assert_array_equal(got.images, expected)
    assert got.energies and all(e > 0 for _, e in got.energies)


def test_true_cfg_guided_step_runs_both_passes(flux):
    sg = SelfGuidancePipeline.from_pipe(flux)
    calls = []
    handle = flux.transformer.register_forward_pre_hook(lambda m, a, k: calls.append(k["hidden_states"].shape[0]),
                                                        with_kwargs=True)
    try:
        out = sg(PROMPT, [move("circle", dx=0.2)], negative_prompt="a dog", true_cfg_scale=2.0, num_inference_steps=3,
                 guidance_schedule=[1], output_type="latent", **FLUX_SIZE)
    finally:
        handle.remove()
    # The unedited reference (3 steps x 2 passes), then the edited call: 3 x 2 again.
    assert calls == [1] * 12 and [s for s, _ in out.energies] == [1]


def test_the_first_step_of_a_flow_schedule_is_not_guided(sd3):
    """At s = 1 the term is unbounded (sgfast.flow): the step runs unguided."""
    sg = SelfGuidancePipeline.from_pipe(sd3)
    out = sg(PROMPT, [move("circle", dx=0.2)], guidance_schedule=[0, 1], num_inference_steps=3, output_type="latent")
    assert [s for s, _ in out.energies] == [1]


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_readme_example_runs_with_an_mmdit_pipeline(family, sd3, flux):
    pipe = sd3 if family == "sd3" else flux
    size = FLUX_SIZE if family == "flux" else {}
    sg = SelfGuidancePipeline.from_pipe(pipe)
    prompt = "a red circle and a blue square"
    original = sg(prompt, generator=torch.Generator().manual_seed(0), num_inference_steps=4, **size)
    moved = sg(prompt, edits=[move("circle", dx=0.25)], trace=original.trace, num_inference_steps=4, **size)
    bigger = sg(prompt, edits=[resize("square", 2.0)], trace=original.trace, num_inference_steps=4, **size)
    expected = pipe(prompt, generator=torch.Generator().manual_seed(0), num_inference_steps=4, **size).images[0]
    assert np.array_equal(np.asarray(original.images[0]), np.asarray(expected))
    for out in (moved, bigger):
        assert out.images[0].size == expected.size
        assert not np.array_equal(np.asarray(out.images[0]), np.asarray(expected))


# ---- refusals --------------------------------------------------------------------------------------


def _calls(pipe):
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(edits=[move("dog", dx=0.1)]), ValueError, "word 'dog' is not in the prompt"),
    (dict(edits=[move("circle", dx=0.1)], guidance_schedule=[]), ValueError, "guides none of the"),
    (dict(self_guidance_scale=float("nan")), ValueError, "self_guidance_scale must be a finite number"),
    (dict(num_images_per_prompt=0), ValueError, "num_images_per_prompt must be an integer >= 1"),
    (dict(eta=0.5), TypeError, "eta"),
    (dict(edits=["move"]), TypeError, "edits must be sgfast.edits objects"),
])
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_bad_input_is_refused_before_anything_runs(family, kwargs, error, message, sd3, flux):
    pipe = sd3 if family == "sd3" else flux
    sg = SelfGuidancePipeline.from_pipe(pipe)
    calls, handle = _calls(pipe)
    try:
        with pytest.raises(error, match=message):
            sg(PROMPT, num_inference_steps=2, **kwargs)
    finally:
        handle.remove()
    assert calls == []


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_call_diffusers_refuses_is_refused_with_its_message(family, sd3, flux):
    pipe = sd3 if family == "sd3" else flux
    sg = SelfGuidancePipeline.from_pipe(pipe)
    kwargs = dict(prompt=PROMPT, num_inference_steps=2, callback_on_step_end_tensor_inputs=["noise"])
    with pytest.raises(ValueError) as expected:
        pipe(**kwargs)
    calls, handle = _calls(pipe)
    try:
        with pytest.raises(ValueError) as got:
            sg(edits=[move("circle", dx=0.1)], **kwargs)
    finally:
        handle.remove()
    assert str(got.value) == str(expected.value) and calls == []


@pytest.mark.parametrize("impl", ["auto", pytest.param("triton", marks=pytest.mark.slow)])
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_fast_mode_guides_as_the_reference_through_the_fused_op(family, impl, sd3, flux, monkeypatch):
    """mode="fast" (the fused op: "auto" is its torch reference on the CPU, "triton" its kernels through
    the interpreter; the rows' log-sum-exp from SDPA's own kernel on guided passes; the graph cut after
    the last captured block) against mode="reference" (the
    written-out softmax, the full graph): the same energies and, through the guidance gradient, the
    same latents, to 1e-4 in float32."""
    import sgfast.mmdit_capture as mmdit_capture

    pipe = sd3 if family == "sd3" else flux
    impls = []
    fused = mmdit_capture.joint_attention_stats

    def counted(*args, **kwargs):
        impls.append((kwargs["impl"], kwargs["lse"] is not None))
        return fused(*args, **kwargs)

    monkeypatch.setattr(mmdit_capture, "joint_attention_stats", counted)
    layers = list(joint_attention_layers(pipe.transformer))[:2]
    edits = [move("circle", dx=0.25), keep_appearance(["square"])]
    call = dict(num_inference_steps=3, guidance_schedule=[1], output_type="latent", height=64, width=64,
                max_sequence_length=16)
    outputs = {}
    for mode in ("reference", "fast"):
        sg = SelfGuidancePipeline.from_pipe(pipe, mode=mode, layers=layers)
        if mode == "fast":
            sg.capture().impl = impl  # "triton": the kernels on the CPU (TRITON_INTERPRET=1)
        outputs[mode] = sg(PROMPT, edits, generator=torch.Generator().manual_seed(0), **call)
    # Guided passes take the row normaliser from the attention's own kernel; the reference's recording
    # pass (no gradients) keeps the model's attention call and lets the op compute it.
    assert set(impls) == {(impl, True), (impl, False)}
    torch.testing.assert_close(outputs["fast"].energies, outputs["reference"].energies, rtol=1e-4, atol=1e-6)
    plain = sg(PROMPT, generator=torch.Generator().manual_seed(0), **call).images
    assert not torch.equal(outputs["reference"].images, plain)  # the guidance moved it
    torch.testing.assert_close(outputs["fast"].images, outputs["reference"].images, rtol=1e-4, atol=1e-4)


def test_fast_mode_takes_the_joint_softmax_only(sd3):
    with pytest.raises(ValueError, match="softmax='text' needs mode='reference'"):
        SelfGuidancePipeline.from_pipe(sd3, mode="fast", softmax="text")
    with pytest.raises(ValueError, match="compile=True is not available"):
        SelfGuidancePipeline.from_pipe(sd3, mode="fast", compile=True)


def test_unknown_layers_and_softmax_are_refused(sd3):
    with pytest.raises(ValueError, match="unknown joint-attention layer 'up_blocks.0'; this transformer has 3"):
        SelfGuidancePipeline.from_pipe(sd3, layers=["up_blocks.0"])
    with pytest.raises(ValueError, match="softmax must be one of"):
        SelfGuidancePipeline.from_pipe(sd3, softmax="image")
    with pytest.raises(ValueError, match="unknown feature layer"):
        SelfGuidancePipeline.from_pipe(sd3, feature_layer="mid_block")


def test_foreign_processors_are_refused_for_edits_and_left_alone_without(sd3):
    class Mine(JointAttnProcessor2_0):
        pass

    sg = SelfGuidancePipeline.from_pipe(sd3)
    module = joint_attention_layers(sd3.transformer)[sg.layers[0]]
    saved = module.processor
    module.set_processor(Mine())
    try:
        with pytest.raises(ValueError, match=r"have their own: transformer_blocks.0.attn \(Mine\)"):
            sg(PROMPT, [move("circle", dx=0.1)], num_inference_steps=2)
        expected, got = same_call(sd3, sg, prompt=PROMPT, num_inference_steps=2, output_type="np")
        np.testing.assert_array_equal(got, expected)
        assert isinstance(module.processor, Mine)
    finally:
        module.set_processor(saved)


def test_joint_capture_refuses_a_layer_it_does_not_have(sd3):
    with pytest.raises(ValueError, match="unknown joint-attention layer 'transformer_blocks.9.attn'"):
        JointCapture(sd3.transformer, ["transformer_blocks.9.attn"])


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_fast_mode_without_edits_and_at_zero_scale_is_diffusers_own(family, sd3, flux):
    pipe = sd3 if family == "sd3" else flux
    sg = SelfGuidancePipeline.from_pipe(pipe, mode="fast")
    kwargs = dict(prompt=PROMPT, num_inference_steps=STEPS, output_type="np", height=64, width=64)
    expected, got = same_call(pipe, sg, **kwargs)
    np.testing.assert_array_equal(got, expected)
    _, zero = same_call(pipe, lambda **k: sg(edits=[move("circle", dx=0.2)], self_guidance_scale=0, **k), **kwargs)
    np.testing.assert_array_equal(zero, expected)


def _clean_latents(pipe, pixels):
    """The transformer's clean latents of `pixels`, written out from diffusers' decoding convention
    (latents / scaling_factor + shift_factor), packed 2x2 for FLUX."""
    vae = pipe.vae
    latents = (vae.encode(pixels).latent_dist.mode() - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor
    if isinstance(pipe, FluxPipeline):
        b, c, h, w = latents.shape
        latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
    return latents


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_trace_image_noises_the_encoded_image_to_each_sigma_without_cfg(family, sd3, flux):
    pipe = {"sd3": sd3, "flux": flux}[family]
    sg = SelfGuidancePipeline.from_pipe(pipe)
    rng = np.random.default_rng(5)
    image = rng.uniform(0, 1, (64, 64, 3)).astype(np.float32)
    clean = _clean_latents(pipe, pipe.image_processor.preprocess(image))
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(3))
    seen = []
    forward = pipe.transformer.forward

    def spy(*args, **kwargs):
        seen.append((kwargs["hidden_states"].clone(), kwargs["timestep"].clone()))
        return forward(*args, **kwargs)

    pipe.transformer.forward = spy
    try:
        trace = sg.trace_image(image, PROMPT, num_inference_steps=4, generator=torch.Generator().manual_seed(3))
    finally:
        del pipe.transformer.forward
    assert len(seen) == 4 and sorted(trace.steps) == sorted(int(t) for t in pipe.scheduler.timesteps)
    for hidden, timestep in seen:
        assert hidden.shape[0] == 1  # the conditional row only: no CFG
        sigma = float(timestep[0]) / (1 if family == "flux" else 1000)  # FLUX's transformer takes t / 1000
        torch.testing.assert_close(hidden, (1 - sigma) * clean + sigma * noise, rtol=1e-5, atol=1e-5)
    assert trace.settings is None and trace.image_size == (64, 64)  # a real image's trace: no call recorded
    assert set(trace.words) >= {"red", "circle", "blue", "square"}
    with pytest.raises(ValueError, match="one image"):
        sg.trace_image(np.stack([image, image]), PROMPT, num_inference_steps=2)
    with pytest.raises(ValueError, match="noise must have the latents' shape"):
        sg.trace_image(image, PROMPT, num_inference_steps=2, noise=torch.zeros(1, 2, 3))
    cfg = {"sd3": dict(guidance_scale=5.0), "flux": dict(true_cfg_scale=4.0, negative_prompt="blurry")}[family]
    with pytest.raises(ValueError, match="conditional pass only"):
        sg.trace_image(image, PROMPT, num_inference_steps=2, **cfg)


def test_trace_image_on_the_builtin_mmdit_model_finds_the_objects():
    import PIL.Image

    from sgfast.shapes import load_pipeline
    from sgfast.shapes.scenes import make_scene, read_scene

    pipe, _ = load_pipeline("default-mmdit")
    sg = SelfGuidancePipeline.from_pipe(pipe)
    # Scenes the model never saw, of two objects of different shapes: each shape word's map sits nearer
    # its own object than the other.
    scenes = ((make_scene(s), read_scene(make_scene(s).image)) for s in range(3_000_000, 3_001_000))
    two_shapes = ((scene, objects) for scene, objects in scenes if len({o.shape for o in objects}) == len(objects) == 2)
    for scene, (a, b) in [next(two_shapes) for _ in range(3)]:
        trace = sg.trace_image(PIL.Image.fromarray(scene.image), scene.caption, num_inference_steps=10, generator=torch.Generator().manual_seed(0))
        late = trace.view(sorted(trace.steps)[2])  # a low-noise step
        for obj, other in ((a, b), (b, a)):
            found = np.array(late.centroid(trace.index(obj.shape)).mean(0).tolist())
            assert np.linalg.norm(found - obj.centroid) < np.linalg.norm(found - other.centroid), (scene.caption, obj, found)
