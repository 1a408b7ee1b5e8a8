"""The benchmark's rows: ways to make a guided image from the same model, prompt, seed, resolution
and step count, each driven through its own public API.

- `plain`: the wrapped diffusers StableDiffusionPipeline, no guidance (the unit);
- `attend_excite`: diffusers' StableDiffusionAttendAndExcitePipeline on the same components,
  exciting the word our move edit moves;
- `sgfast`: SelfGuidancePipeline in a mode ("reference", "fast", "fast" compiled) with the bare
  move (`keep_others=False`) or the paper's full move (move + keep shape + keep appearance).

Every runner offers the same three calls: `unguided(n, batch)` (n steps, none guided),
`guided(n, batch)` (n steps, every one guided) and `image(n, batch)` (the method's own schedule,
decoded). Per-step costs are a call's cost divided by n.
"""

from dataclasses import asdict, dataclass

import torch

from benchmarks.models import EDITED_WORD, PROMPT, SEED

EDITS = {
    "move": "move",
    "move_keep": "move + keep shape + keep appearance",
}


@dataclass(frozen=True)
class Row:
    kind: str  # "plain" | "attend_excite" | "sgfast"
    mode: str = None  # sgfast mode
    compile: bool = False
    edit: str = None  # "move" | "move_keep"

    @property
    def name(self):
        if self.kind == "plain":
            return "diffusers plain (no guidance)"
        if self.kind == "attend_excite":
            return "diffusers Attend-and-Excite"
        mode = self.mode + (" compiled" if self.compile else "")
        return f"sgfast {mode}: {EDITS[self.edit]}"

    @property
    def key(self):
        if self.kind != "sgfast":
            return self.kind
        return f"sgfast_{self.mode}{'_compiled' if self.compile else ''}_{self.edit}"

    def to_dict(self):
        return asdict(self)


def sgfast_support():
    """{"fast": bool, "compile": bool}: what SelfGuidancePipeline.from_pipe accepts in this checkout
    (a TypeError or an unknown-mode ValueError means not yet), tried on a throwaway tiny pipeline."""
    from sgfast import SelfGuidancePipeline
    from sgfast.testing import tiny_pipeline

    support = {}
    for name, kwargs in (("fast", dict(mode="fast")), ("compile", dict(mode="fast", compile=True))):
        try:
            SelfGuidancePipeline.from_pipe(tiny_pipeline(), **kwargs)
            support[name] = True
        except (TypeError, ValueError):
            support[name] = False
    return support


def all_rows(support, compile_rows=True):
    rows = [Row("plain"), Row("attend_excite")]
    modes = [("reference", False)]
    if support.get("fast"):
        modes.append(("fast", False))
        if support.get("compile") and compile_rows:
            modes.append(("fast", True))
    for mode, compiled in modes:
        for edit in EDITS:
            rows.append(Row("sgfast", mode, compiled, edit))
    return rows


def generator(device):
    return torch.Generator(device="cpu" if torch.device(device).type == "meta" else device).manual_seed(SEED)


def _prompts(batch):
    return PROMPT if batch == 1 else [PROMPT] * batch


class PlainRunner:
    guided_available = False

    def __init__(self, pipe, row, steps):
        self.pipe, self.row, self.steps = pipe, row, steps
        self.device = pipe._execution_device

    def unguided(self, n, batch=1, output_type="latent"):
        return self.pipe(
            _prompts(batch), num_inference_steps=n, generator=generator(self.device), output_type=output_type
        ).images

    def image(self, n, batch=1):
        return self.unguided(n, batch, output_type="np")

    def layers(self):
        return []

    def attention_bytes(self):
        return 0


class AttendExciteRunner:
    """Attend-and-Excite with its defaults scaled to the step count: it guides the first half of the
    steps (max_iter_to_alter 25 of 50) and refines at 0, 1/5 and 2/5 of the way (thresholds
    {0: 0.05, 10: 0.5, 20: 0.8} of 50), at most 20 iterations each. Its maps come from the layers at
    `attn_res` (the pipeline's (16, 16) for SD1.x at 512px)."""

    guided_available = True

    def __init__(self, pipe, row, steps):
        from diffusers import StableDiffusionAttendAndExcitePipeline

        from benchmarks.flops import attend_excite_attn_res, attend_excite_layers, token_index

        self.row, self.steps = row, steps
        self.ae = StableDiffusionAttendAndExcitePipeline(
            vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
            scheduler=pipe.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        self.ae.set_progress_bar_config(disable=True)
        self.pipe = pipe
        self.device = pipe._execution_device
        latent = pipe.unet.config.sample_size
        self.attn_res = attend_excite_attn_res(pipe.unet, latent)
        self._layers = attend_excite_layers(pipe.unet, latent, self.attn_res)
        self.index = token_index(self.ae, EDITED_WORD)

    @staticmethod
    def schedule(n):
        return dict(
            max_iter_to_alter=round(25 * n / 50),
            thresholds={round(k * n / 50): v for k, v in {0: 0.05, 10: 0.5, 20: 0.8}.items()},
        )

    def _call(self, n, batch, output_type, max_iter_to_alter, thresholds):
        indices = [self.index] if batch == 1 else [[self.index]] * batch
        return self.ae(
            _prompts(batch), token_indices=indices, num_inference_steps=n, generator=generator(self.device),
            output_type=output_type, attn_res=self.attn_res, max_iter_to_alter=max_iter_to_alter, thresholds=thresholds,
        ).images

    def unguided(self, n, batch=1, output_type="latent"):
        # Its unguided steps still run the conditional pass with gradients on (to compute the loss).
        return self._call(n, batch, output_type, 0, {})

    def guided(self, n, batch=1, output_type="latent"):
        return self._call(n, batch, output_type, n, {})

    def image(self, n, batch=1):
        return self._call(n, batch, "np", **self.schedule(n))

    def layers(self):
        return self._layers

    def attention_bytes(self):
        """The maps its attention store holds after a guided step (all heads, at attn_res)."""
        self.guided(1)
        store = self.ae.attention_store.attention_store
        return sum(t.numel() * t.element_size() for maps in store.values() for t in maps)


class SgfastRunner:
    """SelfGuidancePipeline with the paper's schedule. The unedited generation's trace is recorded
    once and passed as `trace=` (so an edit costs only the edited pass, as when a user edits an
    image they have already generated)."""

    guided_available = True

    def __init__(self, pipe, row, steps, step_call=None, references=None, **options):
        from sgfast import SelfGuidancePipeline

        # The paper's settings whatever the model's folder holds: the rows time the paper's schedule and
        # its full move (keep shape + keep appearance). `options`: more from_pipe arguments
        # (guided_step, cuda_graph, step_forms). `references`: {steps: trace} another runner on the same
        # pipeline recorded (an unedited trace does not depend on the runner's options).
        kwargs = dict(mode=row.mode, settings="paper", **options)
        if row.compile:
            kwargs["compile"] = True
        self.sg = SelfGuidancePipeline.from_pipe(pipe, **kwargs)
        self.pipe, self.row, self.steps = pipe, row, steps
        self.device = pipe._execution_device
        # A trace is the reference of a call with its own step count: one per count the runner uses
        # (1 for the FLOP count, `steps` for images, `step_call` for per-step times), made here so that
        # no timed or counted call includes one.
        counts = {1, steps} | ({step_call} if step_call else set())
        self.references = dict(references or {})
        for n in sorted(counts - set(self.references)):
            self.references[n] = self.sg(PROMPT, num_inference_steps=n, generator=generator(self.device),
                                         output_type="latent").trace

    def edits(self):
        from sgfast import move

        keep = self.row.edit == "move_keep"
        return [move(EDITED_WORD, dx=0.25)] if keep else [move(EDITED_WORD, dx=0.25, keep_others=False)]

    def _trace(self, batch, n):
        if n not in self.references:
            raise ValueError(
                f"no reference trace of {n} steps: this runner recorded {sorted(self.references)} "
                "(pass the per-step call's count as step_call when building it)"
            )
        reference = self.references[n]
        return reference if batch == 1 else [reference] * batch

    def unguided(self, n, batch=1, output_type="latent"):
        return self.sg(
            _prompts(batch), num_inference_steps=n, generator=generator(self.device), record_trace=False,
            output_type=output_type,
        ).images

    def guided(self, n, batch=1, output_type="latent"):
        return self.sg(
            _prompts(batch), edits=self.edits(), trace=self._trace(batch, n), num_inference_steps=n,
            guidance_schedule=[True] * n, generator=generator(self.device), output_type=output_type,
        )

    def image(self, n, batch=1):
        return self.sg(
            _prompts(batch), edits=self.edits(), trace=self._trace(batch, n), num_inference_steps=n,
            generator=generator(self.device), output_type="np",
        )

    def layers(self):
        return list(self.sg.layers)

    def attention_bytes(self):
        """Bytes the capture holds after a guided conditional pass (the selected words' maps, and
        the features when an edit reads appearance)."""
        from benchmarks.flops import sgfast_step

        pipe = self.pipe
        cond, uncond = pipe.encode_prompt(PROMPT, self.device, 1, True)
        latents = self.references[self.steps].latents.to(self.device, cond.dtype)
        pipe.scheduler.set_timesteps(self.steps, device=self.device)
        timestep = pipe.scheduler.timesteps[1]
        recorded = []
        sgfast_step(self.sg, self.edits(), self.references[self.steps], latents, timestep, cond, uncond, recorded)
        return recorded[0]


def runner(pipe, row, steps, step_call=None):
    """The row's runner; `step_call`: the step count of per-step timed calls, where it differs from `steps`."""
    if row.kind == "sgfast":
        return SgfastRunner(pipe, row, steps, step_call)
    return {"plain": PlainRunner, "attend_excite": AttendExciteRunner}[row.kind](pipe, row, steps)
