"""Guidance settings that travel with a model: `self_guidance.json` in its pipeline folder.

A model's self-guidance scale, gradient normalisation, schedule and keep weights depend on the model
(how large and how varied its energy gradients are), so they are saved beside its weights and read
by `SelfGuidancePipeline.from_pipe` as that pipeline's defaults. Any argument given to a call, or to
an edit, overrides them; a pipeline without the file keeps the paper's defaults. The file:

    {"format": 1,
     "defaults": {"self_guidance_scale": 1.5, "normalize_gradient": true,
                  "guidance_schedule": {"from_step": 1, "to_share": 0.8}},
     "edits": {"move": {"self_guidance_scale": 1.5, "keep_shape_weight": 4.0},
               "copy_appearance": {"self_guidance_scale": 8.0}}}

A call takes its scale, normalisation and schedule from the entry of its first edit's kind, then
from "defaults", then the paper's; each edit takes its weights from its own kind's entry.

An optional "photo" section holds what differs for edits of an inverted photo (`sg.invert`), which
run without classifier-free guidance: {"strength": s, "defaults": {...}, "edits": {kind: {...}}}.
A call whose trace comes from `sg.invert` takes its settings from these entries first (key by key),
and `edit_arguments` its strength.
`guidance_schedule` is "paper" (the paper's schedule) or {"from_step": k, "to_share": s}: steps
k <= i < s * steps are guided, whatever the step count. `guidance_repeats` (sgfast.repeats) is an
int n >= 1 (every guided step run n times) or {"times": n, "to_share": s}: the guided steps i < s *
steps run n times, the others once. An optional "feature_layer" names the
block whose output appearance edits read (`from_pipe`'s `feature_layer` argument overrides it), and an
optional "layers" the attention layers whose maps the energies read (names or block prefixes, as
`from_pipe`'s `layers`, which overrides it): which layers' maps follow the objects is a fact of the
model (the built-in MMDiT model's are its last two blocks, docs/builtin-mmdit.md).
"""

import dataclasses
import json
import math
import os
import re

from sgfast import edits as edit_types
from sgfast.repeats import resolve_repeats

FILENAME = "self_guidance.json"
FORMAT = 1
CALL_KEYS = ("self_guidance_scale", "normalize_gradient", "guidance_schedule", "guidance_repeats")
PAPER = {"self_guidance_scale": 1.0, "normalize_gradient": False, "guidance_schedule": "paper"}


def kind_of(edit_class):
    """"copy_appearance" for CopyAppearance: the lowercase name users write."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", edit_class.__name__).lower()


# Edit kinds and the edit fields a settings file may set for each (those an edit leaves unset).
KINDS = {
    kind_of(cls): tuple(cls.model_defaults) if hasattr(cls, "model_defaults") else ()
    for cls in vars(edit_types).values()
    if isinstance(cls, type) and issubclass(cls, edit_types.Edit) and dataclasses.is_dataclass(cls)
    and not cls.__name__.startswith("_")
}


def _check_number(where, key, value, positive=False):
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{where}: {key} must be a finite number >= 0, got {value!r}")


def _check_schedule(where, value):
    if value == "paper":
        return
    if not (isinstance(value, dict) and set(value) == {"from_step", "to_share"}):
        raise ValueError(f'{where}: guidance_schedule must be "paper" or {{"from_step": int, "to_share": number}}, got {value!r}')
    first, share = value["from_step"], value["to_share"]
    if not (isinstance(first, int) and not isinstance(first, bool) and first >= 0):
        raise ValueError(f"{where}: guidance_schedule from_step must be an int >= 0, got {first!r}")
    if not (isinstance(share, (int, float)) and not isinstance(share, bool) and 0 < share <= 1):
        raise ValueError(f"{where}: guidance_schedule to_share must be in (0, 1], got {share!r}")


def _check_repeats(where, value):
    def count(n):
        return isinstance(n, int) and not isinstance(n, bool) and n >= 1

    if count(value):
        return
    allowed = 'guidance_repeats must be an int >= 1 or {"times": int >= 1, "to_share": number in (0, 1]}'
    if not (isinstance(value, dict) and set(value) == {"times", "to_share"}):
        raise ValueError(f"{where}: {allowed}, got {value!r}")
    share = value["to_share"]
    if not count(value["times"]) or not (isinstance(share, (int, float)) and not isinstance(share, bool) and 0 < share <= 1):
        raise ValueError(f"{where}: {allowed}, got {value!r}")


def _check_entry(where, entry, edit_fields):
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be an object, got {entry!r}")
    allowed = CALL_KEYS + edit_fields
    for key, value in entry.items():
        if key not in allowed:
            raise ValueError(f"{where}: unknown setting {key!r}; allowed: {', '.join(allowed)}")
        if key == "normalize_gradient":
            if not isinstance(value, bool):
                raise ValueError(f"{where}: normalize_gradient must be true or false, got {value!r}")
        elif key == "guidance_schedule":
            _check_schedule(where, value)
        elif key == "guidance_repeats":
            _check_repeats(where, value)
        else:
            _check_number(where, key, value)


@dataclasses.dataclass
class GuidanceSettings:
    """A model's defaults: `defaults` (call settings for any edit) and `edits` (per kind)."""

    defaults: dict = dataclasses.field(default_factory=dict)
    edits: dict = dataclasses.field(default_factory=dict)
    feature_layer: str = None  # the block whose output appearance reads (from_pipe's feature_layer)
    source: str = None  # where they were read from, for messages
    photo: dict = dataclasses.field(default_factory=dict)  # edits of inverted photos: strength, defaults, edits
    layers: list = None  # the attention layers the energies read (from_pipe's layers)

    def __post_init__(self):
        where = self.source or "guidance settings"
        if isinstance(self.layers, str) and self.layers:
            self.layers = [self.layers]  # one name or block prefix, as from_pipe takes it
        elif isinstance(self.layers, (list, tuple)):
            self.layers = list(self.layers)  # its own list: the settings' owner's stays as it is
        if self.layers is not None and not (isinstance(self.layers, list) and self.layers
                                            and all(isinstance(name, str) and name for name in self.layers)):
            raise ValueError(f"{where}: layers must be an attention layer name or block prefix, or a non-empty list of them, "
                             f"such as [\"up_blocks.1\"] or [\"transformer_blocks.2\"], got {self.layers!r}")
        if self.feature_layer is not None and not (isinstance(self.feature_layer, str) and self.feature_layer):
            raise ValueError(f"{where}: feature_layer must be a block name such as \"up_blocks.2\" (a UNet's) or \"transformer_blocks.1\" (an MMDiT's), got {self.feature_layer!r}")
        _check_entries(where, self.defaults, self.edits)
        _check_photo(where, self.photo)

    def chosen_layers(self, names, resolve):
        """The layers a pipeline captures: `resolve(names)` where from_pipe names them, else
        `resolve` of the file's (an unknown one is an error naming the file), else None (the family's
        default)."""
        if names is not None:
            return resolve(names)
        if self.layers is None:
            return None
        try:
            return resolve(self.layers)
        except ValueError as error:
            raise ValueError(f"{self.source or 'guidance settings'}: layers: {error}") from None

    def for_photo(self):
        """The settings of a call that edits an inverted photo: the "photo" entries over these."""
        photo_edits = self.photo.get("edits", {})
        edits = {kind: {**self.edits.get(kind, {}), **photo_edits.get(kind, {})} for kind in {**self.edits, **photo_edits}}
        return GuidanceSettings({**self.defaults, **self.photo.get("defaults", {})}, edits, self.feature_layer, self.source,
                                layers=self.layers)

    @property
    def photo_strength(self):
        """The share of steps a photo edit guides when the call does not say (1: all of them)."""
        return self.photo.get("strength", 1.0)

    @classmethod
    def from_dict(cls, data, source=None):
        where = source or "guidance settings"
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f'{where}: expected an object with "format": {FORMAT}')
        unknown = set(data) - {"format", "defaults", "edits", "feature_layer", "layers", "about", "photo"}
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}; allowed: format, defaults, edits, feature_layer, layers, about, photo")
        edits = {k: dict(v) if isinstance(v, dict) else v for k, v in data.get("edits", {}).items()}
        photo = data.get("photo", {})
        return cls(dict(data.get("defaults", {})), edits, data.get("feature_layer"), source, dict(photo) if isinstance(photo, dict) else photo,
                   layers=data.get("layers"))

    @classmethod
    def read(cls, path):
        with open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} is not valid JSON: {error}") from None
        return cls.from_dict(data, source=path)

    def to_dict(self, about=None):
        data = {"format": FORMAT}
        if about:
            data["about"] = about
        data.update(defaults=self.defaults, edits=self.edits)
        if self.feature_layer:
            data["feature_layer"] = self.feature_layer
        if self.layers:
            data["layers"] = self.layers
        if self.photo:
            data["photo"] = self.photo
        return data

    def write(self, folder, about=None):
        """Write `self_guidance.json` into a pipeline folder; returns its path."""
        path = os.path.join(folder, FILENAME)
        with open(path, "w") as f:
            json.dump(self.to_dict(about), f, indent=1)
            f.write("\n")
        return path

    def call_setting(self, key, edits):
        """The call's value of `key` for these edits (one list per prompt), not counting the call's own."""
        first = next((e for item in edits for e in item), None)
        kind = kind_of(type(first)) if first is not None else None
        for entry in (self.edits.get(kind, {}), self.defaults, PAPER):
            if key in entry:
                return entry[key]

    def resolve(self, edits, num_steps, self_guidance_scale=None, normalize_gradient=None, guidance_schedule=None):
        """(edits with their unset weights filled in, (scale, normalize, schedule)) for a call; an
        argument that is not None wins over the settings."""
        given = dict(self_guidance_scale=self_guidance_scale, normalize_gradient=normalize_gradient, guidance_schedule=guidance_schedule)
        call = [value if value is not None else self.call_setting(k, edits) for k, value in given.items()]
        call[2] = schedule_steps(call[2], num_steps)
        return [[self.fill(e) for e in item] for item in edits], tuple(call)

    def repeats(self, edits, num_steps, guidance_repeats=None):
        """The call's runs of each step (one int per step, sgfast.repeats): `guidance_repeats` when
        given (an int, one int per step, or the settings' {"times", "to_share"}), else the settings'."""
        value = guidance_repeats if guidance_repeats is not None else self.call_setting("guidance_repeats", edits)
        if isinstance(value, dict):
            _check_repeats("guidance_repeats", value)
            value = [value["times"] if i < value["to_share"] * num_steps else 1 for i in range(num_steps)]
        return resolve_repeats(value, num_steps)

    def fill(self, edit):
        """`edit` with the fields it left unset taken from its kind's entry."""
        entry = self.edits.get(kind_of(type(edit)), {})
        changes = {k: entry[k] for k in getattr(edit, "unset", ()) if k in entry}
        return dataclasses.replace(edit, **changes) if changes else edit


def _check_entries(where, defaults, edits):
    _check_entry(f"{where} defaults", defaults, ())
    if not isinstance(edits, dict):
        raise ValueError(f"{where}: edits must be an object of edit kinds, got {edits!r}")
    for kind, entry in edits.items():
        if kind not in KINDS:
            raise ValueError(f"{where}: unknown edit kind {kind!r}; allowed: {', '.join(KINDS)}")
        _check_entry(f"{where} edits.{kind}", entry, KINDS[kind])


def _check_photo(where, photo):
    if not isinstance(photo, dict):
        raise ValueError(f"{where}: photo must be an object (strength, defaults, edits), got {photo!r}")
    unknown = set(photo) - {"strength", "defaults", "edits"}
    if unknown:
        raise ValueError(f"{where}: unknown photo keys {sorted(unknown)}; allowed: strength, defaults, edits")
    strength = photo.get("strength", 1.0)
    if not (isinstance(strength, (int, float)) and not isinstance(strength, bool) and 0 < strength <= 1):
        raise ValueError(f"{where}: photo strength must be a number in (0, 1], got {strength!r}")
    _check_entries(f"{where} photo", photo.get("defaults", {}), photo.get("edits", {}))


def schedule_steps(schedule, num_steps):
    """A settings file's schedule as a call's `guidance_schedule`; anything else passes through."""
    if isinstance(schedule, str) and schedule == "paper":
        return None
    if isinstance(schedule, dict) and set(schedule) == {"from_step", "to_share"}:
        return [schedule["from_step"] <= i < schedule["to_share"] * num_steps for i in range(num_steps)]
    return schedule


def model_settings(pipe, settings=None):
    """The settings `from_pipe` uses: `settings` when given (a GuidanceSettings, a file path, a dict
    as the file holds, or "paper"), else the pipeline folder's `self_guidance.json`, else the paper's."""
    if isinstance(settings, GuidanceSettings):
        return settings
    if isinstance(settings, dict):
        return GuidanceSettings.from_dict(settings)
    if settings == "paper":
        return GuidanceSettings()
    if isinstance(settings, (str, os.PathLike)):
        if not os.path.isfile(settings):
            raise FileNotFoundError(f"no guidance settings file at {settings}")
        return GuidanceSettings.read(settings)
    if settings is not None:
        raise TypeError(f'settings must be None, "paper", a path, a dict or GuidanceSettings; got {settings!r}')
    folder = getattr(pipe, "name_or_path", None)  # from_pretrained's argument: a str or a Path
    path = os.path.join(os.fspath(folder), FILENAME) if isinstance(folder, (str, os.PathLike)) and folder else None
    return GuidanceSettings.read(path) if path and os.path.isfile(path) else GuidanceSettings()
