"""The object edits' own holds and `keep_others` in a request's edits, as the library takes them (move
and place: keep_own_shape_weight, keep_own_size_weight, keep_own_appearance_weight, shape_centroid_weight;
resize: keep_own_centroid_weight, keep_own_shape_weight, keep_own_shape_centroid_weight): each reaches the edit the pipeline is called with, and a bad value (negative,
over the cap, not a number, a field the edit does not have) is a 422 in the one error schema, naming the
field, before anything runs."""

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from sgfast import SelfGuidancePipeline  # noqa: E402
from sgfast.serve.admission import Limits  # noqa: E402
from sgfast.serve.app import create_app  # noqa: E402
from sgfast.serve.cost import CostModel  # noqa: E402
from sgfast.serve.engine import Engine  # noqa: E402
from sgfast.testing import tiny_pipeline  # noqa: E402

PROMPT = "a red circle and a blue square"
OWN_HOLDS = {
    "move": ("keep_own_shape_weight", "keep_own_size_weight", "keep_own_appearance_weight", "shape_centroid_weight"),
    "place": ("keep_own_shape_weight", "keep_own_size_weight", "keep_own_appearance_weight", "shape_centroid_weight"),
    "resize": ("keep_own_centroid_weight", "keep_own_shape_weight", "keep_own_shape_centroid_weight"),
}
TARGET = {"move": {"dx": 0.25}, "place": {"x": 0.3, "y": 0.6}, "resize": {"scale": 2.0}}


class Spy:
    """The pipeline, recording the edits of every call the server makes."""

    def __init__(self, sg):
        self.sg, self.pipe, self.settings = sg, sg.pipe, sg.settings
        self.edits = []

    def words(self, prompt):
        return self.sg.words(prompt)

    def __call__(self, prompts, **kwargs):
        self.edits.append(kwargs.get("edits"))
        return self.sg(prompts, **kwargs)


@pytest.fixture(scope="module")
def spy():
    return Spy(SelfGuidancePipeline.from_pipe(tiny_pipeline(seed=0)))


@pytest.fixture(scope="module")
def client(spy):
    from fastapi.testclient import TestClient

    limits = Limits(max_steps=6, default_steps=3, min_steps=1, max_edits=3)
    engine = Engine(spy, model="tiny", cost=CostModel.fixed(20, 60, 10), limits=limits, threads=1)
    with TestClient(create_app(engine), base_url="http://localhost") as c:
        yield c


def edit_of(kind, **fields):
    return {"type": kind, "word": "circle", **TARGET[kind], **fields}


CASES = [(kind, name) for kind, names in OWN_HOLDS.items() for name in names]


@pytest.mark.parametrize("kind, name", CASES)
def test_an_own_hold_reaches_the_edit_the_pipeline_runs(client, spy, kind, name):
    r = client.post("/v1/images", json={"prompt": PROMPT, "edits": [edit_of(kind, keep_others=False, **{name: 2.5})]})
    assert r.status_code == 200, r.text
    assert r.json()["edits"][0][name] == 2.5 and r.json()["edits"][0]["keep_others"] is False
    (edit,) = spy.edits[-1][0]
    assert type(edit).__name__.lower() == kind and getattr(edit, name) == 2.5 and edit.keep_others is False
    # keep_others=False: the own holds not named are off (the library's rule), not the model's.
    assert all(getattr(edit, other) == 0.0 for other in OWN_HOLDS[kind] if other != name)


@pytest.mark.parametrize("kind", OWN_HOLDS)
def test_own_holds_left_out_are_left_to_the_models_settings(client, spy, kind):
    r = client.post("/v1/images", json={"prompt": PROMPT, "edits": [edit_of(kind)]})
    assert r.status_code == 200, r.text
    (edit,) = spy.edits[-1][0]
    assert edit.keep_others is True and set(OWN_HOLDS[kind]) <= set(edit.unset)  # filled from self_guidance.json at the call


BAD = [
    (edit_of("move", keep_own_shape_weight=-1), ["keep_own_shape_weight"], "greater than or equal to 0"),
    (edit_of("place", keep_own_size_weight=1001), ["keep_own_size_weight"], "less than or equal to 1000"),
    (edit_of("move", keep_own_appearance_weight="0.5"), ["keep_own_appearance_weight"], "a valid number"),
    (edit_of("place", keep_own_shape_weight=True), ["keep_own_shape_weight"], "a valid number"),
    (edit_of("resize", keep_own_centroid_weight=[8]), ["keep_own_centroid_weight"], "a valid number"),
    (edit_of("resize", keep_others="no"), ["keep_others"], "a valid boolean"),
    (edit_of("move", keep_shape_weight="4"), ["keep_shape_weight"], "a valid number"),
    (edit_of("move", keep_own_centroid_weight=8), [], "'keep_own_centroid_weight': not a field of a move edit"),
    (edit_of("resize", keep_own_size_weight=4), [], "'keep_own_size_weight': not a field of a resize edit"),
    (edit_of("place", keep_own_shape_wieght=4), [], "'keep_own_shape_wieght': not a field of a place edit; its fields: "),
]


@pytest.mark.parametrize("route", ["/v1/images", "/v1/edits"])
@pytest.mark.parametrize("edit, loc, message", BAD, ids=[f"{e['type']}-{m}" for e, _, m in BAD])
def test_a_bad_hold_is_422_naming_the_field(client, spy, route, edit, loc, message):
    body = {"prompt": PROMPT, "edits": [edit]}
    if route == "/v1/edits":
        body["photo"] = "iVBORw0KGgo="  # the schema's refusal comes before the photo is read
    calls = len(spy.edits)
    r = client.post(route, json=body)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail["status"] == 422 and detail["type"] == "invalid" and message in detail["message"]
    assert detail["errors"][0]["loc"][:3] == ["body", "edits", 0] and detail["errors"][0]["loc"][4:] == loc
    assert message in detail["errors"][0]["msg"] and len(spy.edits) == calls  # nothing ran
    if loc:
        assert detail["message"].startswith(".".join(["body", "edits", "0", edit["type"], *loc]))
    if "its fields" in message:
        assert "keep_own_shape_weight" in detail["message"]  # the field meant is among those listed
