"""SDXL: without edits, the wrapped StableDiffusionXLPipeline's images bit for bit; every edit lowers its
energy; the fast mode's gradient is the reference's; bad input refused. On the tiny SDXL pipeline of
sgfast.testing (real diffusers/transformers classes: two CLIP text encoders, the second with a
projection, a "text_time" UNet with two transformer layers per block at its coarsest level, Euler)."""

import copy
import logging
import re

import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny, StableDiffusionXLPipeline

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
from sgfast.sampler import edit_selection, guided_energy
from sgfast.testing import refusals, tiny_sdxl_pipeline
from sgfast.trace import PromptWords

PROMPT = "a red circle and a blue square painting"
STEPS = 5


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def pipe():
    return tiny_sdxl_pipeline()


@pytest.fixture(scope="module")
def sg(pipe):
    return SelfGuidancePipeline.from_pipe(pipe)


@pytest.fixture(scope="module")
def base(sg):
    return sg(PROMPT, num_inference_steps=STEPS, generator=seeded(), output_type="latent")


@pytest.fixture(scope="module")
def other(sg):
    return sg("a blue square and a red circle painting", num_inference_steps=STEPS, generator=seeded(1), output_type="latent").trace


# ---- no edits: diffusers' StableDiffusionXLPipeline bit for bit ----------------------------------------

CALLS = {
    "plain": dict(),
    "negative prompt, two images per prompt": dict(negative_prompt="green", num_images_per_prompt=2),
    "two prompts, second encoder's own prompt": dict(prompt=[PROMPT, "a cat"], prompt_2=["a dog", "a cat"], negative_prompt_2="blue"),
    # With a negative prompt (without one, SDXL's negative embeddings are zeros whatever negative_prompt_2 says).
    "negative prompts of both encoders": dict(negative_prompt="green", negative_prompt_2="blue"),
    "all four embeddings": "embeddings",
    "non-square": dict(height=48, width=80),
    # SDXL defaults each missing side alone (SD's pipeline both when either is missing).
    "height alone": dict(height=48),
    "width alone": dict(width=80),
    "denoising_end": dict(denoising_end=0.6),
    "denoising_end 1.0 (every step)": dict(denoising_end=1.0),
    "negative original size alone (the negative time ids are the positive ones)": dict(negative_original_size=(32, 32)),
    "micro-conditioning, rescale": dict(
        original_size=(128, 96), crops_coords_top_left=(4, 8), target_size=(64, 64), negative_original_size=(32, 32),
        negative_crops_coords_top_left=(0, 4), negative_target_size=(64, 64), guidance_rescale=0.5,
    ),
    "no CFG": dict(guidance_scale=1.0),
    "clip_skip": dict(clip_skip=1),
}


def embeddings(pipe, prompt=PROMPT, negative_prompt="green"):
    """prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds and negative_pooled_prompt_embeds."""
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    return dict(zip(names, pipe.encode_prompt(prompt, device="cpu", negative_prompt=negative_prompt)))


@pytest.mark.parametrize("name", CALLS)
def test_no_edits_is_the_sdxl_pipeline(pipe, sg, name):
    call = embeddings(pipe) if CALLS[name] == "embeddings" else CALLS[name]
    kwargs = dict(dict(prompt=PROMPT if call.get("prompt_embeds") is None else None, num_inference_steps=4, output_type="np"), **call)
    expected = pipe(generator=seeded(), **kwargs).images
    out = sg(generator=seeded(), **kwargs)
    assert out.images.shape == expected.shape
    assert np.array_equal(out.images, expected)
    assert (out.trace is not None) == (kwargs["prompt"] is not None)  # recorded on the way, without changing a bit


def test_a_callback_may_replace_the_added_conditioning(pipe, sg):
    def callback(pipeline, i, t, tensors):
        assert set(tensors) == {"latents", "prompt_embeds", "add_text_embeds", "add_time_ids"}
        if i == 1:  # a later crop and half the pooled embedding from here on
            return dict(add_time_ids=tensors["add_time_ids"] + 8, add_text_embeds=tensors["add_text_embeds"] / 2)
        return {}

    kwargs = dict(prompt=PROMPT, num_inference_steps=4, output_type="latent", callback_on_step_end=callback,
                  callback_on_step_end_tensor_inputs=["latents", "prompt_embeds", "add_text_embeds", "add_time_ids"])
    expected = pipe(generator=seeded(), **kwargs).images
    out = sg(generator=seeded(), **kwargs)
    assert torch.equal(out.images, expected)
    plain = sg(PROMPT, num_inference_steps=4, output_type="latent", generator=seeded()).images
    assert not torch.equal(out.images, plain)


def test_a_guided_step_passes_each_cfg_half_its_own_added_conditioning(pipe, sg, base):
    # diffusers runs [negative; prompt] in one UNet pass; a guided step runs the halves apart, and each
    # takes its own rows of the pooled text embedding and time ids (here the negative micro-conditioning differs).
    seen = []
    hook = pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append({k: v.clone() for k, v in kwargs["added_cond_kwargs"].items()}),
        with_kwargs=True)
    kwargs = dict(num_inference_steps=STEPS, output_type="latent", negative_original_size=(32, 32),
                  negative_target_size=(64, 64))
    try:
        pipe(PROMPT, generator=seeded(), **kwargs)
        batched, seen[:] = list(seen), []
        sg(PROMPT, edits=[move("circle", dx=0.3)], guidance_schedule=[0, 1], generator=seeded(), **kwargs)
    finally:
        hook.remove()
    assert len(batched) == STEPS and len(seen) == 2 * STEPS + 2  # the unedited run, then two guided steps
    halves = [(0, slice(0, 1)), (1, slice(1, 2))]
    guided = seen[STEPS:STEPS + 4]
    for (step, rows), got in zip([(0, r) for _, r in halves] + [(1, r) for _, r in halves], guided):
        assert not torch.equal(batched[step]["time_ids"][0], batched[step]["time_ids"][1])
        for key in ("text_embeds", "time_ids"):
            assert torch.equal(got[key], batched[step][key][rows]), (step, key)


def test_denoising_end_hands_the_base_latents_to_a_refiner(pipe, sg):
    kwargs = dict(prompt=PROMPT, num_inference_steps=6, output_type="latent", denoising_end=0.5)
    expected = pipe(generator=seeded(), **kwargs).images
    out = sg(generator=seeded(), **kwargs)
    assert torch.equal(out.images, expected)
    pipe.scheduler.set_timesteps(6)
    first_half = [t for t in pipe.scheduler.timesteps if t >= 500]  # diffusers' rule for the cut-off
    assert 0 < len(first_half) < 6 and len(out.trace.calls) == len(first_half)


def test_zero_scale_edit_is_the_unedited_image(pipe, sg, base):
    expected = pipe(PROMPT, num_inference_steps=STEPS, generator=seeded(), output_type="latent").images
    out = sg(PROMPT, edits=[move("circle", dx=0.3)], trace=base.trace, num_inference_steps=STEPS, generator=seeded(),
             output_type="latent", self_guidance_scale=0.0)
    assert torch.equal(out.images, expected) and out.energies


class FlipWatermark:
    """Stands in for the invisible-watermark package's marker, which diffusers applies to the decoded
    images before post-processing."""

    def apply_watermark(self, images):
        return images.flip(-1)


def test_the_watermark_is_applied_as_diffusers_applies_it():
    pipe = tiny_sdxl_pipeline()
    kwargs = dict(prompt=PROMPT, num_inference_steps=2, output_type="np")
    unmarked = pipe(generator=seeded(), **kwargs).images
    pipe.watermark = FlipWatermark()
    expected = pipe(generator=seeded(), **kwargs).images
    assert not np.array_equal(expected, unmarked)
    assert np.array_equal(SelfGuidancePipeline.from_pipe(pipe)(generator=seeded(), **kwargs).images, expected)


# Per-channel latent statistics, as some SDXL-family VAEs have them (normalised latents).
LATENT_STATS = dict(latents_mean=[0.1, -0.2, 0.3, 0.05], latents_std=[1.5, 0.8, 1.2, 2.0])


def sdxl_with_vae(half, stats):
    pipe = tiny_sdxl_pipeline()
    pipe.vae.register_to_config(**{k: LATENT_STATS[k] for k in stats})  # diffusers normalises only with both
    if half:
        pipe.vae.to(torch.float16)  # force_upcast, as SDXL's VAE: it runs in float32
    return pipe


def test_a_tiny_autoencoder_decodes_as_in_diffusers():
    # AutoencoderTiny (as taesdxl swaps in for fast previews): a config without latent statistics.
    pipe = tiny_sdxl_pipeline()
    torch.manual_seed(4)
    pipe.vae = AutoencoderTiny(encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
                               num_encoder_blocks=(1, 1, 1), num_decoder_blocks=(1, 1, 1), latent_channels=4)
    kwargs = dict(prompt=PROMPT, num_inference_steps=2, output_type="np")
    expected = pipe(generator=seeded(), **kwargs).images
    assert expected.shape == (1, 64, 64, 3)
    assert np.array_equal(SelfGuidancePipeline.from_pipe(pipe)(generator=seeded(), **kwargs).images, expected)


@pytest.mark.parametrize("half", [False, True], ids=["float32", "float16"])
@pytest.mark.parametrize("stats", [(), ("latents_mean", "latents_std"), ("latents_mean",)], ids=["scaled", "normalised", "mean only"])
def test_the_vae_decodes_as_diffusers_does(half, stats):
    pipe = sdxl_with_vae(half, stats)
    sg = SelfGuidancePipeline.from_pipe(pipe)
    expected = pipe(PROMPT, num_inference_steps=2, generator=seeded(), output_type="np").images
    out = sg(PROMPT, num_inference_steps=2, generator=seeded(), output_type="np")
    assert np.array_equal(out.images, expected)
    assert pipe.vae.dtype == (torch.float16 if half else torch.float32)


@pytest.mark.parametrize("half", [False, True], ids=["float32", "float16"])
@pytest.mark.parametrize("stats", [(), ("latents_mean", "latents_std"), ("latents_mean",)], ids=["scaled", "normalised", "mean only"])
def test_a_photo_encodes_to_the_latents_diffusers_img2img_makes(half, stats):
    """img2img's scaling (its prepare_latents) of the encoder's mode, in float32 (an upcast VAE's
    float16 weights in a float32 copy); the VAE is left in its own dtype."""
    pipe = sdxl_with_vae(half, stats)
    reference = copy.deepcopy(pipe.vae).float()
    pixels = torch.rand(1, 3, 64, 64, generator=seeded(3)) * 2 - 1
    latents = reference.encode(pixels).latent_dist.mode()
    factor = reference.config.scaling_factor
    if len(stats) == 2:
        mean, std = (torch.tensor(LATENT_STATS[k]).view(1, 4, 1, 1) for k in ("latents_mean", "latents_std"))
        expected = (latents - mean) * factor / std
    else:
        expected = latents * factor
    out = SelfGuidancePipeline.from_pipe(pipe).family.encode_image(pixels)
    assert out.dtype == torch.float32 and torch.equal(out, expected)
    assert pipe.vae.dtype == (torch.float16 if half else torch.float32)


# ---- defaults -----------------------------------------------------------------------------------------


def test_default_layers_are_the_coarsest_decoder_level(pipe, sg):
    assert sg.layers and all(name.startswith("up_blocks.0.attentions.") for name in sg.layers)
    assert len(sg.layers) == 4  # two attentions x two transformer layers
    # Appearance from the resnet that feeds the block's last attention: computed before the last map.
    assert sg.feature_layer == "up_blocks.0.resnets.1"
    # Layers of two up blocks: the block that feeds the finer one, as for SD.
    assert SelfGuidancePipeline.from_pipe(pipe, layers=["up_blocks.0", "up_blocks.1"]).feature_layer == "up_blocks.0"


def test_words_come_from_the_first_tokenizer_and_stop_at_the_end_token(sg, pipe):
    # The second tokenizer pads with "!", which is also a real token: a prompt's "!" is no padding.
    assert pipe.tokenizer_2.pad_token == "!"
    assert sg.words("a red circle!") == ["a", "red", "circle", "!"]
    assert PromptWords.from_tokenizer(pipe.tokenizer_2, "a red circle!").words == ["a", "red", "circle", "!"]


# ---- edits ----------------------------------------------------------------------------------------------


EDITS = ("move", "place", "resize", "keep_shape", "keep_appearance", "copy_appearance", "copy_shape", "copy_layout",
         "collage", "restyle")


def edits(base, other):
    return {
        "move": move("circle", dx=0.3, keep_others=False),
        "place": place("circle", 0.2, 0.8),
        "resize": resize("circle", 2.0, keep_others=False),
        "keep_shape": keep_shape(["square"]),
        "keep_appearance": keep_appearance(["square"]),
        "copy_appearance": copy_appearance("circle", other, "square"),
        "copy_shape": copy_shape("circle", other, translate=(0.1, 0.0), scale=1.2, rotate=30),
        "copy_layout": copy_layout(other),
        "collage": collage([(other, ["circle"]), (base.trace, ["square"])]),
        "restyle": restyle(other, ["painting"]),
    }


@pytest.mark.parametrize("name", EDITS)
def test_every_edit_lowers_its_energy(sg, base, other, name):
    # Other noise than the reference's, so that holding edits (keep_*) start away from their target.
    noise = torch.randn(1, 4, 16, 16, generator=seeded(5))
    edit = edits(base, other)[name]
    runs = {
        v: sg(PROMPT, edits=[edit], trace=base.trace, latents=noise, num_inference_steps=STEPS, generator=seeded(),
              output_type="latent", self_guidance_scale=v, normalize_gradient=True,
              guidance_schedule=[True] * (STEPS - 1) + [False])
        for v in (0.0, 0.3)
    }
    assert torch.isfinite(runs[0.3].images).all()
    assert [s for s, _ in runs[0.3].energies] == [0, 1, 2, 3]
    assert runs[0.3].energies[-1][1] < runs[0.0].energies[-1][1]


def test_fast_mode_moves_as_the_reference_does(pipe, sg, base):
    fast = SelfGuidancePipeline.from_pipe(tiny_sdxl_pipeline(), mode="fast")
    kwargs = dict(edits=[move("circle", dx=0.3)], trace=base.trace, num_inference_steps=STEPS, generator=seeded(),
                  output_type="latent", normalize_gradient=True, self_guidance_scale=0.3)
    slow, quick = sg(PROMPT, **kwargs), fast(PROMPT, **kwargs)
    torch.testing.assert_close(quick.images, slow.images, rtol=1e-4, atol=1e-4)
    assert quick.energies[-1][1] == pytest.approx(slow.energies[-1][1], rel=1e-4)


def step_gradient(sg, edit_list, reference):
    """Energy and gradient of one guided step's conditional pass at the second of four timesteps."""
    pipe, family = sg.pipe, sg.family
    words = [PromptWords.from_tokenizer(family.tokenizer, PROMPT)]
    chosen, tokens = edit_selection(edit_list, words, "cpu")
    cond, added = family.image_conditioning(PROMPT, "cpu", (64, 64))
    pipe.scheduler.set_timesteps(4)
    t = pipe.scheduler.timesteps[1]
    z = torch.randn(1, 4, 16, 16, generator=seeded(3)).requires_grad_(True)
    capture = sg.capture()
    with torch.enable_grad(), capture:
        _, energy = guided_energy(pipe, capture, z, t, cond, list(zip(edit_list, [reference])), words, chosen, tokens,
                                  unet_kwargs={"added_cond_kwargs": added})
        (grad,) = torch.autograd.grad(energy, z)
    return energy, grad


@pytest.mark.parametrize("name", ["move", "resize", "copy_appearance"])
def test_fast_gradient_equals_reference(pipe, base, other, name):
    reference = SelfGuidancePipeline.from_pipe(pipe, mode="reference")
    fast = SelfGuidancePipeline.from_pipe(pipe, mode="fast")
    edit_list = [[edits(base, other)[name]]]
    e_ref, g_ref = step_gradient(reference, edit_list, base.trace)
    e_fast, g_fast = step_gradient(fast, edit_list, base.trace)
    assert g_ref.abs().max() > 0
    torch.testing.assert_close(e_fast, e_ref, rtol=1e-6, atol=0)
    assert ((g_fast - g_ref).norm() / g_ref.norm()).item() < 1e-4


@pytest.mark.compile
def test_compiled_guided_step_gradient_matches_eager(base, other):
    eager = SelfGuidancePipeline.from_pipe(tiny_sdxl_pipeline(), mode="fast")
    compiled = SelfGuidancePipeline.from_pipe(tiny_sdxl_pipeline(), mode="fast", compile=True)
    for name in ("move", "copy_appearance"):
        edit_list = [[edits(base, other)[name]]]
        _, g_eager = step_gradient(eager, edit_list, base.trace)
        _, g_compiled = step_gradient(compiled, edit_list, base.trace)
        assert g_eager.abs().max() > 0
        assert ((g_compiled - g_eager).norm() / g_eager.norm()).item() < 1e-4, name
    out = compiled(PROMPT, edits=[move("circle", dx=0.3)], trace=base.trace, num_inference_steps=STEPS,
                   generator=seeded(), output_type="latent")
    assert torch.isfinite(out.images).all() and out.energies


def test_real_image_trace_as_a_source(sg):
    image = np.zeros((64, 64, 3), dtype=np.float32)
    image[16:40, 8:32] = [1.0, 0.0, 0.0]
    photo = sg.trace_image(image, "a red square", num_inference_steps=STEPS, generator=seeded())
    assert photo.image_size == (64, 64) and len(photo.calls) == STEPS
    out = sg(PROMPT, edits=[copy_appearance("square", photo)], num_inference_steps=STEPS, generator=seeded(),
             output_type="latent")
    assert torch.isfinite(out.images).all() and out.energies


def test_a_saved_sdxl_folder_loads_as_an_sdxl_pipeline(pipe, tmp_path):
    from sgfast.families import load_pipeline

    pipe.save_pretrained(tmp_path / "sdxl")
    loaded = load_pipeline(str(tmp_path / "sdxl"), safety_checker=None)
    assert type(loaded).__name__ == "StableDiffusionXLPipeline"
    kwargs = dict(prompt=PROMPT, num_inference_steps=2, output_type="latent")
    expected = loaded(generator=seeded(), **kwargs).images
    assert torch.equal(SelfGuidancePipeline.from_pipe(loaded)(generator=seeded(), **kwargs).images, expected)
    with pytest.raises(FileNotFoundError, match="has no model_index.json"):
        load_pipeline(str(tmp_path))


def test_a_folder_loads_as_its_class_with_the_arguments_given(tmp_path):
    from sgfast.families import load_pipeline
    from sgfast.testing import tiny_pipeline

    tiny_sdxl_pipeline().save_pretrained(tmp_path / "sdxl")
    tiny_pipeline().save_pretrained(tmp_path / "sd")
    # safety_checker=None, which callers pass for SD folders, is dropped for SDXL (it has none), so
    # diffusers logs no "not expected" warning.
    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("diffusers").addHandler(handler)
    try:
        sdxl = load_pipeline(str(tmp_path / "sdxl"), safety_checker=None, torch_dtype=torch.float64)
        sd = load_pipeline(str(tmp_path / "sd"), safety_checker=None, torch_dtype=torch.float64)
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    assert not [w for w in warnings if "not expected" in w]
    assert type(load_pipeline(str(tmp_path / "sdxl"))).__name__ == "StableDiffusionXLPipeline"  # without it too
    assert (type(sdxl).__name__, type(sd).__name__) == ("StableDiffusionXLPipeline", "StableDiffusionPipeline")
    assert sdxl.unet.dtype == sd.unet.dtype == torch.float64
    index = tmp_path / "sd" / "model_index.json"
    index.write_text(index.read_text().replace('"StableDiffusionPipeline"', '"StableDiffusionImg2ImgPipeline"'))
    with pytest.raises(ValueError) as raised:
        load_pipeline(str(tmp_path / "sd"))
    assert str(raised.value) == (f"{str(tmp_path / 'sd')!r} holds a StableDiffusionImg2ImgPipeline; "
                                 "sgfast loads StableDiffusionPipeline or StableDiffusionXLPipeline or "
                                 "StableDiffusion3Pipeline or FluxPipeline folders")


# ---- bad input ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(denoising_end=1.5), ValueError, r"denoising_end must be a float in \(0, 1\]"),
        (dict(denoising_end=0.0), ValueError, r"denoising_end must be a float in \(0, 1\], got 0.0"),
        (dict(aesthetic_score=6.0), TypeError, re.escape(
            "unexpected arguments for a Stable Diffusion XL pipeline: aesthetic_score (its own: prompt_2, negative_prompt_2, "
            "pooled_prompt_embeds, negative_pooled_prompt_embeds, original_size, crops_coords_top_left, target_size, "
            "negative_original_size, negative_crops_coords_top_left, negative_target_size, denoising_end)") + "$"),
        (dict(prompt_embeds=torch.zeros(1, 77, 64)), ValueError, "pooled_prompt_embeds"),
        (dict(callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["negative_add_time_ids"]),
         ValueError, "callback_on_step_end_tensor_inputs` has to be in"),
        (dict(edits=[move("dog", dx=0.1)]), ValueError, "word 'dog' is not in the prompt"),
        (dict(trace="base", original_size=(128, 128), edits=[move("circle", dx=0.1)]), ValueError,
         "original_size: None there, \\(128, 128\\) here"),
    ],
)
def test_bad_input_is_refused_before_anything_runs(pipe, sg, base, kwargs, error, message):
    if kwargs.get("trace") == "base":
        kwargs["trace"] = base.trace
    calls = []
    hook = pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(error, match=message):
            sg(PROMPT, num_inference_steps=STEPS, output_type="latent", **kwargs)
    finally:
        hook.remove()
    assert not calls


def test_a_lora_scale_fails_as_diffusers_fails(pipe, sg):
    # diffusers scales the text encoders' LoRA layers through `text_model`, which this transformers'
    # CLIPTextModel lacks: the same failure, not another (and not a call that skips the scaling).
    kwargs = dict(prompt=PROMPT, num_inference_steps=2, output_type="latent", cross_attention_kwargs={"scale": 0.5})
    with pytest.raises(AttributeError) as expected:
        pipe(**kwargs)
    with pytest.raises(AttributeError) as raised:
        sg(**kwargs)
    assert str(raised.value) == str(expected.value)


def test_embeddings_without_a_second_text_encoder_as_diffusers(pipe):
    # A refiner-style pipeline: the micro-conditioning's width comes from the pooled embedding.
    one_encoder = StableDiffusionXLPipeline(**dict(pipe.components, text_encoder_2=None, tokenizer_2=None),
                                            add_watermarker=False)
    one_encoder.set_progress_bar_config(disable=True)
    kwargs = dict(embeddings(pipe), num_inference_steps=2, output_type="latent")
    expected = one_encoder(generator=seeded(), **kwargs).images
    assert torch.equal(SelfGuidancePipeline.from_pipe(one_encoder)(generator=seeded(), **kwargs).images, expected)


# Calls SDXL's own check_inputs refuses, each through one of the arguments the wrapper hands it.
REFUSED_AS_DIFFUSERS = {
    "prompt_2 with prompt_embeds": lambda pipe: dict(prompt=None, prompt_2="a dog", **embeddings(pipe)),
    "negative_prompt with its embeddings": lambda pipe: dict(prompt=None, **embeddings(pipe), negative_prompt="red"),
    "negative_prompt_2 with its embeddings": lambda pipe: dict(prompt=None, **embeddings(pipe), negative_prompt_2="red"),
    "negative embeddings without their pooled ones": lambda pipe: dict(
        {k: v for k, v in embeddings(pipe).items() if k != "negative_pooled_prompt_embeds"}, prompt=None),
    "prompt_embeds and negative_prompt_embeds of other shapes": lambda pipe: dict(
        embeddings(pipe), prompt=None, negative_prompt_embeds=torch.zeros(1, 7, 64)),
    "an IP-Adapter image and its embeddings": lambda pipe: dict(
        ip_adapter_image=torch.zeros(1, 3, 32, 32), ip_adapter_image_embeds=[torch.zeros(2, 1, 16)]),
}


@pytest.mark.parametrize("name", REFUSED_AS_DIFFUSERS)
def test_a_call_sdxl_refuses_is_refused_with_its_message(pipe, sg, name):
    kwargs = dict(dict(prompt=PROMPT, num_inference_steps=2, output_type="latent"), **REFUSED_AS_DIFFUSERS[name](pipe))
    expected, got, unet_calls = refusals(pipe, sg, **kwargs)
    assert expected is not None and got == expected and unet_calls == 0


def test_sd_pipelines_refuse_sdxl_arguments():
    from sgfast.testing import tiny_pipeline

    sg = SelfGuidancePipeline.from_pipe(tiny_pipeline())
    with pytest.raises(TypeError) as raised:
        sg(PROMPT, prompt_2="a dog", denoising_end=0.5)
    assert str(raised.value) == "unexpected arguments for a Stable Diffusion 1.x/2.x pipeline: denoising_end, prompt_2 (its own: none)"
