"""Edits: each one an L1 energy on properties of the current generation, to be minimised.

An edit compares the current step's properties (a `View`) with a target taken from the reference
trace (the same prompt and seed, unedited) or from a source trace (another generation or a real
image). Edits compose by summation. Each checks its arguments when built and its words against the
prompt before sampling starts, so a bad edit fails before anything runs.

Default weights follow the public ports' relative scales (centroid 4, size 2, shape 6, appearance
12); a model's settings file may set others for the weights an edit leaves unset (`sgfast.settings`).
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from sgfast.properties import transform_shape

CENTROID_WEIGHT = 4.0
SIZE_WEIGHT = 2.0
SHAPE_WEIGHT = 6.0
APPEARANCE_WEIGHT = 12.0

# Words that name no object: a move or resize does not hold their layout unless asked to.
STOP_WORDS = frozenset("a an the and of with on in at to its is are , . ; : ! ?".split())


def _check_weight(weight, name="weight"):
    if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {weight!r}")


def _check_weights(edit, *names):
    """Each of the edit's weights `names`, named in the error when one is bad."""
    for name in names:
        _check_weight(getattr(edit, name), name)


def _check_unit(name, value, low, high):
    if not (isinstance(value, (int, float)) and math.isfinite(value) and low <= value <= high):
        raise ValueError(f"{name} must be in [{low}, {high}], got {value!r}")


# Energies are L1 distances made quadratic within L1_SMOOTHING of the target (smooth L1). A property
# already on target (a held object when a move starts, the y of a horizontal move) then pulls with a
# gradient that vanishes there, not with the L1 subgradient's full-size push of random sign (the sign
# of float noise), which on the built-in model drowned the edit's own gradient.
L1_SMOOTHING = 0.02


def _l1(current, target):
    """Elementwise smooth L1 distance (broadcast like `current - target`)."""
    distance = (current - target.to(current)).abs()
    return torch.where(distance < L1_SMOOTHING, 0.5 * distance * distance / L1_SMOOTHING, distance - 0.5 * L1_SMOOTHING)


def _resampled(target, current):
    """`target` ([H, W]) on `current`'s grid: a source traced at another resolution has other grids."""
    if target.shape == current.shape:
        return target
    return F.interpolate(target[None, None].to(current), size=current.shape[-2:], mode="bilinear", align_corners=False)[0, 0]


def _shape_distance(current, target):
    """Mean over layers of the mean distance of silhouettes."""
    return torch.stack([_l1(c, _resampled(t, c)).mean() for c, t in zip(current, target)]).mean()


def _appearance_distance(current, target):
    """Mean distance of two appearance vectors (features are model-specific: so is the weight)."""
    return _l1(current, target).mean()


def content_words(words):
    return [w for w in words if w not in STOP_WORDS]


def phrase_heads(words):
    """The last word of each run of content words: each object phrase's noun ("square" of "a blue
    square"), without its attributes."""
    heads = [w for i, w in enumerate(words) if w not in STOP_WORDS and (i + 1 == len(words) or words[i + 1] in STOP_WORDS)]
    return list(dict.fromkeys(heads))


def phrase_of(words, word):
    """The run of content words around `word`'s first occurrence: the words that describe the same
    object ("red circle" for "circle" in "a red circle and a blue square")."""
    if word not in words:
        return [word]  # `Edit.validate` names the prompt's words
    start = end = words.index(word)
    while start > 0 and words[start - 1] not in STOP_WORDS:
        start -= 1
    while end + 1 < len(words) and words[end + 1] not in STOP_WORDS:
        end += 1
    return words[start : end + 1]


@dataclass
class Term:
    """One term of an edit's energy, for the batched energies (`sgfast.energies`): the L1 distance of
    a property (`kind`: "centroid", "shape_centroid" (the silhouette's), "size" (log size), "shape" or
    "appearance") of `word` in the
    current pass from a target, times `weight`, averaged as `Edit.energy` averages it. The target is
    the same property of `source_word` (default `word`) in `source` (a Trace; None: the unedited
    reference of this generation), moved by `offset` (centroids), scaled by `scale` (size), moved by
    `transform` (transform_shape's arguments) or to `place` (a place's own silhouette), or `const`."""

    kind: str
    word: str
    weight: float
    source: object = None
    source_word: str = None
    offset: tuple = None
    scale: float = 1.0
    transform: dict = None
    place: tuple = None
    const: tuple = None


class Edit:
    """Base class. `needed_words(prompt_words)`: the words whose maps the current pass must record;
    `energy(current, reference, timestep)`: a scalar tensor (the per-layer reference formulation);
    `terms(words)`: the same energy as Terms, `words` being those `current.words` would show."""

    needs_reference = False  # reads the unedited reference trace of this generation
    needs_features = False  # reads appearance features of the current pass

    def needed_words(self, prompt_words):
        raise NotImplementedError

    def validate(self, prompt_words):
        """Raise a clear error when the edit does not fit the prompt."""
        words = self.needed_words(prompt_words)
        if not words:
            raise ValueError(
                f"{type(self).__name__} names no word of the prompt {prompt_words.prompt!r} (its words: {prompt_words.words}); "
                "name the words it should act on"
            )
        for word in words:
            prompt_words.index(word)

    def energy(self, current, reference, timestep):
        raise NotImplementedError

    def terms(self, words):
        raise NotImplementedError


@dataclass
class _KeepOthers(Edit):
    """An object edit that holds, by default, the shapes of the prompt's other objects and the
    appearance of every object to the reference, as the paper does for move and resize. The other
    objects are the content words outside the edited word's phrase (see `phrase_of`)."""

    keep_others: bool = field(default=True, kw_only=True)
    keep: list = field(default=None, kw_only=True)  # words to hold; default: the other objects' words
    # Weights left None take the model's settings (`sgfast.settings`), else these library defaults.
    keep_shape_weight: float = field(default=None, kw_only=True)
    keep_appearance_weight: float = field(default=None, kw_only=True)
    # Holding the other objects' centroids too (off by default, as in the paper): on a model whose maps
    # are too peaked for silhouettes to hold anything, positions still do.
    keep_centroid_weight: float = field(default=None, kw_only=True)
    # Holding the other objects' sizes too (off by default): a silhouette held on average can still
    # give its area away to an object that grows next to it (see `_log_size_distance`).
    keep_size_weight: float = field(default=None, kw_only=True)

    needs_reference = True
    model_defaults = {"weight": None, "keep_shape_weight": SHAPE_WEIGHT, "keep_appearance_weight": APPEARANCE_WEIGHT,
                      "keep_centroid_weight": 0.0, "keep_size_weight": 0.0}
    default_weight = None  # the edit's own weight (the subclass's)

    own_holds = ()  # the subclass's weights that hold the edited object itself (see `_Moving`, `Resize`)

    def __post_init__(self):
        # Remember which weights the caller left to the model, then fill in the library's. Without
        # keep_others, the object's own holds the caller did not name are off, not the model's.
        self.unset = tuple(name for name in self.model_defaults if getattr(self, name) is None)
        if not self.keep_others:
            for name in self.own_holds:
                if name in self.unset:
                    setattr(self, name, 0.0)
            self.unset = tuple(name for name in self.unset if name not in self.own_holds)
        for name in self.unset:
            setattr(self, name, self.default_weight if name == "weight" else self.model_defaults[name])
        _check_weights(self, "weight", "keep_shape_weight", "keep_appearance_weight", "keep_centroid_weight",
                       "keep_size_weight")
        self.word = self.word.strip().lower()
        self.needs_features = self.keep_others and self.keep_appearance_weight > 0
        self.check_own()

    def check_own(self):
        """Subclasses with weights of their own check them and set `needs_features` here."""

    def _held(self, prompt_words):
        if not self.keep_others:
            return []
        if self.keep is not None:
            return [w.strip().lower() for w in self.keep if w.strip().lower() != self.word]
        # Not the words of the edited object's own phrase: holding "red" of "red circle" in place
        # would pin the circle that a move or resize must change.
        own = phrase_of(prompt_words.words, self.word)
        return [w for w in dict.fromkeys(content_words(prompt_words.words)) if w not in own]

    def needed_words(self, prompt_words):
        return [self.word] + self._held(prompt_words)

    def keep_energy(self, current, reference, held):
        energy = current.centroid(self.word).new_zeros(())
        for word in held:
            if self.keep_shape_weight:
                energy = energy + self.keep_shape_weight * _shape_distance(current.shape(word), reference.shape(word))
            if self.keep_centroid_weight:
                distance = _l1(current.centroid(word), reference.centroid(word)).sum(-1).mean()
                energy = energy + self.keep_centroid_weight * distance
            if self.keep_size_weight:
                energy = energy + self.keep_size_weight * _log_size_distance(current.size(word), reference.size(word))
        if self.keep_others and self.keep_appearance_weight > 0:
            for word in [self.word] + held:
                diff = _appearance_distance(current.appearance(word), reference.appearance(word))
                energy = energy + self.keep_appearance_weight * diff
        return energy

    def energy(self, current, reference, timestep):
        held = [w for w in current.words if w != self.word]
        return self.weight * self.object_energy(current, reference) + self.keep_energy(current, reference, held)

    def keep_terms(self, held):
        terms = []
        for word in held:
            terms += [Term("shape", word, self.keep_shape_weight), Term("centroid", word, self.keep_centroid_weight),
                      Term("size", word, self.keep_size_weight)]
        if self.keep_others and self.keep_appearance_weight > 0:
            terms += [Term("appearance", word, self.keep_appearance_weight) for word in [self.word] + held]
        return terms

    def terms(self, words):
        held = [w for w in words if w != self.word]
        return [Term(**{**t.__dict__, "weight": self.weight * t.weight}) for t in self.object_terms()] + self.keep_terms(held)


@dataclass
class _Moving(_KeepOthers):
    """A move or a place, which may also hold the moved object's own silhouette (the reference's,
    translated to where the object is asked to go), its own size (log ratio to the reference's) and
    its own appearance (the reference's) while it moves: a centroid can reach its target by the
    object growing toward it, and on an inverted photo the object can come apart or change colour
    on the way. All are off by default (0); the model's settings may set them per edit kind.

    Besides the centroid of the raw map (`weight`), the move may pull the centroid of the object's
    soft silhouette (the map thresholded at half its range, as `size` and `shape` read it) to the
    target (`shape_centroid_weight`, 0 by default): a map's faint tail and a spread early map move a
    raw centroid without the object moving; the silhouette's centroid moves with the object's body.
    It is a weight of the move itself, not a hold: `keep_others=False` keeps the model's."""

    keep_own_shape_weight: float = field(default=None, kw_only=True)
    keep_own_size_weight: float = field(default=None, kw_only=True)
    keep_own_appearance_weight: float = field(default=None, kw_only=True)
    shape_centroid_weight: float = field(default=None, kw_only=True)

    model_defaults = {**_KeepOthers.model_defaults, "keep_own_shape_weight": 0.0, "keep_own_size_weight": 0.0,
                      "keep_own_appearance_weight": 0.0, "shape_centroid_weight": 0.0}
    own_holds = ("keep_own_shape_weight", "keep_own_size_weight", "keep_own_appearance_weight")

    def check_own(self):
        _check_weights(self, "keep_own_shape_weight", "keep_own_size_weight", "keep_own_appearance_weight",
                       "shape_centroid_weight")
        self.needs_features = self.needs_features or self.keep_own_appearance_weight > 0

    def offset(self, reference):
        """(dx, dy): where the object is asked to go, from where it is in the reference."""
        raise NotImplementedError

    def centroid_target(self, centroid):
        """Where a centroid ([L, 2], the reference's) is asked to go."""
        raise NotImplementedError

    def centroid_term(self, kind, weight):
        """The Term of a centroid of `kind` pulled to `centroid_target`."""
        raise NotImplementedError

    def own_energy(self, current, reference):
        energy = current.centroid(self.word).new_zeros(())
        if self.keep_own_shape_weight:
            shapes = current.shape(self.word)
            translate = tuple(float(v) for v in self.offset(reference))
            targets = [transform_shape(r.to(c)[None, None], translate)[0, 0] for r, c in zip(reference.shape(self.word), shapes)]
            energy = energy + self.keep_own_shape_weight * _shape_distance(shapes, targets)
        if self.keep_own_size_weight:
            energy = energy + self.keep_own_size_weight * _log_size_distance(current.size(self.word), reference.size(self.word))
        if self.keep_own_appearance_weight:
            diff = _appearance_distance(current.appearance(self.word), reference.appearance(self.word))
            energy = energy + self.keep_own_appearance_weight * diff
        return energy

    def energy(self, current, reference, timestep):
        energy = super().energy(current, reference, timestep)
        if self.keep_own_shape_weight or self.keep_own_size_weight or self.keep_own_appearance_weight:
            energy = energy + self.own_energy(current, reference)
        if self.shape_centroid_weight:
            centroid = current.shape_centroid(self.word)
            target = self.centroid_target(reference.shape_centroid(self.word).to(centroid))
            energy = energy + self.shape_centroid_weight * _l1(centroid, target).sum(-1).mean()
        return energy

    def own_shape_term(self):
        return Term("shape", self.word, self.keep_own_shape_weight, transform=dict(translate=self.offset(None)))

    def object_terms(self):
        return [self.centroid_term("centroid", 1.0)]

    def terms(self, words):
        return super().terms(words) + [self.own_shape_term(), Term("size", self.word, self.keep_own_size_weight),
                                       Term("appearance", self.word, self.keep_own_appearance_weight),
                                       self.centroid_term("shape_centroid", self.shape_centroid_weight)]


@dataclass
class Move(_Moving):
    """Move `word`'s object by (dx, dy), in fractions of the image (x right, y down)."""

    word: str
    dx: float = 0.0
    dy: float = 0.0
    weight: float = None  # None: the model's setting, else CENTROID_WEIGHT
    default_weight = CENTROID_WEIGHT

    def __post_init__(self):
        _check_unit("dx", self.dx, -1.0, 1.0)
        _check_unit("dy", self.dy, -1.0, 1.0)
        super().__post_init__()

    def offset(self, reference):
        return (self.dx, self.dy)

    def centroid_target(self, centroid):
        return centroid + torch.tensor([self.dx, self.dy]).to(centroid)

    def centroid_term(self, kind, weight):
        return Term(kind, self.word, weight, offset=(self.dx, self.dy))

    def object_energy(self, current, reference):
        centroid = current.centroid(self.word)
        return _l1(centroid, self.centroid_target(reference.centroid(self.word).to(centroid))).sum(-1).mean()


@dataclass
class Place(_Moving):
    """Put `word`'s object's centre at (x, y), image fractions in [0, 1] from the top-left."""

    word: str
    x: float = 0.5
    y: float = 0.5
    weight: float = None  # None: the model's setting, else CENTROID_WEIGHT
    default_weight = CENTROID_WEIGHT

    def __post_init__(self):
        _check_unit("x", self.x, 0.0, 1.0)
        _check_unit("y", self.y, 0.0, 1.0)
        super().__post_init__()

    def offset(self, reference):
        centre = reference.centroid(self.word).detach().mean(0)
        return (self.x - float(centre[0]), self.y - float(centre[1]))

    def centroid_target(self, centroid):
        return torch.tensor([self.x, self.y]).to(centroid).expand_as(centroid)

    def centroid_term(self, kind, weight):
        return Term(kind, self.word, weight, const=(self.x, self.y))

    def object_energy(self, current, reference):
        centroid = current.centroid(self.word)
        return _l1(centroid, self.centroid_target(centroid)).sum(-1).mean()

    def own_shape_term(self):
        return Term("shape", self.word, self.keep_own_shape_weight, place=(self.x, self.y))


SIZE_FLOOR = 1e-4  # of the image: keeps the log of a vanished silhouette finite


def _log_size_distance(size, reference, scale=1.0):
    """Mean distance of log sizes from log(scale * reference size), not of sizes: a small object's
    size (a few % of the image) is of the order of L1_SMOOTHING, so a difference would sit in the
    smoothed zone, where the pull fades, for most of the way (x0.5 of a 5% object: 0.025 to go). In
    logs, x2 and x0.5 are the same distance (0.69) whatever the object's size."""
    size = size.clamp_min(SIZE_FLOOR)
    target = math.log(scale) + reference.to(size).clamp_min(SIZE_FLOOR).log()
    return _l1(size.log(), target).mean()


@dataclass
class Resize(_KeepOthers):
    """Scale the area of `word`'s object by `scale` (> 0) relative to the reference. It may also hold
    the object's own centroid (`keep_own_centroid_weight`: of its raw map;
    `keep_own_shape_centroid_weight`: of its silhouette) and its own silhouette, the reference's
    scaled about its centroid to the asked area (`keep_own_shape_weight`: `copy_shape` of the
    reference with scale sqrt(`scale`), which says how big and where at once); all off by default
    (the model's settings may set them): it grows or shrinks in place instead of drifting to where
    there is room."""

    word: str
    scale: float = 1.0
    weight: float = None  # None: the model's setting, else SIZE_WEIGHT
    keep_own_centroid_weight: float = field(default=None, kw_only=True)
    keep_own_shape_weight: float = field(default=None, kw_only=True)
    keep_own_shape_centroid_weight: float = field(default=None, kw_only=True)
    default_weight = SIZE_WEIGHT
    model_defaults = {**_KeepOthers.model_defaults, "keep_own_centroid_weight": 0.0, "keep_own_shape_weight": 0.0,
                      "keep_own_shape_centroid_weight": 0.0}
    own_holds = ("keep_own_centroid_weight", "keep_own_shape_weight", "keep_own_shape_centroid_weight")

    def __post_init__(self):
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale must be a finite number > 0, got {self.scale!r}")
        super().__post_init__()

    def check_own(self):
        _check_weights(self, "keep_own_centroid_weight", "keep_own_shape_weight", "keep_own_shape_centroid_weight")

    @property
    def own_transform(self):
        """The reference silhouette's transform to the asked area: lengths scale as its square root."""
        return dict(scale=math.sqrt(self.scale))

    def object_energy(self, current, reference):
        return _log_size_distance(current.size(self.word), reference.size(self.word), self.scale)

    def object_terms(self):
        return [Term("size", self.word, 1.0, scale=self.scale)]

    def terms(self, words):
        return super().terms(words) + [Term("centroid", self.word, self.keep_own_centroid_weight),
                                       Term("shape", self.word, self.keep_own_shape_weight, transform=self.own_transform),
                                       Term("shape_centroid", self.word, self.keep_own_shape_centroid_weight)]

    def energy(self, current, reference, timestep):
        energy = super().energy(current, reference, timestep)
        if self.keep_own_centroid_weight:
            distance = _l1(current.centroid(self.word), reference.centroid(self.word).to(energy)).sum(-1).mean()
            energy = energy + self.keep_own_centroid_weight * distance
        if self.keep_own_shape_weight:
            shapes = current.shape(self.word)
            targets = [transform_shape(r.to(c)[None, None], **self.own_transform)[0, 0] for r, c in zip(reference.shape(self.word), shapes)]
            energy = energy + self.keep_own_shape_weight * _shape_distance(shapes, targets)
        if self.keep_own_shape_centroid_weight:
            centroid = current.shape_centroid(self.word)
            distance = _l1(centroid, reference.shape_centroid(self.word).to(centroid)).sum(-1).mean()
            energy = energy + self.keep_own_shape_centroid_weight * distance
        return energy


@dataclass
class KeepShape(Edit):
    """Hold the silhouettes of `words` (default: every content word) to the reference."""

    words: list = None
    weight: float = SHAPE_WEIGHT
    needs_reference = True

    def __post_init__(self):
        _check_weights(self, "weight")

    def needed_words(self, prompt_words):
        chosen = self.words if self.words is not None else content_words(prompt_words.words)
        return list(dict.fromkeys(w.strip().lower() for w in chosen))

    def energy(self, current, reference, timestep):
        return self.weight * sum(_shape_distance(current.shape(w), reference.shape(w)) for w in current.words)

    def terms(self, words):
        return [Term("shape", w, self.weight) for w in words]


@dataclass
class KeepAppearance(KeepShape):
    """Hold the appearance of `words` (default: every content word) to the reference."""

    weight: float = APPEARANCE_WEIGHT
    needs_features = True

    def energy(self, current, reference, timestep):
        return self.weight * sum(_appearance_distance(current.appearance(w), reference.appearance(w)) for w in current.words)

    def terms(self, words):
        return [Term("appearance", w, self.weight) for w in words]


@dataclass
class CopyAppearance(Edit):
    """Give `word`'s object the appearance of `source_word` in `source` (a trace of another
    generation or of a real image)."""

    word: str
    source: object  # Trace
    source_word: str = None
    weight: float = APPEARANCE_WEIGHT
    # Holding the prompt's other objects to the reference: their appearance and their silhouettes,
    # read at their nouns ("square" of "a blue square"; a colour word's map can reach over the copied
    # object too, and holding it holds this object's old colour). Weights left None take the model's
    # settings, else 0 (the paper's plain transfer). On a model that ties one object's looks to
    # another's, the copied appearance can otherwise spill onto the other objects or swap the two.
    keep_appearance_weight: float = field(default=None, kw_only=True)
    keep_shape_weight: float = field(default=None, kw_only=True)
    needs_features = True
    model_defaults = {"keep_appearance_weight": 0.0, "keep_shape_weight": 0.0}

    def __post_init__(self):
        self.unset = tuple(name for name in self.model_defaults if getattr(self, name) is None)
        for name in self.unset:
            setattr(self, name, self.model_defaults[name])
        _check_weights(self, "weight", "keep_appearance_weight", "keep_shape_weight")
        self.word = self.word.strip().lower()
        self.source_word = self.source.index(self.source_word or self.word)
        self.needs_reference = self.keep_appearance_weight > 0 or self.keep_shape_weight > 0

    def needed_words(self, prompt_words):
        if not self.needs_reference:
            return [self.word]
        own = phrase_of(prompt_words.words, self.word)
        return [self.word] + [w for w in phrase_heads(prompt_words.words) if w not in own]

    def energy(self, current, reference, timestep):
        target = self.source.view(timestep).appearance(self.source_word)
        energy = self.weight * _appearance_distance(current.appearance(self.word), target)
        for word in current.words:
            if word == self.word:
                continue
            if self.keep_appearance_weight:
                diff = _appearance_distance(current.appearance(word), reference.appearance(word))
                energy = energy + self.keep_appearance_weight * diff
            if self.keep_shape_weight:
                energy = energy + self.keep_shape_weight * _shape_distance(current.shape(word), reference.shape(word))
        return energy

    def terms(self, words):
        terms = [Term("appearance", self.word, self.weight, source=self.source, source_word=self.source_word)]
        for word in words:
            if word != self.word:
                terms += [Term("appearance", word, self.keep_appearance_weight), Term("shape", word, self.keep_shape_weight)]
        return terms


@dataclass
class CopyShape(Edit):
    """Give `word`'s object the silhouette of `source_word` in `source`, optionally translated by
    (dx, dy) image fractions, scaled and rotated (degrees) about its centroid."""

    word: str
    source: object  # Trace
    source_word: str = None
    translate: tuple = (0.0, 0.0)
    scale: float = 1.0
    rotate: float = 0.0
    weight: float = SHAPE_WEIGHT

    def __post_init__(self):
        _check_weights(self, "weight")
        for name, value in zip(("translate x", "translate y"), self.translate):
            _check_unit(name, value, -1.0, 1.0)
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale must be a finite number > 0, got {self.scale!r}")
        self.translate = tuple(float(v) for v in self.translate)
        self.word = self.word.strip().lower()
        self.source_word = self.source.index(self.source_word or self.word)

    def needed_words(self, prompt_words):
        return [self.word]

    def target(self, timestep):
        shapes = self.source.view(timestep).shape(self.source_word)
        return [transform_shape(s[None, None], self.translate, self.scale, self.rotate)[0, 0] for s in shapes]

    def energy(self, current, reference, timestep):
        target = [t.to(c) for t, c in zip(self.target(timestep), current.shape(self.word))]
        return self.weight * _shape_distance(current.shape(self.word), target)

    def terms(self, words):
        transform = dict(translate=self.translate, scale=self.scale, rotate=self.rotate)
        return [Term("shape", self.word, self.weight, source=self.source, source_word=self.source_word, transform=transform)]


@dataclass
class CopyLayout(Edit):
    """Take the silhouettes of all `words` (default: the content words both prompts share) from `source`."""

    source: object  # Trace
    words: list = None
    weight: float = SHAPE_WEIGHT

    def __post_init__(self):
        _check_weights(self, "weight")
        if self.words is not None:
            self.words = [self.source.index(w) for w in self.words]

    def needed_words(self, prompt_words):
        if self.words is not None:
            return self.words
        return [w for w in dict.fromkeys(content_words(prompt_words.words)) if w in self.source.words]

    def validate(self, prompt_words):
        if not self.needed_words(prompt_words):
            raise ValueError(
                f"copy_layout: the prompt {prompt_words.prompt!r} and the source {self.source.prompt!r} share no object word"
            )
        super().validate(prompt_words)

    def energy(self, current, reference, timestep):
        source = self.source.view(timestep)
        return self.weight * sum(
            _shape_distance(current.shape(w), [t.to(c) for t, c in zip(source.shape(w), current.shape(w))])
            for w in current.words
        )

    def terms(self, words):
        return [Term("shape", w, self.weight, source=self.source) for w in words]


@dataclass
class Collage(Edit):
    """Compose objects from several sources: `parts` is a list of (source trace, [words]); each word
    takes its silhouette and its appearance from its own source."""

    parts: list
    shape_weight: float = SHAPE_WEIGHT
    appearance_weight: float = APPEARANCE_WEIGHT
    needs_features = True

    def __post_init__(self):
        _check_weights(self, "shape_weight", "appearance_weight")
        self.sources = {}
        for source, words in self.parts:
            for word in words:
                self.sources[source.index(word)] = source
        if not self.sources:
            raise ValueError("collage needs at least one (source, words) part")

    def needed_words(self, prompt_words):
        return list(self.sources)

    def energy(self, current, reference, timestep):
        energy = 0.0
        for word, source in self.sources.items():
            view = source.view(timestep)
            shapes = current.shape(word)
            energy = energy + self.shape_weight * _shape_distance(shapes, [t.to(c) for t, c in zip(view.shape(word), shapes)])
            energy = energy + self.appearance_weight * _appearance_distance(current.appearance(word), view.appearance(word))
        return energy

    def terms(self, words):
        terms = []
        for word, source in self.sources.items():
            terms += [Term("shape", word, self.shape_weight, source=source),
                      Term("appearance", word, self.appearance_weight, source=source)]
        return terms


@dataclass
class Restyle(Edit):
    """Restyle through non-object tokens: the appearance of `style_words` (e.g. "painting") is taken
    from `source`, while, by default, the layout of the prompt's objects is held to the reference."""

    source: object  # Trace
    style_words: list
    weight: float = APPEARANCE_WEIGHT
    keep_layout: bool = True
    keep_shape_weight: float = SHAPE_WEIGHT
    needs_features = True

    def __post_init__(self):
        _check_weights(self, "weight", "keep_shape_weight")
        self.style_words = [self.source.index(w) for w in self.style_words]
        self.needs_reference = self.keep_layout

    def needed_words(self, prompt_words):
        held = [w for w in content_words(prompt_words.words) if w not in self.style_words] if self.keep_layout else []
        return list(dict.fromkeys(self.style_words + held))

    def energy(self, current, reference, timestep):
        source = self.source.view(timestep)
        energy = 0.0
        for word in current.words:
            if word in self.style_words:
                energy = energy + self.weight * _appearance_distance(current.appearance(word), source.appearance(word))
            else:
                energy = energy + self.keep_shape_weight * _shape_distance(current.shape(word), reference.shape(word))
        return energy

    def terms(self, words):
        return [Term("appearance", w, self.weight, source=self.source) if w in self.style_words
                else Term("shape", w, self.keep_shape_weight) for w in words]


# The lowercase names users write in `edits=[...]`.
move, place, resize = Move, Place, Resize
keep_shape, keep_appearance = KeepShape, KeepAppearance
copy_appearance, copy_shape, copy_layout = CopyAppearance, CopyShape, CopyLayout
collage, restyle = Collage, Restyle
