"""`guided_step="auto"`: which of the two guided-step forms (sgfast.guided: "split", "batched") a
call runs, chosen once per machine and shape by measurement, then kept.

The two forms agree only to float rounding (a UNet's output depends on the batch it ran in), so a
choice made afresh by every call would make an image depend on the machine's momentary load. The
choice is made once per `FormKey` (device, UNet config, latent shape and batch, dtype, CUDA graphs,
compile, captured layers, whether the edits read decoder features, torch version): by timing both
forms a few times on the call's first guided step, then kept in memory and in a small JSON file
(`cache_path()`), so that the machine makes the same choice every time after. What a device type
has a fixed choice for (`FIXED`: the CPU) is never measured.

The measurement runs the step's model evaluation (`GuidedCall.evaluate`) on the step's own inputs
and throws its outputs away: it reads no random numbers and leaves the scheduler alone, so the
image equals that of running the chosen form directly.
"""

import hashlib
import json
import math
import os
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

FORMS = ("split", "batched")  # sgfast.guided's two evaluations
CHOICES = FORMS + ("auto",)
CACHE_FILE = "guided_step.json"
CACHE_VERSION = 1
REPEATS = 3  # timed runs of each form, interleaved, after one warm-up run each (a graph capture, a compile)

# Device types whose choice is fixed rather than measured, with the reason (measured; docs/fast-mode.md).
FIXED = {
    # A CPU runs the UNet compute-bound, with no launch queue to keep busy: one batch-2 pass gains
    # little over two batch-1 passes, and the batched backward runs at twice the batch. Measured on
    # the CPU (docs/fast-mode.md): batched/split 1.20 on the SD1.5 architecture at 128px, 1.10 on the
    # tiny test model, 0.97 on the built-in model; measuring at every new shape would cost several
    # whole UNet passes, for a few percent at best.
    "cpu": "split",
}


def check_guided_step(value, allowed=CHOICES):
    """`value` if it is one of `allowed`, else a ValueError naming them."""
    if not isinstance(value, str) or value not in allowed:
        meanings = {"split": "two batch-1 passes", "batched": "one batch-2 pass", "auto": "chosen by measurement, once"}
        named = ", ".join(f"{a!r} ({meanings[a]})" for a in allowed)
        raise ValueError(f"guided_step must be one of {named}; got {value!r}")
    return value


def cache_path():
    """The choices' file: $SGFAST_CACHE_DIR/guided_step.json, else $XDG_CACHE_HOME/sgfast/..., else
    ~/.cache/sgfast/..."""
    folder = os.environ.get("SGFAST_CACHE_DIR")
    if not folder:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        folder = os.path.join(base, "sgfast")
    return Path(folder) / CACHE_FILE


@dataclass(frozen=True)
class FormKey:
    """Everything that changes which form is faster."""

    device: str  # the GPU's name, or the device type
    unet: str  # a digest of the UNet's class and config
    latents: tuple  # (batch, channels, height, width)
    dtype: str
    cuda_graph: bool
    compiled: bool
    layers: tuple  # the captured layers (and the feature layer, when read): where the backward starts
    features: bool  # whether the edits read decoder features (the backward then starts there)
    torch: str = torch.__version__

    def text(self):
        """The key as the cache file holds it (one readable line)."""
        shape = "x".join(str(n) for n in self.latents)
        return " | ".join([
            self.device, f"unet {self.unet}", f"latents {shape}", self.dtype,
            "cuda graph" if self.cuda_graph else "eager", "compiled" if self.compiled else "not compiled",
            f"layers {digest(self.layers)}", "features" if self.features else "maps only", f"torch {self.torch}",
        ])


def digest(value):
    return hashlib.sha1(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:12]


def device_name(device):
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return device.type


def form_key(unet, latents, *, layers, features, cuda_graph=False, compiled=False):
    config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}  # not where it was loaded from
    return FormKey(
        device=device_name(latents.device), unet=digest([type(unet).__name__, config]), latents=tuple(latents.shape),
        dtype=str(latents.dtype).replace("torch.", ""), cuda_graph=bool(cuda_graph), compiled=bool(compiled),
        layers=tuple(layers), features=bool(features),
    )


@dataclass
class FormChoice:
    """A resolved choice: the form, where it came from ("measured", "memory", "file", "fixed",
    "no CFG", or "explicit" for guided_step="split"/"batched"), and the timings behind it."""

    form: str
    source: str
    seconds: dict = field(default_factory=dict)  # {form: median seconds of its step}, when measured
    key: str = None


def wall_timer(run, forms, device, repeats=REPEATS):
    """{form: median seconds} of `run(form)`: one warm-up run each, then `repeats` interleaved runs
    (the device synchronised around each, so that the times are the device's)."""
    cuda = torch.device(device).type == "cuda"

    def once(form):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        run(form)
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    for form in forms:
        once(form)
    samples = {form: [] for form in forms}
    for _ in range(repeats):
        for form in forms:
            samples[form].append(once(form))
    return {form: statistics.median(s) for form, s in samples.items()}


class StepFormChooser:
    """Chooses and remembers the form of `guided_step="auto"`.

    `timer(run, forms, device) -> {form: seconds}` times `run(form)` (default `wall_timer`; tests
    inject their own); `path`: the cache file (default `cache_path()`, read when first needed);
    `fixed`: {device type: form} never measured (default `FIXED`). A cache file that cannot be read
    is ignored with a warning (and replaced by the next write); one that cannot be written leaves the
    choice in memory for this process, with a warning. Neither fails the call."""

    def __init__(self, timer=wall_timer, path=None, fixed=None):
        self.timer = timer
        self._path = None if path is None else Path(path)
        self.fixed = FIXED if fixed is None else dict(fixed)
        self.memory = {}  # key text -> FormChoice
        self.measurements = 0  # how many keys were measured (tests read it)
        self._warned = set()  # one warning per cache file and trouble

    @property
    def path(self):
        return self._path if self._path is not None else cache_path()

    def known(self, key, device_type):
        """The choice for `key` without measuring (fixed, memory, file), or None."""
        if device_type in self.fixed:
            return FormChoice(self.fixed[device_type], "fixed", key=key.text())
        text = key.text()
        if text in self.memory:
            remembered = self.memory[text]
            return FormChoice(remembered.form, "memory", dict(remembered.seconds), text)
        entry = self._read().get(text)
        if entry is not None:
            choice = FormChoice(entry["form"], "file", dict(entry.get("seconds") or {}), text)
            self.memory[text] = choice
            return choice
        return None

    def choose(self, key, device, run):
        """The form for `key`: known, else measured now by timing `run(form)` for both forms."""
        device = torch.device(device)
        choice = self.known(key, device.type)
        if choice is not None:
            return choice
        seconds = self.timer(run, FORMS, device)
        form = min(FORMS, key=lambda f: (seconds[f], FORMS.index(f)))  # a tie goes to split
        choice = FormChoice(form, "measured", {f: float(seconds[f]) for f in FORMS}, key.text())
        self.measurements += 1
        self.memory[key.text()] = choice
        self._write(key, choice)
        return choice

    # -- the file -------------------------------------------------------------------------------

    def _read(self):
        path = self.path
        try:
            text = path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as error:
            self._warn(("read", path), f"cannot read the guided-step cache {path} ({error}); choosing again")
            return {}
        try:
            data = json.loads(text)
            choices = data["choices"]
            if data.get("version") != CACHE_VERSION or not isinstance(choices, dict):
                raise ValueError(f"version {data.get('version')!r}, expected {CACHE_VERSION}")
            return {k: v for k, v in choices.items() if isinstance(v, dict) and v.get("form") in FORMS}
        except (ValueError, KeyError, TypeError) as error:
            self._warn(("corrupt", path), f"the guided-step cache {path} is not a valid cache file ({error}); "
                       "ignoring it (the next choice rewrites it)")
            return {}

    def _write(self, key, choice):
        path = self.path
        choices = self._read()
        choices[key.text()] = dict(
            form=choice.form, seconds=choice.seconds, measured=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            key=_plain(asdict(key)),
        )
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(dict(version=CACHE_VERSION, choices=choices), indent=1, sort_keys=True) + "\n")
            os.replace(tmp, path)  # never a half-written file
        except OSError as error:
            self._warn(("write", path), f"cannot write the guided-step cache {path} ({error}); the choice "
                       f"({choice.form}) holds for this process only (set SGFAST_CACHE_DIR to a writable folder to keep it)")

    def _warn(self, trouble, message):
        if trouble not in self._warned:
            self._warned.add(trouble)
            warnings.warn(f"sgfast: {message}", RuntimeWarning, stacklevel=4)


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class AutoForm:
    """`guided_step="auto"` of one pipeline: its chooser, and what the pipeline knows of itself
    (compiled or not) that the key needs."""

    def __init__(self, chooser=None, compiled=False):
        self.chooser = chooser if chooser is not None else default_chooser()
        self.compiled = bool(compiled)

    def choose(self, call, latent_in, do_cfg, run, cuda_graph):
        """The FormChoice of `call` (a GuidedCall), measured by `run(form)` where it must be.
        Without CFG both forms are the same pass: split, unmeasured."""
        if not do_cfg:
            return FormChoice("split", "no CFG")
        layers = tuple(call.capture.layers) + ((call.capture.feature_layer,) if call.features else ())
        key = form_key(call.pipe.unet, latent_in, layers=layers, features=call.features,
                       cuda_graph=cuda_graph, compiled=self.compiled)
        # The UNet draws no random numbers; the fork makes sure of it for the CPU's and (eager) the
        # device's generators. A CUDA graph capture is left alone: it registers the generator itself.
        devices = [latent_in.device.index or 0] if latent_in.device.type == "cuda" and not cuda_graph else []
        with torch.random.fork_rng(devices=devices):
            return self.chooser.choose(key, latent_in.device, run)


_DEFAULT = None


def default_chooser():
    """The process's chooser (one memory shared by every pipeline)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = StepFormChooser()
    return _DEFAULT
