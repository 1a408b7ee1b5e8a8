"""Guidance settings travel with a model: a pipeline folder's self_guidance.json becomes the defaults of
`from_pipe`, call and edit arguments override them, and a folder without it keeps the paper's."""

import json
import os

import pytest
import torch
from diffusers import StableDiffusionPipeline

from sgfast import SelfGuidancePipeline, copy_appearance, move, place, resize
from sgfast import edits as edits_module
from sgfast.sampler import default_schedule
from sgfast.settings import FILENAME, KINDS, GuidanceSettings, kind_of, model_settings
from sgfast.shapes import model as shapes_model
from sgfast.testing import tiny_pipeline

PROMPT = "a red circle and a blue square"
STEPS = 5
SETTINGS = {
    "format": 1,
    "defaults": {"self_guidance_scale": 3.0, "normalize_gradient": True, "guidance_schedule": {"from_step": 1, "to_share": 0.6}},
    "edits": {"move": {"self_guidance_scale": 2.0, "keep_shape_weight": 1.0, "keep_centroid_weight": 5.0, "weight": 3.0}},
}
TUNED_SCHEDULE = [1 <= i < 0.6 * STEPS for i in range(STEPS)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The tiny pipeline saved as a folder with a settings file, as the training export writes one."""
    path = tmp_path_factory.mktemp("model")
    tiny_pipeline().save_pretrained(path)
    with open(path / FILENAME, "w") as f:
        json.dump(SETTINGS, f)
    return path


def load(folder):
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latents(sg, edit, trace, **kwargs):
    return sg(PROMPT, edits=[edit], trace=trace, num_inference_steps=STEPS, output_type="latent", **kwargs).images


def test_a_bare_call_uses_the_folders_settings(folder):
    tuned = SelfGuidancePipeline.from_pipe(load(folder))
    plain = SelfGuidancePipeline.from_pipe(load(folder), settings="paper")
    base = tuned(PROMPT, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="latent")
    bare = latents(tuned, move("circle", dx=0.3), base.trace)
    explicit = latents(
        plain, move("circle", dx=0.3, weight=3.0, keep_shape_weight=1.0, keep_centroid_weight=5.0), base.trace,
        self_guidance_scale=2.0, normalize_gradient=True, guidance_schedule=TUNED_SCHEDULE,
    )
    assert torch.equal(bare, explicit)
    assert not torch.equal(bare, latents(plain, move("circle", dx=0.3), base.trace))  # the settings change the result


def test_call_and_edit_arguments_override_the_settings(folder):
    tuned = SelfGuidancePipeline.from_pipe(load(folder))
    plain = SelfGuidancePipeline.from_pipe(load(folder), settings="paper")
    base = tuned(PROMPT, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="latent")
    overridden = latents(tuned, move("circle", dx=0.3, keep_shape_weight=7.0), base.trace, self_guidance_scale=0.5,
                         guidance_schedule="paper")
    explicit = latents(
        plain, move("circle", dx=0.3, weight=3.0, keep_shape_weight=7.0, keep_centroid_weight=5.0), base.trace,
        self_guidance_scale=0.5, normalize_gradient=True, guidance_schedule=default_schedule(STEPS),
    )
    assert torch.equal(overridden, explicit)


def test_a_kind_without_an_entry_takes_the_defaults_then_the_paper(folder):
    settings = model_settings(load(folder))
    edits, call = settings.resolve([[resize("circle", 2.0)]], STEPS)
    assert call == (3.0, True, TUNED_SCHEDULE)
    assert edits[0][0].keep_shape_weight == edits_module.SHAPE_WEIGHT and edits[0][0].weight == edits_module.SIZE_WEIGHT
    assert model_settings(tiny_pipeline()).resolve([[resize("circle", 2.0)]], STEPS)[1] == (1.0, False, None)


def test_a_pipeline_without_the_file_keeps_the_papers_defaults():
    pipe = tiny_pipeline()
    base = SelfGuidancePipeline.from_pipe(pipe)(PROMPT, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="latent")
    bare = latents(SelfGuidancePipeline.from_pipe(pipe), move("circle", dx=0.3), base.trace)
    explicit = latents(
        SelfGuidancePipeline.from_pipe(pipe), move("circle", dx=0.3, weight=4.0, keep_shape_weight=6.0, keep_appearance_weight=12.0,
                                                   keep_centroid_weight=0.0), base.trace,
        self_guidance_scale=1.0, normalize_gradient=False, guidance_schedule=default_schedule(STEPS),
    )
    assert torch.equal(bare, explicit)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"edits": {"spin": {}}}, "unknown edit kind 'spin'; allowed: move"),
        ({"edits": {"move": {"sharpness": 2}}}, "unknown setting 'sharpness'; allowed: self_guidance_scale"),
        ({"edits": {"copy_appearance": {"keep_centroid_weight": 2}}}, "unknown setting 'keep_centroid_weight'"),
        ({"edits": {"copy_layout": {"keep_shape_weight": 2}}}, "unknown setting 'keep_shape_weight'"),
        ({"defaults": {"self_guidance_scale": -1}}, "self_guidance_scale must be a finite number >= 0"),
        ({"defaults": {"normalize_gradient": "yes"}}, "normalize_gradient must be true or false"),
        ({"defaults": {"guidance_schedule": {"from_step": 1}}}, 'guidance_schedule must be "paper" or'),
        ({"defaults": {"guidance_schedule": {"from_step": 1, "to_share": 1.5}}}, "to_share must be in (0, 1]"),
        ({"format": 2}, 'expected an object with "format": 1'),
        ({"extra": 1}, "unknown keys ['extra']"),
        ({"feature_layer": 3}, "feature_layer must be a block name such as"),
        ({"layers": []}, "layers must be an attention layer name or block prefix, or a non-empty list of them"),
        ({"layers": ""}, "layers must be an attention layer name or block prefix"),
        ({"layers": [""]}, "layers must be an attention layer name or block prefix"),
        ({"layers": ["up_blocks.1", 2]}, "layers must be an attention layer name or block prefix"),
        ({"layers": {"up_blocks.1": 1}}, "layers must be an attention layer name or block prefix"),
        ({"layers": ["up_blocks.7"]}, "layers: unknown cross-attention layer 'up_blocks.7'; this UNet has"),
        ({"photo": {"strength": 0}}, "photo strength must be a number in (0, 1]"),
        ({"photo": {"mode": "fast"}}, "unknown photo keys ['mode']"),
        ({"photo": {"edits": {"move": {"sharpness": 2}}}}, "photo edits.move: unknown setting 'sharpness'"),
        ({"photo": {"edits": {"resize": {"keep_own_size_weight": 2}}}}, "photo edits.resize: unknown setting 'keep_own_size_weight'"),
        ({"photo": {"edits": {"move": {"keep_own_appearance_weight": -1}}}}, "keep_own_appearance_weight must be a finite number >= 0"),
    ],
)
def test_a_bad_file_is_a_clear_error_naming_the_file(tmp_path, change, message):
    tiny_pipeline().save_pretrained(tmp_path)
    with open(tmp_path / FILENAME, "w") as f:
        json.dump({**SETTINGS, **change}, f)
    with pytest.raises(ValueError, match=".*".join(map(__import__("re").escape, [str(tmp_path / FILENAME), message]))):
        SelfGuidancePipeline.from_pipe(load(tmp_path))


def test_an_inverted_photos_edits_take_the_photo_section(folder):
    """A call whose trace comes from sg.invert takes the "photo" entries over the others (key by key),
    and edit_arguments the photo strength; a generated image's edits do not."""
    import PIL.Image

    from sgfast.invert import edit_arguments

    photo_settings = {**SETTINGS, "photo": {"strength": 0.6, "edits": {"move": {"weight": 9.0}}}}
    tuned = SelfGuidancePipeline.from_pipe(load(folder), settings=photo_settings)
    plain = SelfGuidancePipeline.from_pipe(load(folder), settings="paper")
    image = PIL.Image.new("RGB", (64, 64), (200, 40, 40))
    inverted = tuned.invert(image, PROMPT, num_inference_steps=STEPS)
    arguments = edit_arguments(inverted, edits=[move("circle", dx=0.3)])
    schedule = {k: v for k, v in arguments.items() if k != "num_inference_steps"}  # latents() sets the steps
    start = STEPS - round(0.6 * STEPS)
    assert arguments["guidance_schedule"] == [g and i >= start for i, g in enumerate(TUNED_SCHEDULE)]
    bare = latents(tuned, move("circle", dx=0.3), inverted, **schedule)
    explicit = latents(
        plain, move("circle", dx=0.3, weight=9.0, keep_shape_weight=1.0, keep_centroid_weight=5.0), inverted,
        self_guidance_scale=2.0, normalize_gradient=True, **schedule,
    )
    assert torch.equal(bare, explicit)
    as_list = latents(tuned, move("circle", dx=0.3), [inverted], **schedule)
    assert torch.equal(as_list, bare)  # the trace alone or in a list of one
    generated = tuned(PROMPT, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="latent")
    assert tuned.settings.resolve([[move("circle", dx=0.3)]], STEPS)[0][0][0].weight == 3.0  # not the photo's 9
    assert torch.equal(latents(tuned, move("circle", dx=0.3), generated.trace),
                       latents(SelfGuidancePipeline.from_pipe(load(folder)), move("circle", dx=0.3), generated.trace))


def test_bad_settings_argument_is_a_clear_error():
    with pytest.raises(TypeError, match='settings must be None, "paper", a path'):
        SelfGuidancePipeline.from_pipe(tiny_pipeline(), settings=3)
    with pytest.raises(FileNotFoundError, match="no guidance settings file"):
        SelfGuidancePipeline.from_pipe(tiny_pipeline(), settings="missing.json")


def test_every_edit_has_a_kind_and_the_fields_its_settings_may_set():
    assert kind_of(edits_module.CopyAppearance) == "copy_appearance" and "copy_layout" in KINDS and "keep_shape" in KINDS
    held = {"weight", "keep_shape_weight", "keep_appearance_weight", "keep_centroid_weight", "keep_size_weight"}
    own = {"keep_own_shape_weight", "keep_own_size_weight", "keep_own_appearance_weight"}
    assert set(KINDS["move"]) == set(KINDS["place"]) == held | own | {"shape_centroid_weight"}
    assert set(KINDS["resize"]) == held | {"keep_own_centroid_weight", "keep_own_shape_weight", "keep_own_shape_centroid_weight"}
    assert KINDS["copy_appearance"] == ("keep_appearance_weight", "keep_shape_weight")
    assert KINDS["copy_layout"] == KINDS["copy_shape"] == KINDS["keep_shape"] == ()


def test_the_built_in_model_ships_its_settings_and_the_export_writes_them(tmp_path):
    shipped = GuidanceSettings.read(os.path.join(shapes_model.default_model_path(), FILENAME))
    assert shipped.to_dict() == {"format": 1, **shapes_model.GUIDANCE_SETTINGS}
    written = GuidanceSettings.read(shapes_model.write_guidance_settings(str(tmp_path)))
    assert written.to_dict() == shipped.to_dict()
    sg = SelfGuidancePipeline.from_pipe(shapes_model.load_default_pipeline())
    assert sg.settings.to_dict() == shipped.to_dict()


def test_the_built_in_mmdit_model_ships_its_settings_and_captures_its_own_blocks(tmp_path):
    from sgfast.shapes import mmdit

    shipped = GuidanceSettings.read(os.path.join(mmdit.mmdit_model_path(), FILENAME))
    assert shipped.to_dict() == {"format": 1, **mmdit.GUIDANCE_SETTINGS}
    assert GuidanceSettings.read(mmdit.write_guidance_settings(str(tmp_path))).to_dict() == shipped.to_dict()
    pipe = mmdit.load_mmdit_pipeline()
    assert SelfGuidancePipeline.from_pipe(pipe).layers == ["transformer_blocks.2.attn", "transformer_blocks.3.attn"]
    assert SelfGuidancePipeline.from_pipe(pipe, layers="transformer_blocks.1").layers == ["transformer_blocks.1.attn"]


def test_the_files_feature_layer_is_used_unless_from_pipe_names_one(tmp_path):
    tiny_pipeline().save_pretrained(tmp_path)
    with open(tmp_path / FILENAME, "w") as f:
        json.dump({**SETTINGS, "feature_layer": "up_blocks.1"}, f)
    assert SelfGuidancePipeline.from_pipe(load(tmp_path)).feature_layer == "up_blocks.1"
    assert SelfGuidancePipeline.from_pipe(load(tmp_path), feature_layer="up_blocks.0").feature_layer == "up_blocks.0"
    with open(tmp_path / FILENAME, "w") as f:
        json.dump({**SETTINGS, "feature_layer": "up_blocks.9"}, f)
    with pytest.raises(ValueError, match="unknown feature layer 'up_blocks.9'; choose a UNet block such as"):
        SelfGuidancePipeline.from_pipe(load(tmp_path))


def test_the_files_layers_are_captured_unless_from_pipe_names_them(tmp_path):
    tiny_pipeline().save_pretrained(tmp_path)
    default = SelfGuidancePipeline.from_pipe(load(tmp_path)).layers
    for named in ("up_blocks.1", ["up_blocks.1"]):
        with open(tmp_path / FILENAME, "w") as f:
            json.dump({**SETTINGS, "layers": named}, f)
        sg = SelfGuidancePipeline.from_pipe(load(tmp_path))
        assert sg.layers and all(layer.startswith("up_blocks.1.") for layer in sg.layers) and sg.layers != default
        assert sg.settings.to_dict()["layers"] == ["up_blocks.1"]
        assert SelfGuidancePipeline.from_pipe(load(tmp_path), layers="down_blocks.0").layers[0].startswith("down_blocks.0.")


def test_a_bad_layer_choice_is_refused_before_the_pipeline_changes():
    from sgfast.shapes import mmdit

    pipe = tiny_pipeline()
    pipe.unet.requires_grad_(True)
    with pytest.raises(ValueError, match="layers names no cross-attention layer; name at least one"):
        SelfGuidancePipeline.from_pipe(pipe, mode="fast", layers=[])
    bad = {**SETTINGS, "layers": ["up_blocks.9"]}
    with pytest.raises(ValueError, match="guidance settings: layers: unknown cross-attention layer 'up_blocks.9'"):
        SelfGuidancePipeline.from_pipe(pipe, mode="fast", settings=bad)
    assert all(p.requires_grad for p in pipe.unet.parameters())  # fast mode's requires_grad_(False) not reached
    sd3 = mmdit.load_mmdit_pipeline()
    with pytest.raises(ValueError, match="layers names no joint-attention block"):
        SelfGuidancePipeline.from_pipe(sd3, layers=[])
    with pytest.raises(ValueError, match="guidance settings: layers: unknown joint-attention layer 'transformer_blocks.7'"):
        SelfGuidancePipeline.from_pipe(sd3, settings={**SETTINGS, "layers": "transformer_blocks.7"})


def test_the_models_own_holds_apply_unless_keep_others_is_off_or_a_weight_is_given():
    """A move or place takes its own-shape and own-size holds, a resize its own-centroid hold, from the
    model's settings; keep_others=False turns off those it did not name, a weight it names is its own."""
    own = {"move": {"keep_own_shape_weight": 4.0, "keep_own_size_weight": 0.5},
           "place": {"keep_own_shape_weight": 3.0}, "resize": {"keep_own_centroid_weight": 6.0}}
    settings = GuidanceSettings(edits=own)
    filled = settings.fill(move("circle", dx=0.2))
    assert (filled.keep_own_shape_weight, filled.keep_own_size_weight) == (4.0, 0.5)
    assert settings.fill(place("circle", 0.3, 0.4)).keep_own_shape_weight == 3.0
    assert settings.fill(resize("circle", 2.0)).keep_own_centroid_weight == 6.0
    off = settings.fill(move("circle", dx=0.2, keep_others=False))
    assert (off.keep_own_shape_weight, off.keep_own_size_weight, off.keep_own_appearance_weight) == (0.0, 0.0, 0.0)
    assert settings.fill(resize("circle", 2.0, keep_others=False)).keep_own_centroid_weight == 0.0
    named = settings.fill(move("circle", dx=0.2, keep_others=False, keep_own_size_weight=2.0))
    assert (named.keep_own_shape_weight, named.keep_own_size_weight) == (0.0, 2.0)
    assert settings.fill(move("circle", dx=0.2, keep_own_shape_weight=0.0)).keep_own_shape_weight == 0.0
    assert settings.fill(resize("circle", 2.0, keep_own_centroid_weight=0.0)).keep_own_centroid_weight == 0.0
    for bad in (dict(keep_own_size_weight=-1.0), dict(keep_own_size_weight=float("nan"))):
        with pytest.raises(ValueError, match="weight must be a finite number >= 0"):
            move("circle", **bad)
    with pytest.raises(ValueError, match="weight must be a finite number >= 0"):
        resize("circle", 2.0, keep_own_centroid_weight=-2.0)
