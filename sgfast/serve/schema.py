"""The request schemas of POST /v1/images and POST /v1/edits (pydantic) and their checks against the
server's caps and the prompt's words: a request becomes an engine `Spec` or an `InvalidRequest` (HTTP
422; a photo that is too large or not an 8-bit PNG/JPEG carries 413 or 415 as its `status`)."""

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sgfast.serve.admission import paper_guided
from sgfast.serve.jobs import Spec


# Every number must be finite: a NaN would otherwise fail the bounds with a message about the bound.
STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)


def _prompt_not_blank(cls, value):
    if not value.strip():
        raise ValueError("prompt is blank")
    return value

def _weight(what):
    """An edit's weight: left out (or null), the model's setting (its self_guidance.json), else the
    library's default; a number in [0, 1000] (strict: not a string or a boolean, which would pass as one)."""
    return Field(None, ge=0, le=1000, strict=True, description=what)


class _Edit(BaseModel):
    model_config = STRICT

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data):
        """An unknown field is refused with the fields this kind of edit takes (a resize's hold named
        on a move, a misspelt weight)."""
        if isinstance(data, dict):
            unknown = [name for name in data if name not in cls.model_fields]
            if unknown:
                kind = data.get("type")
                raise ValueError(
                    f"{', '.join(map(repr, unknown))}: not a field of a {kind} edit; its fields: {', '.join(cls.model_fields)}"
                )
        return data


class _ObjectEdit(_Edit):
    word: str = Field(min_length=1, max_length=100)
    weight: Optional[float] = _weight("the edit's own weight")
    keep_others: bool = Field(True, strict=True, description="hold the other objects (false: only the holds given here)")
    keep_shape_weight: Optional[float] = _weight("the other objects' silhouettes held to the unedited image")
    keep_appearance_weight: Optional[float] = _weight("every object's appearance held to the unedited image")
    keep_centroid_weight: Optional[float] = _weight("the other objects' centroids held")
    keep_size_weight: Optional[float] = _weight("the other objects' sizes held")


class _MovingEdit(_ObjectEdit):
    """A move or a place: it may also hold the moved object itself."""

    keep_own_shape_weight: Optional[float] = _weight("the object's unedited silhouette, translated to its target")
    keep_own_size_weight: Optional[float] = _weight("the object's size, as the log ratio to its unedited size")
    keep_own_appearance_weight: Optional[float] = _weight("the object's appearance")
    shape_centroid_weight: Optional[float] = _weight("the move's pull on the object's silhouette's centroid")


class MoveEdit(_MovingEdit):
    type: Literal["move"]
    dx: float = Field(0.0, ge=-1, le=1)
    dy: float = Field(0.0, ge=-1, le=1)


class PlaceEdit(_MovingEdit):
    type: Literal["place"]
    x: float = Field(0.5, ge=0, le=1)
    y: float = Field(0.5, ge=0, le=1)


class ResizeEdit(_ObjectEdit):
    type: Literal["resize"]
    scale: float = Field(gt=0, le=16)
    keep_own_centroid_weight: Optional[float] = _weight("the object's centroid, where it was unedited")
    keep_own_shape_weight: Optional[float] = _weight("the object's unedited silhouette, scaled about its centroid")
    keep_own_shape_centroid_weight: Optional[float] = _weight("the object's silhouette's centroid, where it was")


class KeepShapeEdit(_Edit):
    type: Literal["keep_shape"]
    words: Optional[list[Annotated[str, Field(min_length=1, max_length=100)]]] = Field(None, max_length=77)
    weight: Optional[float] = _weight("the edit's weight")


class KeepAppearanceEdit(KeepShapeEdit):
    type: Literal["keep_appearance"]


EditSpec = Annotated[
    Union[MoveEdit, PlaceEdit, ResizeEdit, KeepShapeEdit, KeepAppearanceEdit], Field(discriminator="type")
]


class ImageRequest(BaseModel):
    """The body of POST /v1/images. Server caps (steps, size, edits, prompt length) are checked after
    this schema, against the server's flags."""

    model_config = STRICT

    prompt: str = Field(min_length=1, max_length=10_000)
    negative_prompt: Optional[str] = Field(None, max_length=10_000)
    edits: list[EditSpec] = Field(default_factory=list, max_length=1000)
    seed: int = Field(0, ge=0, le=2**63 - 1)
    steps: Optional[int] = Field(None, ge=1, le=10_000)
    guidance_scale: float = Field(7.5, ge=0, le=50)
    # None: the model's own setting (its self_guidance.json; the paper's defaults without one).
    self_guidance_scale: Optional[float] = Field(None, ge=0, le=100)
    normalize_gradient: Optional[bool] = Field(None, description="scale each image's guidance gradient to unit RMS (see the library)")
    size: Optional[Union[int, tuple[int, int]]] = Field(None, description="square side, or [width, height], in pixels")
    budget_ms: Optional[float] = Field(None, gt=0, le=3_600_000, description="time to the answer, queue included")
    format: Literal["json", "png"] = "json"

    _not_blank = field_validator("prompt")(classmethod(_prompt_not_blank))


class PhotoEditRequest(BaseModel):
    """The body of POST /v1/edits: a photo (PNG or JPEG, base64) edited as if the model had made it
    (`sgfast.invert`). No seed or size: the photo's own. Caps as /v1/images', plus the photo's bytes
    and sides."""

    model_config = STRICT

    photo: str = Field(min_length=1, description="the PNG or JPEG file, base64-encoded (line breaks and a data:image/...;base64, prefix allowed)")
    prompt: str = Field(min_length=1, max_length=10_000, description="what the photo shows (the words edits name)")
    edits: list[EditSpec] = Field(min_length=1, max_length=1000)
    # None: the model's photo setting (its self_guidance.json; 1 without one).
    strength: Optional[float] = Field(None, gt=0, le=1, description="share of the steps edited (image-to-image's strength)")
    steps: Optional[int] = Field(None, ge=2, le=10_000)
    guidance_scale: float = Field(5.0, ge=0, le=50)
    self_guidance_scale: Optional[float] = Field(None, ge=0, le=100)
    normalize_gradient: Optional[bool] = None
    budget_ms: Optional[float] = Field(None, gt=0, le=3_600_000)
    format: Literal["json", "png"] = "json"

    _not_blank = field_validator("prompt")(classmethod(_prompt_not_blank))


def build_edit(spec):
    """A request edit -> an sgfast edit object (its own argument checks raise ValueError)."""
    from sgfast import edits as E

    data = spec.model_dump(exclude_none=True)
    kind = data.pop("type")
    factory = {
        "move": E.move,
        "place": E.place,
        "resize": E.resize,
        "keep_shape": E.keep_shape,
        "keep_appearance": E.keep_appearance,
    }[kind]
    return factory(**data)


class InvalidRequest(Exception):
    """A request the schema accepted but the server's caps or the prompt do not: HTTP 422.
    `errors`: [{loc, msg, type}] as the schema's own errors; `extra`: more fields for the answer."""

    def __init__(self, loc, message, status=422, **extra):
        super().__init__(message)
        self.status = status
        self.errors = [{"loc": ["body", *loc], "msg": message, "type": "value_error"}]
        self.extra = extra


def to_spec(request, engine):
    """Check a parsed request against the server's caps and the prompt's words; build the Spec."""
    limits = engine.limits
    steps = checked_steps(request, limits)
    size = request.size if request.size is not None else engine.native
    width, height = (size, size) if isinstance(size, int) else size
    check_size(width, height, engine, ["size"])
    edits = checked_edits(request, engine, steps)
    spec = Spec(
        prompt=request.prompt,
        edits=edits,
        edit_specs=[e.model_dump(exclude_none=True) for e in request.edits],
        seed=request.seed,
        steps=steps,
        guidance_scale=request.guidance_scale,
        self_guidance_scale=request.self_guidance_scale,
        normalize_gradient=request.normalize_gradient,
        height=height,
        width=width,
        negative_prompt=request.negative_prompt,
        budget_ms=request.budget_ms,
    )
    # The model's own schedule decides which steps are guided (the paper's without settings).
    guided = getattr(engine, "guided_steps_for", lambda spec: paper_guided)(spec)
    if edits and not guided(steps):
        first = next((n for n in range(1, limits.max_steps + 1) if guided(n)), None)
        raise InvalidRequest(["steps"], f"steps={steps} has no guided step, so the edits would do nothing; edits need steps >= {first}")
    return spec


# The photo's refusals as HTTP statuses: over the byte cap, not an 8-bit PNG/JPEG, a bad size or not base64.
PHOTO_STATUS = {"too_large": 413, "unsupported": 415, "invalid": 422}


def photo_of(request, limits):
    """The request's photo: base64 -> an upright RGB PIL image (`sgfast.serve.photo`), or
    InvalidRequest (413, 415 or 422)."""
    from sgfast.invert import PhotoError
    from sgfast.serve.photo import load_photo, photo_bytes

    try:
        return load_photo(photo_bytes(request.photo), max_side=limits.max_size, max_bytes=limits.max_photo_bytes)
    except PhotoError as e:
        raise InvalidRequest(["photo"], str(e), status=PHOTO_STATUS[e.kind]) from None


def to_photo_spec(request, engine, photo=None):
    """Check a parsed photo-edit request (caps, the photo, the prompt's words); build its Spec.
    `photo`: the request's photo already decoded (`photo_of`), else it is decoded here."""
    limits = engine.limits
    steps = checked_steps(request, limits)
    photo = photo_of(request, limits) if photo is None else photo
    check_size(*photo.size, engine, ["photo"])
    edits = checked_edits(request, engine, steps)
    strength = check_strength(request, engine, edits, steps)
    return Spec(
        prompt=request.prompt,
        edits=edits,
        edit_specs=[e.model_dump(exclude_none=True) for e in request.edits],
        steps=steps,
        guidance_scale=request.guidance_scale,
        self_guidance_scale=request.self_guidance_scale,
        normalize_gradient=request.normalize_gradient,
        width=photo.size[0],
        height=photo.size[1],
        budget_ms=request.budget_ms,
        photo=photo,
        strength=strength,
    )


def check_strength(request, engine, edits, steps):
    """A strength that leaves none of the model's guided steps would edit nothing: 422 before the
    inversion runs."""
    from sgfast.invert import strength_schedule

    settings = engine.sg.settings
    strength = settings.photo_strength if request.strength is None else request.strength
    _, (_, _, schedule) = settings.for_photo().resolve([edits], steps)
    if not any(strength_schedule(steps, strength, schedule)):
        raise InvalidRequest(
            ["strength"], f"strength={strength:g} leaves none of the guided steps of {steps} steps; raise strength or steps"
        )
    return strength


def checked_steps(request, limits):
    if len(request.prompt) > limits.max_prompt_chars:
        raise InvalidRequest(["prompt"], f"prompt is {len(request.prompt)} characters; at most {limits.max_prompt_chars}")
    steps = request.steps if request.steps is not None else limits.default_steps
    if steps > limits.max_steps:
        raise InvalidRequest(["steps"], f"steps={steps} is over this server's cap of {limits.max_steps}")
    if len(request.edits) > limits.max_edits:
        raise InvalidRequest(["edits"], f"{len(request.edits)} edits; at most {limits.max_edits} per request")
    return steps


def check_size(width, height, engine, loc):
    multiple = size_multiple(engine.pipe)
    for name, value in (("width", width), ("height", height)):
        if not (multiple <= value <= engine.limits.max_size) or value % multiple:
            raise InvalidRequest(
                loc,
                f"{name}={value}: sizes must be multiples of {multiple} between {multiple} and {engine.limits.max_size} pixels",
            )


def checked_edits(request, engine, steps):
    """The request's edits as sgfast edits, checked against the prompt's words."""
    from sgfast.trace import PromptWords

    words = PromptWords.from_tokenizer(engine.pipe.tokenizer, request.prompt)
    edits = []
    for i, edit_spec in enumerate(request.edits):
        try:
            edit = build_edit(edit_spec)
            edit.validate(words)
        except ValueError as e:
            raise InvalidRequest(["edits", i], str(e), words=words.words) from None
        if not edit.needed_words(words):  # it would read no word: nothing to hold, an energy of nothing
            raise InvalidRequest(["edits", i], f"{edit_spec.type} names no word to hold: {_no_words(edit_spec, words)}", words=words.words)
        edits.append(edit)
    return edits


def _no_words(edit_spec, words):
    from sgfast.edits import content_words

    if edit_spec.words is not None:
        return "`words` is empty; give at least one of the prompt's words, or leave it out for every content word"
    return f"the prompt has no content words (its words are {words.words}, content words: {content_words(words.words)})"


def size_multiple(pipe):
    """Pixel sizes must divide down through the VAE and every UNet downsampling."""
    from sgfast.serve.families import size_multiple as multiple

    return multiple(pipe)
