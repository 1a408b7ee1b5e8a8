"""The server on SD3 and FLUX folders: `python -m sgfast serve --model FOLDER` loads them as the class
their model_index.json names, and the API generates and edits unchanged."""

import base64
import io
from types import SimpleNamespace

import PIL.Image
import pytest
import torch

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from sgfast import SelfGuidancePipeline  # noqa: E402
from sgfast.serve.admission import Limits  # noqa: E402
from sgfast.serve.app import create_app  # noqa: E402
from sgfast.serve.cli import build_engine  # noqa: E402
from sgfast.serve.cost import CostModel  # noqa: E402
from sgfast.serve.engine import Engine  # noqa: E402
from sgfast.serve.families import initial_noise, native_size, size_multiple  # noqa: E402
from sgfast.shapes import load_pipeline  # noqa: E402
from sgfast.testing import tiny_flux_pipeline, tiny_sd3_pipeline  # noqa: E402

BUILDERS = {"StableDiffusion3Pipeline": tiny_sd3_pipeline, "FluxPipeline": tiny_flux_pipeline}


@pytest.mark.parametrize("name", BUILDERS)
def test_mmdit_folder_generates_and_edits(tmp_path, name):
    BUILDERS[name]().save_pretrained(tmp_path / "model")
    pipe, _ = load_pipeline(str(tmp_path / "model"))
    assert type(pipe).__name__ == name
    engine = Engine(SelfGuidancePipeline.from_pipe(pipe), model="tiny", cost=CostModel.fixed(20, 60, 10),
                    limits=Limits(max_steps=6, default_steps=4, min_steps=2), threads=1)
    request = {"prompt": "a red circle and a blue square", "seed": 1, "steps": 4, "size": 64}
    with TestClient(create_app(engine), base_url="http://localhost") as client:
        plain = client.post("/v1/images", json=request)
        assert plain.status_code == 200, plain.text
        edited = client.post("/v1/images", json={**request, "edits": [{"type": "move", "word": "circle", "dx": 0.25}],
                                                 "self_guidance_scale": 50.0})
        assert edited.status_code == 200, edited.text
    images = [PIL.Image.open(io.BytesIO(base64.b64decode(r.json()["image"]))) for r in (plain, edited)]
    assert images[0].size == images[1].size == (64, 64)
    assert images[0].tobytes() != images[1].tobytes()  # the edit changed the image
    # The plain request is diffusers' own image for the seed's noise (at the API's default guidance scale).
    expected = pipe("a red circle and a blue square", num_inference_steps=4, height=64, width=64, guidance_scale=7.5,
                    latents=initial_noise(pipe, 1, 64, 64)).images[0]
    assert images[0].tobytes() == expected.tobytes()


@pytest.mark.parametrize("name", BUILDERS)
def test_the_noise_of_a_seed_is_what_diffusers_draws_for_it(name):
    pipe = BUILDERS[name]()
    generated = pipe("a cat", num_inference_steps=1, height=64, width=64, output_type="latent",
                     generator=torch.Generator().manual_seed(5)).images
    assert torch.equal(_SEEN["latents"], initial_noise(pipe, 5, 64, 64))
    assert generated.shape == _SEEN["latents"].shape


_SEEN = {}


@pytest.fixture(autouse=True)
def _record_prepared(monkeypatch):
    """Keep the latents prepare_latents returns (diffusers' draw from the generator)."""
    for cls_name in BUILDERS:
        import diffusers

        cls = getattr(diffusers, cls_name)
        original = cls.prepare_latents

        def prepare(self, *args, _original=original, **kwargs):
            out = _original(self, *args, **kwargs)
            _SEEN["latents"] = (out[0] if isinstance(out, tuple) else out).clone()
            return out

        monkeypatch.setattr(cls, "prepare_latents", prepare)


def test_sizes_follow_the_families_patches():
    sd3, flux = tiny_sd3_pipeline(), tiny_flux_pipeline()
    assert (native_size(sd3), size_multiple(sd3)) == (64, 8)  # 16 latents x VAE 4; VAE 4 x patch 2
    assert (native_size(flux), size_multiple(flux)) == (512, 8)  # FluxPipeline's default 128 x 4; 2x2 packing


def test_the_iteration_scheduler_is_refused_for_transformer_folders(tmp_path):
    tiny_sd3_pipeline().save_pretrained(tmp_path / "sd3")
    args = SimpleNamespace(model=str(tmp_path / "sd3"), device="cpu", mode="reference", scheduler="iteration")
    with pytest.raises(SystemExit, match="--scheduler iteration runs UNet pipelines; StableDiffusion3Pipeline"):
        build_engine(args, log=lambda m: None)
