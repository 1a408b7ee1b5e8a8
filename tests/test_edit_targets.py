"""Each edit pulls toward what it is for, read independently of the edit code.

A synthetic generation stands in for the UNet: every word's map is a rendered Gaussian blob (centre,
two radii, an angle) at two resolutions, and the appearance features are a free tensor. The edits'
energies go through the sampler's own batching (`energy_of`, views per batch item) and references
and sources are real Traces recorded with `record_traces`. Gradient descent on the blobs' parameters
and the features plays the role of guidance; the result is then read off the parameters themselves
(where the blob is, how big, which way it points) and off the features inside each blob (plain
tensor code), never through sgfast's properties or energies.
"""

import math
from types import SimpleNamespace

import pytest
import torch

from sgfast import collage, copy_appearance, copy_layout, copy_shape, keep_appearance, keep_shape, move, place, resize, restyle
from sgfast.sampler import edit_selection, energy_of, record_traces
from sgfast.trace import PromptWords, Trace
from test_properties import loop_bilinear  # the written-out resampling, shared with the properties tests

LAYERS = {"coarse": (16, 16), "fine": (32, 32)}
FEATURE_GRID = (16, 16)
CHANNELS = 6
T = 500  # the one timestep of every trace here

# Orthogonal appearance vectors: which one an object took is read by cosine similarity.
COLOURS = {name: torch.eye(CHANNELS, dtype=torch.float64)[i] * 2.0 for i, name in enumerate(["red", "blue", "green", "oil"])}


def blob(cx, cy, rx=0.12, ry=0.12, angle=0.0):
    """Blob parameters: centre (image fractions, y down), radii (fractions), angle (degrees,
    clockwise on screen: the x radius turned toward +y)."""
    return torch.tensor([cx, cy, math.log(rx), math.log(ry), math.radians(angle)], dtype=torch.float64)


def render(params, height, width):
    """A Gaussian blob on the pixel-centre grid, with a small floor (attention is never exactly 0)."""
    cx, cy, log_rx, log_ry, angle = params
    ys = (torch.arange(height, dtype=torch.float64) + 0.5) / height
    xs = (torch.arange(width, dtype=torch.float64) + 0.5) / width
    dx, dy = xs[None, :] - cx, ys[:, None] - cy
    u = dx * torch.cos(angle) + dy * torch.sin(angle)  # along the x radius
    w = -dx * torch.sin(angle) + dy * torch.cos(angle)
    return torch.exp(-0.5 * ((u / log_rx.exp()) ** 2 + (w / log_ry.exp()) ** 2)) + 1e-3


class Scene:
    """One batch of synthetic generations: per item, each prompt word's blob; per item, features.

    Words outside `blobs` (stop words) get a faint uniform map. `features` start as a background
    value plus each object's colour inside its blob.
    """

    def __init__(self, prompts, blobs, colours=None):
        self.words = [PromptWords(p, p.split(), [[i + 1] for i in range(len(p.split()))]) for p in prompts]
        self.params = [{w: b.clone().requires_grad_(True) for w, b in item.items()} for item in blobs]
        self.features = torch.stack([self._paint(item, colours[b] if colours else {}) for b, item in enumerate(blobs)])
        self.features.requires_grad_(True)

    def _paint(self, blobs, colours):
        features = torch.full((CHANNELS, *FEATURE_GRID), 0.1, dtype=torch.float64)
        for word, colour in colours.items():
            mask = render(blobs[word], *FEATURE_GRID) > 0.5
            features[:, mask] = colour[:, None]
        return features

    def map(self, b, word, size):
        if word in self.params[b]:
            return render(self.params[b][word], *size)
        return torch.full(size, 0.01, dtype=torch.float64)

    def capture(self, words):
        """What the sampler's capture holds after a UNet pass recording `words` per item."""
        count = max(len(ws) for ws in words)
        maps = {}
        for layer, size in LAYERS.items():
            rows = []
            for b, ws in enumerate(words):
                item = [self.map(b, w, size) for w in ws]
                item += [item[0]] * (count - len(item))  # padding, as the capture's rectangular batch
                rows.append(torch.stack(item))
            maps[layer] = torch.stack(rows)
        return SimpleNamespace(maps=maps, features=self.features)

    def traces(self):
        """Each item recorded the way the sampler records an unedited generation."""
        words = [list(dict.fromkeys(pw.words)) for pw in self.words]
        traces = [Trace(pw.prompt, ws) for pw, ws in zip(self.words, words)]
        with torch.no_grad():
            record_traces(traces, self.capture(words), words, T)
        return traces

    def guide(self, edits, references=None, steps=150, lr=0.02):
        """Minimise the edits' energy over the blobs and the features (one edit list per item)."""
        references = references or [None] * len(edits)
        words, _ = edit_selection(edits, self.words, "cpu")
        leaves = [p for item in self.params for p in item.values()] + [self.features]
        optimiser = torch.optim.Adam(leaves, lr=lr)
        # A decaying step size settles within a small fraction of the tolerances below.
        decay = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda i: 1 - i / steps)
        for _ in range(steps):
            optimiser.zero_grad()
            energy = energy_of(edits, self.capture(words), self.words, words, references, T)
            energy.backward()
            optimiser.step()
            decay.step()
        return self

    # ---- independent readings ---------------------------------------------------------------

    def centre(self, b, word):
        return self.params[b][word][:2].detach()

    def area(self, b, word):
        """The blob's area up to a constant: the product of its radii."""
        return self.params[b][word][2:4].detach().sum().exp().item()

    def orientation(self, b, word):
        """Angle (degrees, clockwise on screen, in [-90, 90)) of the blob's long axis, from its
        second moments on a fine grid."""
        m = render(self.params[b][word].detach(), 64, 64) - 1e-3
        ys, xs = torch.meshgrid(torch.arange(64.0, dtype=torch.float64), torch.arange(64.0, dtype=torch.float64), indexing="ij")
        mx, my = (m * xs).sum() / m.sum(), (m * ys).sum() / m.sum()
        cxx, cyy = (m * (xs - mx) ** 2).sum(), (m * (ys - my) ** 2).sum()
        cxy = (m * (xs - mx) * (ys - my)).sum()
        angle = 0.5 * math.degrees(math.atan2(2 * cxy.item(), (cxx - cyy).item()))
        return (angle + 90) % 180 - 90

    def appearance(self, b, word):
        """Mean feature over the pixels where the word's blob is above half its peak."""
        m = render(self.params[b][word].detach(), *FEATURE_GRID) - 1e-3
        mask = m > 0.5 * m.max()
        return self.features[b].detach()[:, mask].mean(-1)


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()


PROMPT = "a red circle and a blue square"
CIRCLE, SQUARE = blob(0.45, 0.45, 0.08, 0.08), blob(0.7, 0.65, 0.07, 0.07)


def two_objects(prompts=(PROMPT,), circle=CIRCLE, square=SQUARE, colours=None):
    colours = colours or {"circle": COLOURS["red"], "square": COLOURS["blue"]}
    return Scene(list(prompts), [{"red": circle, "circle": circle, "blue": square, "square": square} for _ in prompts],
                 [colours for _ in prompts])


# ---- move, place, resize ------------------------------------------------------------------------


@pytest.mark.parametrize("dx, dy", [(0.2, 0.0), (-0.2, 0.0), (0.0, 0.15), (0.0, -0.15), (0.15, -0.1)])
def test_move_goes_the_asked_way(dx, dy):
    scene = two_objects()
    reference = scene.traces()
    scene.guide([[move("circle", dx=dx, dy=dy)]], reference)
    torch.testing.assert_close(scene.centre(0, "circle"), CIRCLE[:2] + torch.tensor([dx, dy], dtype=torch.float64), atol=0.02, rtol=0)


@pytest.mark.parametrize("x, y", [(0.25, 0.7), (0.7, 0.25)])
def test_place_puts_the_centre_at_x_y(x, y):
    scene = two_objects()
    scene.guide([[place("circle", x, y, keep_others=False)]], scene.traces())
    torch.testing.assert_close(scene.centre(0, "circle"), torch.tensor([x, y], dtype=torch.float64), atol=0.02, rtol=0)


@pytest.mark.parametrize("scale", [2.0, 0.5])
def test_resize_scales_the_area(scale):
    scene = two_objects()
    before = scene.area(0, "circle")
    scene.guide([[resize("circle", scale, keep_others=False)]], scene.traces())
    assert scene.area(0, "circle") / before == pytest.approx(scale, rel=0.15)
    # Without keep terms nothing holds the centre; it stays near (the log-ratio pull is strongest
    # on the size, and Adam moves every parameter a little).
    torch.testing.assert_close(scene.centre(0, "circle"), CIRCLE[:2], atol=0.08, rtol=0)


# ---- what is held -------------------------------------------------------------------------------


def disturbed(reference_scene, word, by=(0.08, -0.06)):
    """A scene whose `word` blob has drifted off the reference (as the rest of an image does while
    an edit pulls on one object)."""
    scene = two_objects()
    with torch.no_grad():
        scene.params[0][word][:2] += torch.tensor(by, dtype=torch.float64)
        if word == "square":
            scene.params[0]["blue"][:2] += torch.tensor(by, dtype=torch.float64)
    return scene


@pytest.mark.parametrize("with_term, without_term", [
    (lambda: move("circle", dx=0.1), lambda: move("circle", dx=0.1, keep_shape_weight=0.0)),
    (lambda: resize("circle", 1.5), lambda: resize("circle", 1.5, keep_shape_weight=0.0)),
    (lambda: keep_shape(["blue", "square"]), lambda: keep_shape(["blue", "square"], weight=0.0)),
])
def test_keep_shape_pulls_a_drifted_object_back(with_term, without_term):
    reference = two_objects().traces()
    drift = {}
    for name, edit in (("with", with_term), ("without", without_term)):
        scene = disturbed(two_objects(), "square").guide([[edit()]], reference)
        drift[name] = (scene.centre(0, "square") - SQUARE[:2]).norm().item()
    assert drift["with"] < 0.02 and drift["without"] > 0.08


def test_keep_appearance_pulls_drifted_features_back():
    reference = two_objects().traces()
    error = {}
    for name, edit in (("with", keep_appearance(["circle"])), ("without", keep_appearance(["circle"], weight=0.0))):
        scene = two_objects(colours={"circle": COLOURS["green"], "square": COLOURS["blue"]})
        scene.guide([[edit]], reference)
        error[name] = cosine(scene.appearance(0, "circle"), COLOURS["red"])
    assert error["with"] > 0.9 and error["without"] < 0.3


@pytest.mark.parametrize("edit", [
    lambda own: move("circle", dx=0.15, dy=-0.1, keep_others=False, keep_own_shape_weight=own),
    lambda own: place("circle", 0.6, 0.35, keep_others=False, keep_own_shape_weight=own),
])
def test_keep_own_shape_carries_the_moved_objects_silhouette_to_the_target(edit):
    """The moved object starts 1.5 times its reference's radii (as a photo move inflates it): with its
    own silhouette held (the reference's, translated to the target), it reaches the target at its
    reference size; without, the centroid pull alone leaves it large."""
    reference = two_objects().traces()
    result = {}
    for name, own in (("with", 6.0), ("without", 0.0)):
        scene = two_objects(circle=blob(0.45, 0.45, 0.12, 0.12))
        scene.guide([[edit(own)]], reference, steps=250)
        result[name] = (scene.centre(0, "circle"), scene.area(0, "circle") / (0.08 * 0.08))
    target = torch.tensor([0.6, 0.35], dtype=torch.float64)
    for name in result:
        torch.testing.assert_close(result[name][0], target, atol=0.03, rtol=0)
    assert result["with"][1] == pytest.approx(1.0, abs=0.25) and result["without"][1] > 1.8


def test_keep_own_shape_is_the_reference_silhouette_copied_to_the_target():
    """A move's or a place's own-shape term is copy_shape of the object's reference silhouette,
    translated by where the object is asked to go: (dx, dy) for a move, and for a place (x, y) less
    the reference centroid (its mean over the layers), at the term's weight."""
    scene = two_objects(circle=blob(0.45, 0.45, 0.12, 0.1), square=blob(0.7, 0.25, 0.06, 0.09))
    reference = two_objects(circle=blob(0.35, 0.55, 0.09, 0.07)).traces()
    words = PromptWords(PROMPT, PROMPT.split(), [[i + 1] for i in range(7)])
    centre = reference[0].view(T).centroid("circle").mean(0)
    assert abs(float(centre[0]) - float(centre[1])) > 0.1  # x and y told apart

    def energy(edit):
        with torch.no_grad():
            return energy_of([[edit]], scene.capture([["circle"]]), [words], [["circle"]], reference, T).item()

    cases = [
        (move, dict(dx=0.15, dy=-0.1), (0.15, -0.1)),
        (place, dict(x=0.6, y=0.3), (0.6 - float(centre[0]), 0.3 - float(centre[1]))),
    ]
    for kind, where, offset in cases:
        held = energy(kind("circle", **where, keep_others=False, keep_own_shape_weight=1.7))
        plain = energy(kind("circle", **where, keep_others=False))
        copied = energy(copy_shape("circle", reference[0], translate=offset, weight=1.7))
        assert copied > 0.01 and held == pytest.approx(plain + copied, rel=1e-9), kind


def test_resize_own_shape_is_the_reference_silhouette_scaled_about_its_centroid():
    """A resize's own-shape term is copy_shape of the object's reference silhouette scaled about its
    centroid by the square root of the asked area ratio, at the term's weight."""
    scene = two_objects(circle=blob(0.45, 0.45, 0.12, 0.1))
    reference = two_objects(circle=blob(0.4, 0.5, 0.09, 0.07)).traces()
    words = PromptWords(PROMPT, PROMPT.split(), [[i + 1] for i in range(7)])

    def energy(edit):
        with torch.no_grad():
            return energy_of([[edit]], scene.capture([["circle"]]), [words], [["circle"]], reference, T).item()

    for scale in (2.0, 0.5):
        held = energy(resize("circle", scale, keep_others=False, keep_own_shape_weight=1.3))
        plain = energy(resize("circle", scale, keep_others=False))
        copied = energy(copy_shape("circle", reference[0], scale=math.sqrt(scale), weight=1.3))
        assert copied > 0.01 and held == pytest.approx(plain + copied, rel=1e-9), scale


def drifted_circle():
    """The two-object scene with the circle drifted by (0.1, -0.08) off its reference place."""
    scene = disturbed(two_objects(), "circle", by=(0.1, -0.08))
    with torch.no_grad():
        scene.params[0]["red"][:2] += torch.tensor([0.1, -0.08], dtype=torch.float64)
    return scene


@pytest.mark.parametrize("scale", [2.0, 0.5])
def test_resize_own_shape_scales_a_drifted_object_in_place(scale):
    """With its own scaled silhouette held (and no size or centroid term), a drifted object goes back
    to its place at the asked area; without it, it stays where it drifted."""
    reference = two_objects().traces()
    result = {}
    for name, own in (("with", 6.0), ("without", 0.0)):
        scene = drifted_circle()
        scene.guide([[resize("circle", scale, weight=0.0 if own else 2.0, keep_others=False, keep_own_shape_weight=own)]],
                    reference, steps=250)
        result[name] = ((scene.centre(0, "circle") - CIRCLE[:2]).norm().item(), scene.area(0, "circle") / (0.08 * 0.08))
    assert result["with"][0] < 0.02 and result["without"][0] > 0.05
    assert result["with"][1] == pytest.approx(scale, rel=0.2)


def silhouette_centroid(params, size, sharpness=10.0):
    """The centroid of a blob's soft silhouette, written out: min-max normalise the map, a sigmoid at
    one half, min-max normalise again, then the mass-weighted mean pixel centre."""
    m = render(params, *size)
    m = (m - m.min()) / (m.max() - m.min())
    s = torch.sigmoid(sharpness * (m - 0.5))
    s = (s - s.min()) / (s.max() - s.min())
    ys = (torch.arange(size[0], dtype=torch.float64) + 0.5) / size[0]
    xs = (torch.arange(size[1], dtype=torch.float64) + 0.5) / size[1]
    return torch.stack([(s * xs[None, :]).sum() / s.sum(), (s * ys[:, None]).sum() / s.sum()])


def test_shape_centroid_is_the_silhouettes_centroid_to_the_target():
    """A move's or a place's shape-centroid term is the smooth L1 distance of the silhouette's centroid
    (per layer, then averaged) from the reference's moved by (dx, dy), or from (x, y), at its weight;
    a resize's own shape-centroid hold the distance from the reference's."""
    from sgfast import edits as edits_module

    now, ref = blob(0.5, 0.4, 0.11, 0.09, 30.0), blob(0.35, 0.55, 0.09, 0.07)
    scene = two_objects(circle=now)
    reference = two_objects(circle=ref).traces()
    words = PromptWords(PROMPT, PROMPT.split(), [[i + 1] for i in range(7)])

    def energy(edit):
        with torch.no_grad():
            return energy_of([[edit]], scene.capture([["circle"]]), [words], [["circle"]], reference, T).item()

    def distance(target_of):
        per_layer = [edits_module._l1(silhouette_centroid(now, size), target_of(silhouette_centroid(ref, size))).sum()
                     for size in LAYERS.values()]
        return torch.stack(per_layer).mean().item()

    # The offset as the edits build it: a float32 (dx, dy), whatever the maps' dtype.
    moved = distance(lambda c: c + torch.tensor([0.15, -0.1]).to(c))
    placed = distance(lambda c: torch.tensor([0.6, 0.3]).to(c))
    assert moved > 0.02 and placed > 0.05
    assert energy(move("circle", dx=0.15, dy=-0.1, keep_others=False, shape_centroid_weight=2.5)) == pytest.approx(
        energy(move("circle", dx=0.15, dy=-0.1, keep_others=False)) + 2.5 * moved, rel=1e-9)
    assert energy(place("circle", 0.6, 0.3, keep_others=False, shape_centroid_weight=2.5)) == pytest.approx(
        energy(place("circle", 0.6, 0.3, keep_others=False)) + 2.5 * placed, rel=1e-9)
    held = distance(lambda c: c)  # a resize's own silhouette centroid, held where it was
    assert held > 0.05
    assert energy(resize("circle", 2.0, keep_others=False, keep_own_shape_centroid_weight=1.5)) == pytest.approx(
        energy(resize("circle", 2.0, keep_others=False)) + 1.5 * held, rel=1e-9)


@pytest.mark.parametrize("edit", [
    lambda: move("circle", dx=0.15, dy=-0.1, weight=0.0, keep_others=False, shape_centroid_weight=4.0),
    lambda: place("circle", 0.6, 0.35, weight=0.0, keep_others=False, shape_centroid_weight=4.0),
])
def test_shape_centroid_alone_carries_the_object_to_the_target(edit):
    reference = two_objects().traces()
    scene = two_objects()
    scene.guide([[edit()]], reference, steps=250)
    torch.testing.assert_close(scene.centre(0, "circle"), torch.tensor([0.6, 0.35], dtype=torch.float64), atol=0.03, rtol=0)


def test_shape_centroid_weight_is_the_models_even_without_keep_others():
    """It is a weight of the move, not a hold: keep_others=False leaves it to the model's settings."""
    from sgfast.settings import GuidanceSettings

    settings = GuidanceSettings(edits={"move": {"shape_centroid_weight": 3.0, "keep_own_shape_weight": 4.0}})
    plain = settings.fill(move("circle", dx=0.2, keep_others=False))
    assert (plain.shape_centroid_weight, plain.keep_own_shape_weight) == (3.0, 0.0)
    assert settings.fill(move("circle", dx=0.2, shape_centroid_weight=0.0)).shape_centroid_weight == 0.0


@pytest.mark.parametrize("edit", [
    lambda own: move("circle", dx=0.15, dy=-0.1, keep_others=False, keep_own_size_weight=own),
    lambda own: place("circle", 0.6, 0.35, keep_others=False, keep_own_size_weight=own),
])
def test_keep_own_size_carries_the_moved_objects_size_to_the_target(edit):
    """The moved object starts 1.5 times its reference's radii: with its own size held (log ratio to
    the reference's), it reaches the target at its reference size; without, it stays large."""
    reference = two_objects().traces()
    result = {}
    for name, own in (("with", 4.0), ("without", 0.0)):
        scene = two_objects(circle=blob(0.45, 0.45, 0.12, 0.12))
        scene.guide([[edit(own)]], reference, steps=250)
        result[name] = (scene.centre(0, "circle"), scene.area(0, "circle") / (0.08 * 0.08))
    target = torch.tensor([0.6, 0.35], dtype=torch.float64)
    for name in result:
        torch.testing.assert_close(result[name][0], target, atol=0.03, rtol=0)
    assert result["with"][1] == pytest.approx(1.0, abs=0.25) and result["without"][1] > 1.8


@pytest.mark.parametrize("scale", [2.0, 0.5])
def test_keep_own_centroid_grows_a_drifted_object_in_place(scale):
    """A resize whose object has drifted off its place: with its own centroid held it goes back while
    it scales; without, it stays near where it drifted to."""
    reference = two_objects().traces()
    result = {}
    for name, own in (("with", 4.0), ("without", 0.0)):
        scene = drifted_circle()
        scene.guide([[resize("circle", scale, keep_others=False, keep_own_centroid_weight=own)]], reference, steps=250)
        result[name] = ((scene.centre(0, "circle") - CIRCLE[:2]).norm().item(), scene.area(0, "circle") / (0.08 * 0.08))
    assert result["with"][0] < 0.02 and result["without"][0] > 0.05  # it drifted 0.13
    for name in result:
        assert result[name][1] == pytest.approx(scale, rel=0.15)


def test_the_own_holds_are_their_terms_at_their_weights():
    """A move's own-size term is the log-size distance of the object to its reference, and a resize's
    own-centroid term the centroid distance, each at its weight, added to the edit's energy."""
    from sgfast import edits as edits_module

    scene = two_objects(circle=blob(0.5, 0.4, 0.11, 0.09))
    reference = two_objects().traces()
    words = PromptWords(PROMPT, PROMPT.split(), [[i + 1] for i in range(7)])
    current, ref = scene.capture([["circle"]]), reference[0].view(T)

    def energy(edit):
        with torch.no_grad():
            return energy_of([[edit]], current, [words], [["circle"]], reference, T).item()

    from sgfast.trace import View
    now = View(["circle"], {layer: m[0] for layer, m in current.maps.items()})
    with torch.no_grad():
        size = edits_module._log_size_distance(now.size("circle"), ref.size("circle")).item()
        centroid = edits_module._l1(now.centroid("circle"), ref.centroid("circle")).sum(-1).mean().item()
    assert size > 0.05 and centroid > 0.05
    assert energy(move("circle", dx=0.1, keep_others=False, keep_own_size_weight=2.5)) == pytest.approx(
        energy(move("circle", dx=0.1, keep_others=False)) + 2.5 * size, rel=1e-9)
    assert energy(resize("circle", 2.0, keep_others=False, keep_own_centroid_weight=1.5)) == pytest.approx(
        energy(resize("circle", 2.0, keep_others=False)) + 1.5 * centroid, rel=1e-9)


@pytest.mark.parametrize("weight", [0.5, 1.0, 3.0])
def test_move_holds_appearance_at_any_keep_weight_above_zero(weight):
    """keep_appearance_weight adds keep_appearance of the moved object and the others at that weight,
    also below 1."""
    scene = two_objects(colours={"circle": COLOURS["green"], "square": COLOURS["oil"]})
    reference = two_objects().traces()
    words = PromptWords(PROMPT, PROMPT.split(), [[i + 1] for i in range(7)])
    others_off = dict(keep_shape_weight=0.0, keep_centroid_weight=0.0, keep_size_weight=0.0)
    selected = move("circle", dx=0.1, keep_appearance_weight=weight, **others_off).needed_words(words)
    assert selected[0] == "circle" and "square" in selected

    def energy(edit):
        with torch.no_grad():
            return energy_of([[edit]], scene.capture([selected]), [words], [selected], reference, T).item()

    held = energy(move("circle", dx=0.1, keep_appearance_weight=weight, **others_off))
    plain = energy(move("circle", dx=0.1, keep_appearance_weight=0.0, **others_off))
    kept = energy(keep_appearance(selected, weight=weight))
    assert kept > 0.01 and held == pytest.approx(plain + kept, rel=1e-9)


def test_keep_own_appearance_holds_the_moved_object_only():
    """With the others' appearance keep off, keep_own_appearance_weight pulls the moved object's drifted
    features back to the reference's and leaves the other object's alone."""
    reference = two_objects().traces()
    read = {}
    for name, own in (("with", 12.0), ("without", 0.0)):
        scene = two_objects(colours={"circle": COLOURS["green"], "square": COLOURS["oil"]})
        scene.guide([[move("circle", dx=0.1, keep_appearance_weight=0.0, keep_own_appearance_weight=own)]], reference)
        read[name] = (cosine(scene.appearance(0, "circle"), COLOURS["red"]), cosine(scene.appearance(0, "square"), COLOURS["blue"]))
    assert read["with"][0] > 0.9 and read["without"][0] < 0.3
    assert read["with"][1] < 0.3 and read["without"][1] < 0.3


def test_move_holds_the_other_objects_appearance():
    reference = two_objects().traces()
    held = {}
    for name, edit in (("with", move("circle", dx=0.1)), ("without", move("circle", dx=0.1, keep_appearance_weight=0.0))):
        scene = two_objects(colours={"circle": COLOURS["red"], "square": COLOURS["green"]})
        scene.guide([[edit]], reference)
        held[name] = cosine(scene.appearance(0, "square"), COLOURS["blue"])
    assert held["with"] > 0.9 and held["without"] < 0.3


# ---- copies from a source -----------------------------------------------------------------------


def source_scene(circle, square, circle_colour="green", square_colour="oil", prompt="a green circle and a big square"):
    """Another generation, recorded as a source: its "circle" and "square" are where and what they are here."""
    words = prompt.split()
    colour_word = words[1]
    blobs = {colour_word: circle, "circle": circle, "big": square, "square": square}
    return Scene([prompt], [blobs], [{"circle": COLOURS[circle_colour], "square": COLOURS[square_colour]}]).traces()[0]


# A long thin source object: where it points shows which way a rotation went.
BAR = blob(0.45, 0.5, 0.13, 0.06, 0.0)
START = blob(0.5, 0.5, 0.1, 0.08, 0.0)


@pytest.mark.parametrize("kwargs, centre, radii, angle", [
    (dict(), (0.45, 0.5), (0.13, 0.06), 0.0),
    (dict(translate=(0.1, -0.08)), (0.55, 0.42), (0.13, 0.06), 0.0),
    (dict(translate=(-0.05, 0.1)), (0.4, 0.6), (0.13, 0.06), 0.0),
    (dict(scale=1.4), (0.45, 0.5), (0.182, 0.084), 0.0),
    (dict(scale=0.7), (0.45, 0.5), (0.091, 0.042), 0.0),
    (dict(rotate=30), (0.45, 0.5), (0.13, 0.06), 30.0),
    (dict(rotate=-30), (0.45, 0.5), (0.13, 0.06), -30.0),
])
def test_copy_shape_takes_the_transformed_source_silhouette(kwargs, centre, radii, angle):
    source = source_scene(BAR, blob(0.7, 0.3))
    scene = Scene([PROMPT], [{"red": START, "circle": START, "blue": SQUARE, "square": SQUARE}])
    scene.guide([[copy_shape("circle", source, **kwargs)]], steps=250)
    torch.testing.assert_close(scene.centre(0, "circle"), torch.tensor(centre, dtype=torch.float64), atol=0.02, rtol=0)
    read = sorted(scene.params[0]["circle"][2:4].detach().exp().tolist(), reverse=True)
    assert read == pytest.approx(list(radii), rel=0.12)
    assert scene.orientation(0, "circle") == pytest.approx(angle, abs=6)


def test_copy_shape_from_a_named_source_word():
    # The source's square stands upright at another place: the circle takes that, not the source's circle.
    source = source_scene(BAR, blob(0.6, 0.45, 0.05, 0.12))
    scene = Scene([PROMPT], [{"red": START, "circle": START, "blue": SQUARE, "square": SQUARE}])
    scene.guide([[copy_shape("circle", source, "square")]], steps=250)
    torch.testing.assert_close(scene.centre(0, "circle"), torch.tensor([0.6, 0.45], dtype=torch.float64), atol=0.02, rtol=0)
    assert abs(scene.orientation(0, "circle")) == pytest.approx(90, abs=6)


@pytest.mark.parametrize("source_word, colour", [(None, "green"), ("circle", "green"), ("square", "oil")])
def test_copy_appearance_from_the_named_source_word(source_word, colour):
    source = source_scene(blob(0.3, 0.3), blob(0.7, 0.7))
    scene = two_objects()
    scene.guide([[copy_appearance("circle", source, source_word)]])
    read = scene.appearance(0, "circle")
    other = "oil" if colour == "green" else "green"  # the source's other object
    assert cosine(read, COLOURS[colour]) > 0.9 and cosine(read, COLOURS[other]) < 0.3


@pytest.mark.parametrize("term", ["keep_appearance_weight", "keep_shape_weight"])
def test_copy_appearance_can_hold_the_other_objects(term):
    """The square drifted (its features to another colour, or its blob off its place) while the circle
    takes the source's colour: with the keep term on, the square comes back to the reference; without,
    it stays where it drifted; the circle takes the source's colour either way."""
    reference = two_objects().traces()
    source = source_scene(blob(0.3, 0.3), blob(0.7, 0.7))
    read = {}
    for name, weight in (("with", 12.0 if term == "keep_appearance_weight" else 6.0), ("without", 0.0)):
        if term == "keep_appearance_weight":
            scene = two_objects(colours={"circle": COLOURS["red"], "square": COLOURS["oil"]})
        else:
            scene = disturbed(two_objects(), "square")
        scene.guide([[copy_appearance("circle", source, **{term: weight})]], reference)
        held = (cosine(scene.appearance(0, "square"), COLOURS["blue"]) if term == "keep_appearance_weight"
                else (scene.centre(0, "square") - SQUARE[:2]).norm().item())
        read[name] = (cosine(scene.appearance(0, "circle"), COLOURS["green"]), held)
    assert read["with"][0] > 0.9 and read["without"][0] > 0.9
    if term == "keep_appearance_weight":
        assert read["with"][1] > 0.9 and read["without"][1] < 0.3
    else:
        assert read["with"][1] < 0.02 and read["without"][1] > 0.08


def test_copy_appearance_keep_terms_are_the_other_objects_keep_energies():
    """Its energy is the plain copy's plus keep_appearance's and keep_shape's over the other objects'
    nouns (not their colour words, not the copied object's own phrase), each at its weight; with both
    weights 0 it reads only its own word and no reference."""
    source = source_scene(blob(0.3, 0.3), blob(0.7, 0.7))
    scene = two_objects(colours={"circle": COLOURS["red"], "square": COLOURS["oil"]})
    reference = two_objects(circle=blob(0.4, 0.5), square=blob(0.66, 0.7, 0.09, 0.05)).traces()
    words = PromptWords(PROMPT, PROMPT.split(), [[i + 1] for i in range(7)])
    held = ["square"]

    def energy(edit, selected):
        with torch.no_grad():
            return energy_of([[edit]], scene.capture([selected]), [words], [selected], reference, T).item()

    edit = copy_appearance("circle", source, weight=2.0, keep_appearance_weight=0.7, keep_shape_weight=1.3)
    assert edit.needed_words(words) == ["circle"] + held and edit.needs_reference and edit.needs_features
    parts = (energy(copy_appearance("circle", source, weight=2.0), ["circle"]) + energy(keep_appearance(held, weight=0.7), held)
             + energy(keep_shape(held, weight=1.3), held))
    assert energy(edit, ["circle"] + held) == pytest.approx(parts, rel=1e-9)
    assert energy(keep_shape(held, weight=1.3), held) > 0.01 and energy(keep_appearance(held, weight=0.7), held) > 0.01
    plain = copy_appearance("circle", source)
    assert plain.needed_words(words) == ["circle"] and not plain.needs_reference
    assert (plain.keep_appearance_weight, plain.keep_shape_weight, plain.unset) == (0.0, 0.0, ("keep_appearance_weight", "keep_shape_weight"))
    assert copy_appearance("circle", source, keep_shape_weight=0.5).unset == ("keep_appearance_weight",)
    long = "the big red circle with a small blue square on green grass, and a tree"
    long_words = PromptWords(long, long.replace(",", " ,").split(), [[i + 1] for i in range(len(long.replace(",", " ,").split()))])
    assert copy_appearance("circle", source, keep_shape_weight=1.0).needed_words(long_words) == ["circle", "square", "grass", "tree"]
    assert copy_appearance("big", source, keep_appearance_weight=1.0).needed_words(long_words) == ["big", "square", "grass", "tree"]
    for bad in ({"keep_shape_weight": -1.0}, {"keep_appearance_weight": float("nan")}):
        with pytest.raises(ValueError, match=rf"^{next(iter(bad))} must be a finite number >= 0, got "):
            copy_appearance("circle", source, **bad)


def test_copy_layout_takes_every_shared_objects_place():
    circle, square = blob(0.3, 0.6), blob(0.62, 0.56, 0.07, 0.07)
    source = source_scene(circle, square, prompt="a red circle and a blue square")
    scene = two_objects()
    scene.guide([[copy_layout(source)]], steps=250)
    torch.testing.assert_close(scene.centre(0, "circle"), circle[:2], atol=0.02, rtol=0)
    torch.testing.assert_close(scene.centre(0, "square"), square[:2], atol=0.02, rtol=0)


def test_collage_takes_each_object_from_its_own_source():
    first = source_scene(blob(0.32, 0.62), blob(0.8, 0.2), circle_colour="green", square_colour="red")
    second = source_scene(blob(0.2, 0.2), blob(0.64, 0.56, 0.07, 0.07), circle_colour="red", square_colour="oil")
    scene = two_objects()
    scene.guide([[collage([(first, ["circle"]), (second, ["square"])])]], steps=250)
    torch.testing.assert_close(scene.centre(0, "circle"), torch.tensor([0.32, 0.62], dtype=torch.float64), atol=0.02, rtol=0)
    torch.testing.assert_close(scene.centre(0, "square"), torch.tensor([0.64, 0.56], dtype=torch.float64), atol=0.02, rtol=0)
    assert cosine(scene.appearance(0, "circle"), COLOURS["green"]) > 0.9
    assert cosine(scene.appearance(0, "square"), COLOURS["oil"]) > 0.9


# ---- restyle --------------------------------------------------------------------------------------

STYLED = "a red circle painting"
BACKDROP = blob(0.5, 0.5, 0.3, 0.3)  # "painting" attends to the whole picture


def styled_scene(circle=CIRCLE, backdrop_colour="red"):
    blobs = {"red": circle, "circle": circle, "painting": BACKDROP}
    scene = Scene([STYLED], [blobs], [{"painting": COLOURS["blue"], "circle": COLOURS[backdrop_colour]}])
    return scene


def test_restyle_takes_the_style_words_appearance_and_holds_the_layout():
    source = Scene([STYLED], [{"red": blob(0.3, 0.3), "circle": blob(0.3, 0.3), "painting": BACKDROP}],
                   [{"painting": COLOURS["oil"]}]).traces()[0]
    reference = styled_scene().traces()
    moved = blob(0.53, 0.4)  # the circle drifted off its reference place
    results = {}
    for name, edit in (("on", restyle(source, ["painting"])), ("off", restyle(source, ["painting"], weight=0.0, keep_shape_weight=0.0))):
        scene = styled_scene(circle=moved)
        scene.guide([[edit]], reference)
        results[name] = (cosine(scene.appearance(0, "painting"), COLOURS["oil"]), (scene.centre(0, "circle") - CIRCLE[:2]).norm().item())
    assert results["on"][0] > 0.8 and results["off"][0] < 0.3
    assert results["on"][1] < 0.02 and results["off"][1] > 0.08


# ---- every batch item gets its own edit -----------------------------------------------------------


def test_each_batch_item_gets_its_own_edit():
    prompts = [PROMPT, "a blue square and a red circle"]
    scene = Scene(prompts, [{"red": CIRCLE, "circle": CIRCLE, "blue": SQUARE, "square": SQUARE}] * 2,
                  [{"circle": COLOURS["red"], "square": COLOURS["blue"]}] * 2)
    reference = scene.traces()
    source = source_scene(blob(0.3, 0.3), blob(0.7, 0.7))
    edits = [[move("circle", dx=0.15, keep_appearance_weight=0.0)],
             [move("square", dy=-0.2, keep_appearance_weight=0.0), copy_appearance("circle", source, "square")]]
    scene.guide(edits, reference)
    shift = lambda b, word, start: (scene.centre(b, word) - start[:2]).tolist()
    assert shift(0, "circle", CIRCLE) == pytest.approx([0.15, 0.0], abs=0.02)
    assert shift(0, "square", SQUARE) == pytest.approx([0.0, 0.0], abs=0.02)
    assert shift(1, "square", SQUARE) == pytest.approx([0.0, -0.2], abs=0.02)
    assert shift(1, "circle", CIRCLE) == pytest.approx([0.0, 0.0], abs=0.02)
    assert cosine(scene.appearance(1, "circle"), COLOURS["oil"]) > 0.9
    assert cosine(scene.appearance(0, "circle"), COLOURS["red"]) > 0.9


# ---- energy values: the formula, written out --------------------------------------------------------


def smooth_l1(gap, beta=0.02):
    gap = abs(gap)
    return 0.5 * gap * gap / beta if gap < beta else gap - 0.5 * beta


def test_distances_are_taken_in_the_current_propertys_dtype():
    # A float64 target (a float64 trace) beside a float32 property: the energy stays float32, its
    # values the written-out formula's on the float32-rounded target; resampled targets too.
    from sgfast.edits import _l1, _resampled

    g = torch.Generator().manual_seed(5)
    current = torch.rand(5, 7, generator=g)
    target = torch.rand(5, 7, generator=g, dtype=torch.float64) * 0.05
    got = _l1(current, target)
    assert got.dtype == torch.float32
    want = [[smooth_l1(float(c) - float(t)) for c, t in zip(cr, tr)] for cr, tr in zip(current, target.float())]
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-6, atol=1e-7)
    resampled = _resampled(torch.rand(9, 11, generator=g, dtype=torch.float64), current)
    assert resampled.dtype == torch.float32 and resampled.shape == (5, 7)


def loop_centroid(m):
    height, width = m.shape
    mass = float(m.sum())
    x = sum(float(m[i, j]) * (j + 0.5) / width for i in range(height) for j in range(width)) / mass
    y = sum(float(m[i, j]) * (i + 0.5) / height for i in range(height) for j in range(width)) / mass
    return x, y


def loop_size(m, sharpness=10.0):
    values = [float(v) for v in m.flatten()]
    low, high = min(values), max(values)
    soft = [1 / (1 + math.exp(-sharpness * ((v - low) / (high - low) - 0.5))) for v in values]
    low, high = min(soft), max(soft)
    return sum((v - low) / (high - low) for v in soft) / len(soft)


def random_views():
    """A current and a reference View of "circle" and "square" with random maps at three layers."""
    g = torch.Generator().manual_seed(7)
    words = ["circle", "square"]
    sizes = {"a": (5, 7), "b": (8, 8), "c": (3, 4)}  # three layers: a mean over layers differs from a sum over two
    make = lambda: {k: torch.rand(2, *hw, generator=g, dtype=torch.float64) for k, hw in sizes.items()}  # noqa: E731
    from sgfast.trace import View

    return View(words, make()), View(words, make())


@pytest.mark.parametrize("edit, expected", [
    (move("circle", dx=0.3, dy=-0.1, keep_others=False, weight=2.5),
     lambda c, r: 2.5 * sum(smooth_l1(loop_centroid(c[l])[0] - loop_centroid(r[l])[0] - 0.3)
                            + smooth_l1(loop_centroid(c[l])[1] - loop_centroid(r[l])[1] + 0.1) for l in c) / len(c)),
    (place("circle", 0.2, 0.9, keep_others=False, weight=3.0),
     lambda c, r: 3.0 * sum(smooth_l1(loop_centroid(c[l])[0] - 0.2) + smooth_l1(loop_centroid(c[l])[1] - 0.9) for l in c) / len(c)),
    (resize("circle", 1.7, keep_others=False, weight=1.5),
     # sizes compared as log ratios (floored at 1e-4 of the image)
     lambda c, r: 1.5 * sum(smooth_l1(math.log(max(loop_size(c[l]), 1e-4)) - math.log(1.7 * max(loop_size(r[l]), 1e-4)))
                            for l in c) / len(c)),
])
def test_energy_is_the_mean_over_layers_of_the_l1_distance(edit, expected):
    current, reference = random_views()
    value = edit.energy(current.subset(["circle"]), reference, T).item()
    circle = lambda view: {layer: m[0] for layer, m in view.maps.items()}  # noqa: E731
    assert value == pytest.approx(expected(circle(current), circle(reference)), rel=1e-6)  # targets built in float32


def test_an_edit_on_target_has_zero_energy():
    # Sources and references equal to the current generation: nothing to do, energy 0.
    scene = two_objects(prompts=["a red circle and a blue square painting"])
    scene.params[0]["painting"] = BACKDROP.clone()
    trace = scene.traces()[0]
    edits = [copy_layout(trace), collage([(trace, ["circle", "square"])]), restyle(trace, ["painting"]),
             keep_shape(), keep_appearance(), copy_shape("circle", trace), copy_appearance("circle", trace),
             move("circle"), resize("circle", 1.0), place("circle", *trace.view(T).centroid("circle").mean(0).tolist())]
    for edit in edits:
        words, _ = edit_selection([[edit]], scene.words, "cpu")
        with torch.no_grad():
            energy = energy_of([[edit]], scene.capture(words), scene.words, words, [trace], T)
        assert float(energy) == pytest.approx(0.0, abs=1e-3), type(edit).__name__


def test_restyle_without_layout_reads_only_the_style_words():
    source = styled_scene().traces()[0]
    words = PromptWords(STYLED, STYLED.split(), [[i + 1] for i in range(4)])
    assert restyle(source, ["painting"], keep_layout=False).needed_words(words) == ["painting"]
    assert restyle(source, ["painting"]).needed_words(words) == ["painting", "red", "circle"]


def test_edits_that_cannot_apply_say_why():
    source = two_objects().traces()[0]
    words = PromptWords("a green triangle", ["a", "green", "triangle"], [[1], [2], [3]])
    with pytest.raises(ValueError, match="copy_layout: the prompt 'a green triangle' and the source 'a red circle and a blue square' share no object word"):
        copy_layout(source).validate(words)
    with pytest.raises(ValueError, match=r"^collage needs at least one \(source, words\) part$"):
        collage([])
    with pytest.raises(ValueError, match=r"^word 'zebra' is not in the source prompt 'a red circle and a blue square'"):
        copy_layout(source, ["circle", "zebra"])


def test_chosen_words_are_the_ones_held_or_copied():
    source = two_objects().traces()[0]
    words = PromptWords(PROMPT, PROMPT.split(), [[i + 1] for i in range(7)])
    assert keep_shape(["Square "]).needed_words(words) == ["square"]
    assert keep_shape().needed_words(words) == ["red", "circle", "blue", "square"]
    assert copy_layout(source, ["circle"]).needed_words(words) == ["circle"]
    assert copy_layout(source).needed_words(words) == ["red", "circle", "blue", "square"]


@pytest.mark.parametrize("build, message", [
    (lambda s: copy_shape("circle", s, translate=(1.5, 0.0)), r"^translate x must be in \[-1.0, 1.0\], got 1.5$"),
    (lambda s: copy_shape("circle", s, translate=(-1.5, 0.0)), r"^translate x must be in \[-1.0, 1.0\], got -1.5$"),
    (lambda s: copy_shape("circle", s, translate=(0.0, 1.5)), r"^translate y must be in \[-1.0, 1.0\], got 1.5$"),
    (lambda s: copy_shape("circle", s, translate=(0.0, -1.5)), r"^translate y must be in \[-1.0, 1.0\], got -1.5$"),
    (lambda s: copy_shape("circle", s, scale=0.0), r"^scale must be a finite number > 0, got 0.0$"),
    (lambda s: copy_shape("circle", s, scale=float("inf")), r"^scale must be a finite number > 0, got inf$"),
])
def test_bad_copy_shape_arguments(build, message):
    with pytest.raises(ValueError, match=message):
        build(two_objects().traces()[0])
    build_ok = copy_shape("circle", two_objects().traces()[0], translate=(-1.0, 1.0), scale=1e-3)
    assert build_ok.translate == (-1.0, 1.0)


# ---- arguments: bounds (inclusive), types and the messages that name them ------------------------


@pytest.mark.parametrize("build, message", [
    (lambda: move("circle", dx=1.01), r"^dx must be in \[-1.0, 1.0\], got 1.01$"),
    (lambda: move("circle", dx=-1.01), r"^dx must be in \[-1.0, 1.0\], got -1.01$"),
    (lambda: move("circle", dy=1.01), r"^dy must be in \[-1.0, 1.0\], got 1.01$"),
    (lambda: move("circle", dy=-1.01), r"^dy must be in \[-1.0, 1.0\], got -1.01$"),
    (lambda: move("circle", dx="0.1"), r"^dx must be in \[-1.0, 1.0\], got '0.1'$"),
    (lambda: move("circle", dy=float("nan")), r"^dy must be in \[-1.0, 1.0\], got nan$"),
    (lambda: place("circle", x=-0.01), r"^x must be in \[0.0, 1.0\], got -0.01$"),
    (lambda: place("circle", x=1.01), r"^x must be in \[0.0, 1.0\], got 1.01$"),
    (lambda: place("circle", y=-0.01), r"^y must be in \[0.0, 1.0\], got -0.01$"),
    (lambda: place("circle", y=1.01), r"^y must be in \[0.0, 1.0\], got 1.01$"),
    (lambda: resize("circle", 0.0), r"^scale must be a finite number > 0, got 0.0$"),
    (lambda: resize("circle", float("inf")), r"^scale must be a finite number > 0, got inf$"),
    (lambda: resize("circle", "2"), r"^scale must be a finite number > 0, got '2'$"),
    (lambda: move("circle", weight=-0.5), r"^weight must be a finite number >= 0, got -0.5$"),
    (lambda: move("circle", weight=float("inf")), r"^weight must be a finite number >= 0, got inf$"),
    (lambda: move("circle", weight="1"), r"^weight must be a finite number >= 0, got '1'$"),
    (lambda: move("circle", keep_shape_weight=-1.0), r"^keep_shape_weight must be a finite number >= 0, got -1.0$"),
    (lambda: place("circle", keep_appearance_weight=-1.0), r"^keep_appearance_weight must be a finite number >= 0, got -1.0$"),
    (lambda: move("circle", keep_own_shape_weight=-1.0), r"^keep_own_shape_weight must be a finite number >= 0, got -1.0$"),
    (lambda: place("circle", keep_own_appearance_weight=float("nan")), r"^keep_own_appearance_weight must be a finite number >= 0, got nan$"),
    (lambda: move("circle", keep_own_appearance_weight="2"), r"^keep_own_appearance_weight must be a finite number >= 0, got '2'$"),
    (lambda: resize("circle", 2.0, keep_centroid_weight=-1.0), r"^keep_centroid_weight must be a finite number >= 0, got -1.0$"),
    (lambda: resize("circle", 2.0, keep_own_shape_weight=-2.0), r"^keep_own_shape_weight must be a finite number >= 0, got -2.0$"),
    (lambda: resize("circle", 2.0, keep_own_shape_weight="4"), r"^keep_own_shape_weight must be a finite number >= 0, got '4'$"),
    (lambda: move("circle", shape_centroid_weight=-1.0), r"^shape_centroid_weight must be a finite number >= 0, got -1.0$"),
    (lambda: resize("circle", 2.0, keep_own_shape_centroid_weight=-3.0), r"^keep_own_shape_centroid_weight must be a finite number >= 0, got -3.0$"),
    (lambda: place("circle", shape_centroid_weight=float("inf")), r"^shape_centroid_weight must be a finite number >= 0, got inf$"),
    (lambda: keep_shape(weight=-1.0), r"^weight must be a finite number >= 0, got -1.0$"),
    (lambda: keep_appearance(weight=-1.0), r"^weight must be a finite number >= 0, got -1.0$"),
])
def test_bad_object_edit_arguments(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_edge_arguments_are_accepted():
    for dx, dy in [(-1.0, 1.0), (1.0, -1.0), (1, 0)]:
        assert (move("circle", dx=dx, dy=dy).dx, move("circle", dx=dx, dy=dy).dy) == (dx, dy)
    for x, y in [(0.0, 1.0), (1.0, 0.0), (0, 1)]:
        assert (place("circle", x, y).x, place("circle", x, y).y) == (x, y)
    assert resize("circle", 1e-6).scale == 1e-6 and resize("circle", 3).scale == 3
    zero = move(" Circle ", weight=0.0, keep_shape_weight=0, keep_appearance_weight=0.0, keep_centroid_weight=0.0)
    assert (zero.word, zero.weight, zero.keep_shape_weight, zero.needs_features) == ("circle", 0.0, 0, False)
    assert keep_shape(weight=0.0).weight == 0.0 and keep_appearance(weight=0).weight == 0


# ---- a source or reference traced at another resolution ----------------------------------------


def loop_shape(m, sharpness=10.0):
    """Soft silhouette, written out: sigmoid at half of the min-max normalised map, renormalised."""
    values = [[float(v) for v in row] for row in m]
    flat = [v for row in values for v in row]
    low, high = min(flat), max(flat)
    soft = [[1 / (1 + math.exp(-sharpness * ((v - low) / (high - low) - 0.5))) for v in row] for row in values]
    flat = [v for row in soft for v in row]
    low, high = min(flat), max(flat)
    return [[(v - low) / (high - low) for v in row] for row in soft]


def test_a_target_at_another_resolution_is_resampled_onto_the_current_grid():
    from sgfast.trace import View

    g = torch.Generator().manual_seed(11)
    current = View(["circle"], {"a": torch.rand(1, 5, 7, generator=g, dtype=torch.float64),
                                "b": torch.rand(1, 9, 11, generator=g, dtype=torch.float64)})
    reference = View(["circle"], {"a": torch.rand(1, 5, 7, generator=g, dtype=torch.float64),
                                  "b": torch.rand(1, 3, 4, generator=g, dtype=torch.float64)})
    expected = 0.0
    for layer in ("a", "b"):
        mine = loop_shape(current.maps[layer][0])
        height, width = len(mine), len(mine[0])
        target = loop_bilinear(loop_shape(reference.maps[layer][0]), height, width)
        expected += sum(smooth_l1(mine[i][j] - target[i][j]) for i in range(height) for j in range(width)) / (height * width) / 2
    assert keep_shape(["circle"], weight=1.5).energy(current, reference, T).item() == pytest.approx(1.5 * expected, rel=1e-9)


# ---- the keep terms of move and resize, written out ----------------------------------------------


def test_keep_terms_are_the_held_objects_shape_and_centroid_distances():
    current, reference = random_views()
    layers = list(current.maps)
    maps = lambda view, slot: [view.maps[l][slot] for l in layers]  # noqa: E731
    centroid_gap = lambda slot: sum(  # noqa: E731
        smooth_l1(loop_centroid(c)[0] - loop_centroid(r)[0]) + smooth_l1(loop_centroid(c)[1] - loop_centroid(r)[1])
        for c, r in zip(maps(current, slot), maps(reference, slot))) / len(layers)

    def shape_gap(slot):
        total = 0.0
        for c, r in zip(maps(current, slot), maps(reference, slot)):
            mine, theirs = loop_shape(c), loop_shape(r)
            total += sum(smooth_l1(a - b) for row_a, row_b in zip(mine, theirs) for a, b in zip(row_a, row_b)) / c.numel()
        return total / len(layers)

    move_term = sum(smooth_l1(loop_centroid(c)[0] - loop_centroid(r)[0] - 0.1) + smooth_l1(loop_centroid(c)[1] - loop_centroid(r)[1])
                    for c, r in zip(maps(current, 0), maps(reference, 0))) / len(layers)
    edit = move("circle", dx=0.1, weight=2.0, keep_shape_weight=1.5, keep_appearance_weight=0.0, keep_centroid_weight=0.7)
    assert edit.energy(current, reference, T).item() == pytest.approx(2.0 * move_term + 1.5 * shape_gap(1) + 0.7 * centroid_gap(1), rel=1e-6)
    # resize holds the others' centroids at keep_centroid_weight and its own at keep_own_centroid_weight
    size_term = sum(smooth_l1(math.log(max(loop_size(c), 1e-4)) - math.log(1.3 * max(loop_size(r), 1e-4)))
                    for c, r in zip(maps(current, 0), maps(reference, 0))) / len(layers)
    edit = resize("circle", 1.3, weight=1.0, keep_shape_weight=0.0, keep_appearance_weight=0.0, keep_centroid_weight=0.9)
    assert edit.energy(current, reference, T).item() == pytest.approx(size_term + 0.9 * centroid_gap(1), rel=1e-6)
    edit = resize("circle", 1.3, weight=1.0, keep_shape_weight=0.0, keep_appearance_weight=0.0, keep_centroid_weight=0.9,
                  keep_own_centroid_weight=2.5)
    assert edit.energy(current, reference, T).item() == pytest.approx(size_term + 2.5 * centroid_gap(0) + 0.9 * centroid_gap(1), rel=1e-6)
    alone = resize("circle", 1.3, weight=1.0, keep_others=False, keep_centroid_weight=0.9)
    assert alone.energy(current.subset(["circle"]), reference, T).item() == pytest.approx(size_term, rel=1e-6)
    named = resize("circle", 1.3, weight=1.0, keep_others=False, keep_own_centroid_weight=2.5)
    assert named.energy(current.subset(["circle"]), reference, T).item() == pytest.approx(size_term + 2.5 * centroid_gap(0), rel=1e-6)
    # a move's own size, at its weight: the log-size distance of the moved object to its reference
    own_size = sum(smooth_l1(math.log(max(loop_size(c), 1e-4)) - math.log(max(loop_size(r), 1e-4)))
                   for c, r in zip(maps(current, 0), maps(reference, 0))) / len(layers)
    edit = move("circle", dx=0.1, weight=2.0, keep_others=False, keep_own_size_weight=1.7)
    assert edit.energy(current.subset(["circle"]), reference, T).item() == pytest.approx(2.0 * move_term + 1.7 * own_size, rel=1e-6)


def test_default_weights_and_held_words():
    for edit, weight in [(move("circle"), 4.0), (place("circle"), 4.0), (resize("circle", 2.0), 2.0)]:
        assert (edit.weight, edit.keep_shape_weight, edit.keep_appearance_weight, edit.keep_centroid_weight) == (weight, 6.0, 12.0, 0.0)
        own = ("keep_own_shape_weight", "keep_own_size_weight", "keep_own_appearance_weight", "shape_centroid_weight") if not isinstance(
            edit, resize) else ("keep_own_centroid_weight", "keep_own_shape_weight", "keep_own_shape_centroid_weight")
        assert edit.unset == ("weight", "keep_shape_weight", "keep_appearance_weight", "keep_centroid_weight", "keep_size_weight") + own
        assert all(getattr(edit, name) == 0.0 for name in own)
        assert edit.needs_features and edit.needs_reference
    assert move("circle", weight=1.0, keep_centroid_weight=2.0, keep_size_weight=0.0, keep_own_shape_weight=0.0,
                keep_own_size_weight=0.0, keep_own_appearance_weight=0.0, shape_centroid_weight=0.0).unset == (
        "keep_shape_weight", "keep_appearance_weight")
    assert not move("circle", keep_appearance_weight=0.0).needs_features
    assert move("circle", keep_appearance_weight=0.0, keep_own_appearance_weight=0.5).needs_features
    assert place("circle", keep_others=False, keep_own_appearance_weight=0.5).needs_features
    assert not move("circle", keep_others=False).needs_features
    assert move("circle", keep_appearance_weight=0.5).needs_features
    assert (keep_shape().weight, keep_appearance().weight) == (6.0, 12.0)
    words = PromptWords(PROMPT, PROMPT.split(), [[i + 1] for i in range(7)])
    assert move("Circle ").needed_words(words) == ["circle", "blue", "square"]
    assert move("circle", keep=[" Square", "CIRCLE", "red"]).needed_words(words) == ["circle", "square", "red"]
    assert move("circle", keep_others=False, keep=["square"]).needed_words(words) == ["circle"]
    long = "the big red circle with a small blue square on green grass"
    words = PromptWords(long, long.split(), [[i + 1] for i in range(len(long.split()))])
    assert resize("circle", 2.0).needed_words(words) == ["circle", "small", "blue", "square", "green", "grass"]
    assert resize("big", 2.0).needed_words(words) == ["big", "small", "blue", "square", "green", "grass"]
    assert place("grass").needed_words(words) == ["grass", "big", "red", "circle", "small", "blue", "square"]
    bare = "red circle and blue square"  # phrases that reach the prompt's first and last words
    bare_words = PromptWords(bare, bare.split(), [[i + 1] for i in range(5)])
    assert move("circle").needed_words(bare_words) == ["circle", "blue", "square"]
    assert move("red").needed_words(bare_words) == ["red", "blue", "square"]
    assert resize("blue", 2.0).needed_words(bare_words) == ["blue", "red", "circle"]
    with pytest.raises(ValueError, match=r"^KeepShape names no word of the prompt 'the big red circle with a small blue square on "
                       r"green grass' \(its words: \['the', 'big', .*, 'grass'\]\); name the words it should act on$"):
        keep_shape([]).validate(words)


def test_copy_layout_and_restyle_check_their_words_and_what_they_read():
    source = two_objects().traces()[0]
    words = PromptWords(PROMPT, PROMPT.split(), [[i + 1] for i in range(7)])
    copy_layout(source).validate(words)  # the shared words are the prompt's: nothing to say
    copy_layout(source, ["circle", "square"]).validate(words)
    other = PromptWords("a red circle", ["a", "red", "circle"], [[1], [2], [3]])
    with pytest.raises(ValueError, match=r"'square' is not in the prompt"):
        copy_layout(source, ["circle", "square"]).validate(other)
    styled = styled_scene().traces()[0]
    assert restyle(styled, ["painting"]).needs_reference is True
    assert restyle(styled, ["painting"], keep_layout=False).needs_reference is False
