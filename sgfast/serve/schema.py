"""The request schema of POST /v1/images (pydantic) and its checks against the server's caps and the
prompt's words: a request becomes an engine `Spec` or an `InvalidRequest` (HTTP 422)."""

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sgfast.serve.admission import paper_guided
from sgfast.serve.jobs import Spec


# Every number must be finite: a NaN would otherwise fail the bounds with a message about the bound.
STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)


class _Edit(BaseModel):
    model_config = STRICT


class _ObjectEdit(_Edit):
    word: str = Field(min_length=1, max_length=100)
    weight: Optional[float] = Field(None, ge=0, le=1000)
    keep_others: bool = True
    keep_shape_weight: Optional[float] = Field(None, ge=0, le=1000)
    keep_appearance_weight: Optional[float] = Field(None, ge=0, le=1000)
    keep_centroid_weight: Optional[float] = Field(None, ge=0, le=1000)


class MoveEdit(_ObjectEdit):
    type: Literal["move"]
    dx: float = Field(0.0, ge=-1, le=1)
    dy: float = Field(0.0, ge=-1, le=1)


class PlaceEdit(_ObjectEdit):
    type: Literal["place"]
    x: float = Field(0.5, ge=0, le=1)
    y: float = Field(0.5, ge=0, le=1)


class ResizeEdit(_ObjectEdit):
    type: Literal["resize"]
    scale: float = Field(gt=0, le=16)


class KeepShapeEdit(_Edit):
    type: Literal["keep_shape"]
    words: Optional[list[Annotated[str, Field(min_length=1, max_length=100)]]] = Field(None, max_length=77)
    weight: Optional[float] = Field(None, ge=0, le=1000)


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

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value):
        if not value.strip():
            raise ValueError("prompt is blank")
        return value


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

    def __init__(self, loc, message, **extra):
        super().__init__(message)
        self.errors = [{"loc": ["body", *loc], "msg": message, "type": "value_error"}]
        self.extra = extra


def to_spec(request, engine):
    """Check a parsed request against the server's caps and the prompt's words; build the Spec."""
    from sgfast.trace import PromptWords

    limits = engine.limits
    if len(request.prompt) > limits.max_prompt_chars:
        raise InvalidRequest(["prompt"], f"prompt is {len(request.prompt)} characters; at most {limits.max_prompt_chars}")
    steps = request.steps if request.steps is not None else limits.default_steps
    if steps > limits.max_steps:
        raise InvalidRequest(["steps"], f"steps={steps} is over this server's cap of {limits.max_steps}")
    if len(request.edits) > limits.max_edits:
        raise InvalidRequest(["edits"], f"{len(request.edits)} edits; at most {limits.max_edits} per request")
    size = request.size if request.size is not None else engine.native
    width, height = (size, size) if isinstance(size, int) else size
    multiple = size_multiple(engine.pipe)
    for name, value in (("width", width), ("height", height)):
        if not (multiple <= value <= limits.max_size) or value % multiple:
            raise InvalidRequest(
                ["size"],
                f"{name}={value}: sizes must be multiples of {multiple} between {multiple} and {limits.max_size} pixels",
            )
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


def _no_words(edit_spec, words):
    from sgfast.edits import content_words

    if edit_spec.words is not None:
        return "`words` is empty; give at least one of the prompt's words, or leave it out for every content word"
    return f"the prompt has no content words (its words are {words.words}, content words: {content_words(words.words)})"


def size_multiple(pipe):
    """Pixel sizes must divide down through the VAE and every UNet downsampling."""
    downs = len(pipe.unet.config.block_out_channels) - 1
    return pipe.vae_scale_factor * 2**downs
