"""The server on an SDXL folder: `python -m sgfast serve --model FOLDER` loads it as the class its
model_index.json names, and the API generates and edits unchanged."""

import base64
import io

import PIL.Image
import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from sgfast import SelfGuidancePipeline  # noqa: E402
from sgfast.serve.admission import Limits  # noqa: E402
from sgfast.serve.app import create_app  # noqa: E402
from sgfast.serve.cost import CostModel  # noqa: E402
from sgfast.serve.engine import Engine  # noqa: E402
from sgfast.shapes import load_pipeline  # noqa: E402
from sgfast.testing import tiny_sdxl_pipeline  # noqa: E402


def test_sdxl_folder_generates_and_edits(tmp_path):
    tiny_sdxl_pipeline().save_pretrained(tmp_path / "sdxl")
    pipe, _ = load_pipeline(str(tmp_path / "sdxl"))
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    engine = Engine(SelfGuidancePipeline.from_pipe(pipe), model="tiny-sdxl", cost=CostModel.fixed(20, 60, 10),
                    limits=Limits(max_steps=6, default_steps=3, min_steps=2), threads=1)
    with TestClient(create_app(engine), base_url="http://localhost") as client:
        plain = client.post("/v1/images", json={"prompt": "a red circle", "seed": 1, "steps": 3})
        assert plain.status_code == 200, plain.text
        edited = client.post("/v1/images", json={"prompt": "a red circle", "seed": 1, "steps": 3,
                                                 "edits": [{"type": "move", "word": "circle", "dx": 0.2}],
                                                 "self_guidance_scale": 50.0})
        assert edited.status_code == 200, edited.text
    images = [PIL.Image.open(io.BytesIO(base64.b64decode(r.json()["image"]))) for r in (plain, edited)]
    assert images[0].size == images[1].size
    assert images[0].tobytes() != images[1].tobytes()  # the edit changed the image
