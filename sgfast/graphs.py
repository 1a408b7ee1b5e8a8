"""CUDA graphs of the guided model evaluation and of the plain CFG step.

`SelfGuidancePipeline.from_pipe(pipe, mode="fast", cuda_graph=True)`: each guided step's evaluation
(`GuidedCall.evaluate`: the unconditional pass, the conditional pass with the edits' maps, the
energy, its gradient to the latents, the noise combination) is captured once per (shapes, edits'
structure, settings) and replayed with static input buffers: the scaled latents, the timestep, the
text embeddings and the UNet's added inputs, this step's row of energy targets, the energy weights,
the token selection, the input scale and the term's scale. Plain steps likewise (the UNet at batch
2 and the CFG combination). The scheduler's step, and its `scale_model_input`, stay eager: they read
host-side tables that change every step.

What a graph cannot hold is refused, with the reason, before anything runs: a UNet that is not on a
CUDA device, a compiled UNet (use torch.compile's own "reduce-overhead" mode instead), reference mode.
`dry_run=True` runs the same buffers and keys eagerly on any device (what tests exercise on a CPU).
"""

import torch

WARMUP = 2  # eager runs on a side stream before capture (lazy initialisations, cuBLAS workspaces)


def _flatten(value, prefix=""):
    """[(path, tensor)] of the tensors in nested dicts / lists / tuples, and a hashable structure."""
    if isinstance(value, torch.Tensor):
        return [(prefix, value)], ("T", tuple(value.shape), value.dtype, str(value.device))
    if isinstance(value, dict):
        items, shape = [], []
        for key in sorted(value):
            sub, s = _flatten(value[key], f"{prefix}.{key}")
            items += sub
            shape.append((key, s))
        return items, ("D", tuple(shape))
    if isinstance(value, (list, tuple)):
        items, shape = [], []
        for n, v in enumerate(value):
            sub, s = _flatten(v, f"{prefix}[{n}]")
            items += sub
            shape.append(s)
        return items, ("L", type(value).__name__, tuple(shape))
    return [], ("V", repr(value))  # numbers, strings, None: part of the key (baked into the graph)


def _rebuild(value, tensors):
    """`value` with its tensors replaced, in `_flatten`'s order, by `tensors` (an iterator)."""
    if isinstance(value, torch.Tensor):
        return next(tensors)
    if isinstance(value, dict):
        return {key: _rebuild(value[key], tensors) for key in sorted(value)}
    if isinstance(value, (list, tuple)):
        return type(value)(_rebuild(v, tensors) for v in value)
    return value


class _Entry:
    """One captured graph: its static inputs, the function that fills them, its outputs."""

    def __init__(self, fn, inputs, structure, dry_run):
        self.structure, self.dry_run, self.fn = structure, dry_run, fn
        self.static = [x.detach().clone() for x in inputs]
        self.outputs, self.graph = None, None
        if dry_run:
            return
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(WARMUP):
                fn(self.static)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph):
                self.outputs = fn(self.static)
        except RuntimeError as error:  # a host read or an unsupported op inside the step: say which, stop
            raise RuntimeError(
                f"capturing the {structure[0]} step as a CUDA graph failed ({error}); something in the step "
                "reads the device on the host or cannot be captured: run without cuda_graph=True"
            ) from error

    def __call__(self, inputs):
        for buffer, value in zip(self.static, inputs):
            buffer.copy_(value)
        if self.dry_run:
            outputs = self.fn(self.static)
        else:
            self.graph.replay()
            outputs = self.outputs
        # Clones: the outputs' memory is the graph's, overwritten by the next replay.
        return tuple(o.clone() if isinstance(o, torch.Tensor) else o for o in outputs)


class StepGraphs:
    """The graphs of one pipeline, keyed by everything a graph bakes in."""

    def __init__(self, dry_run=False):
        self.dry_run = dry_run
        self.entries = {}
        self.captures = 0  # graphs captured (a test reads it: one per key, then replays)

    @classmethod
    def for_pipeline(cls, pipe, mode, compile=False, dry_run=False):
        """StepGraphs for `pipe`, or a ValueError saying why its steps cannot be graph-captured."""
        if mode != "fast":
            raise ValueError("cuda_graph=True needs mode='fast' (reference mode keeps the whole autograd graph of the UNet)")
        if compile:
            raise ValueError("cuda_graph=True and compile=True exclude each other: a compiled UNet captures its own "
                             "graphs with torch.compile(mode='reduce-overhead'); choose one")
        device = next(pipe.unet.parameters()).device
        if not dry_run:
            if not torch.cuda.is_available():
                raise ValueError("cuda_graph=True needs a CUDA GPU, and this machine has none (torch.cuda.is_available() "
                                 "is False); leave cuda_graph off here")
            if device.type != "cuda":
                raise ValueError(f"cuda_graph=True needs the UNet on a CUDA device, and it is on {device.type}; "
                                 "move the pipeline first (pipe.to('cuda'))")
        return cls(dry_run=dry_run)

    def _entry(self, key, fn, inputs, structure):
        if key not in self.entries:
            self.entries[key] = _Entry(fn, inputs, structure, self.dry_run)
            self.captures += 1
        return self.entries[key]

    def drop_form(self, form):
        """Forget the guided graphs of `form` (guided_step="auto" captured both to time them)."""
        for key in [k for k in self.entries if k[0] == "guided" and k[1] == form]:
            del self.entries[key]

    def run(self, call, latent_in, t, embeds, unet_kwargs, targets, input_scale, term_scale, settings, i):
        """`call.evaluate` of one guided step, replayed: (noise, energy, finite)."""
        plan = call.plan
        token_index, word_weights = call.tokens
        kwargs_tensors, kwargs_structure = _flatten(unet_kwargs)
        t = t if isinstance(t, torch.Tensor) else torch.tensor(t, device=latent_in.device)
        scalars = torch.tensor([input_scale, term_scale], dtype=torch.float32, device=latent_in.device)
        inputs = [latent_in, t, embeds, targets, plan.weights, token_index, scalars]
        inputs += [word_weights] if word_weights is not None else []
        inputs += [x for _, x in kwargs_tensors]
        structure = (
            "guided", call.form, tuple(sorted(settings.items())), kwargs_structure, word_weights is None,
            tuple(plan.kinds), tuple(sorted(plan.planes.items())), tuple(call.layout.grids), call.feature_size,
            call.features, any(call.custom), id(call.capture),
        )
        key = structure + tuple((tuple(x.shape), x.dtype) for x in inputs)

        def evaluate(static):
            latent, step, text, row, weights, index, scale = static[:7]
            rest = static[7:]
            weights_in = rest[0] if word_weights is not None else None
            kwargs = _rebuild(unet_kwargs, iter(rest[1:] if word_weights is not None else rest))
            saved = call.tokens
            call.tokens = (index, weights_in)
            try:
                return call.evaluate(latent, step, text, kwargs, row, weights, scale[0], scale[1], call=i, **settings)
            finally:
                call.tokens = saved

        if any(call.custom):
            raise ValueError("cuda_graph=True runs the built-in edits' batched energies; an Edit subclass with only "
                             f"energy() ({', '.join(type(e).__name__ for item in call.custom for e in item)}) cannot be captured")
        return self._entry(key, evaluate, inputs, structure)(inputs)

    def plain(self, pipe, latent_in, t, embeds, unet_kwargs, guidance_scale, do_cfg, guidance_rescale, combine):
        """The plain CFG step's UNet call and combination, replayed (the input already scaled)."""
        kwargs_tensors, kwargs_structure = _flatten(unet_kwargs)
        t = t if isinstance(t, torch.Tensor) else torch.tensor(t, device=latent_in.device)
        inputs = [latent_in, t, embeds] + [x for _, x in kwargs_tensors]
        structure = ("plain", do_cfg, float(guidance_scale), float(guidance_rescale), kwargs_structure, id(pipe.unet))
        key = structure + tuple((tuple(x.shape), x.dtype) for x in inputs)

        def step(static):
            latent, timestep, text = static[:3]
            kwargs = _rebuild(unet_kwargs, iter(static[3:]))
            with torch.no_grad():
                noise = pipe.unet(latent, timestep, encoder_hidden_states=text, return_dict=False, **kwargs)[0]
                if do_cfg:
                    uncond, cond = noise.chunk(2)
                    noise = combine(uncond, cond, guidance_scale, guidance_rescale)
            return (noise,)

        return self._entry(key, step, inputs, structure)(inputs)[0]
