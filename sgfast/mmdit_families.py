"""The MMDiT families: diffusers' StableDiffusion3Pipeline (SD3-medium, SD3.5-medium and -large) and
FluxPipeline (FLUX.1-dev, guidance-distilled, and FLUX.1-schnell).

What differs between them for self-guidance: where a word's text tokens sit in the joint sequence,
which batch rows of a transformer call are the conditional ones, which blocks are captured by
default, and the image-token grid. Sampling itself is diffusers' own loop (sgfast.mmdit_pipeline).
"""

import inspect

from diffusers import FluxPipeline, StableDiffusion3Pipeline

from sgfast.mmdit_capture import block_order, feeding_module, joint_attention_layers
from sgfast.trace import PromptWords

CLIP_POSITIONS = 77  # SD3's CLIP part of the text sequence, before T5's tokens


def t5_words(tokenizer, prompt, max_length):
    """(words, positions) of `prompt` as a T5 (sentencepiece) tokenizer splits it: a word starts at
    each piece that carries the word-start mark "▁"; the end token ends the prompt."""
    ids = tokenizer(prompt, padding="max_length", max_length=max_length, truncation=True).input_ids
    words, positions = [], []
    for position, token_id in enumerate(ids):
        if token_id in (tokenizer.eos_token_id, tokenizer.pad_token_id):
            break
        piece = tokenizer.convert_ids_to_tokens(token_id)
        # A bare mark "▁" is a word start whose letters follow as pieces of their own.
        after_bare_mark = positions and [tokenizer.convert_ids_to_tokens(ids[p]) for p in positions[-1]] == ["▁"]
        if not positions or (piece.startswith("▁") and not after_bare_mark):
            positions.append([position])
        else:
            positions[-1].append(position)
    for pieces in positions:
        words.append(tokenizer.decode([ids[p] for p in pieces]).strip().lower())
    return words, positions


def merged_words(prompt, clip, t5, t5_offset):
    """SD3's words: CLIP's (as edits name them), each with its CLIP positions and, where T5 reads the
    same word at the same place in the word order, its T5 pieces (offset past CLIP's 77 positions).
    Words are matched in order; one T5 splits otherwise keeps its CLIP positions only."""
    words, positions = list(clip.words), [list(p) for p in clip.positions]
    t5_words_, t5_positions = t5
    j = 0
    for i, word in enumerate(words):
        for k in range(j, len(t5_words_)):
            if t5_words_[k] == word:
                positions[i] += [t5_offset + p for p in t5_positions[k]]
                j = k + 1
                break
    return PromptWords(prompt, words, positions)


class StableDiffusion3:
    """StableDiffusion3Pipeline: the joint sequence is [image, text]; text is 77 CLIP positions (CLIP-L
    and CLIP-G hidden states side by side) then T5's `max_sequence_length`. Batched CFG: the first
    half of a call's rows is the negative prompt's."""

    name = "Stable Diffusion 3"
    pipeline_class = StableDiffusion3Pipeline
    cfg_argument = "guidance_scale"  # the call argument whose value above 1 turns CFG on
    # The family's own call arguments a trace records, besides the size, schedule, guidance scale and
    # negative prompt (max_sequence_length also sets which T5 pieces a word's map reads).
    recorded_arguments = ("negative_prompt_2", "negative_prompt_3", "max_sequence_length", "skip_guidance_layers",
                          "skip_layer_guidance_scale", "skip_layer_guidance_stop", "skip_layer_guidance_start", "mu")

    def __init__(self, pipe):
        self.pipe = pipe

    @property
    def transformer(self):
        return self.pipe.transformer

    def prompt_words(self, prompt, max_sequence_length):
        clip = PromptWords.from_tokenizer(self.pipe.tokenizer or self.pipe.tokenizer_2, prompt)
        if getattr(self.pipe, "tokenizer_3", None) is None or self.pipe.text_encoder_3 is None:
            return clip  # no T5: diffusers fills its part with zeros
        return merged_words(prompt, clip, t5_words(self.pipe.tokenizer_3, prompt, max_sequence_length), CLIP_POSITIONS)

    def default_layers(self):
        """The joint blocks from a quarter to half of the depth (SD3-medium: blocks 6-11 of 24): the
        backward stops at half depth (see docs/mmdit.md for the FLOP floor behind it)."""
        layers = list(joint_attention_layers(self.transformer))
        depth = len(layers)
        start, stop = depth // 4, max(depth // 2, depth // 4 + 1)
        return layers[start:stop]

    def default_feature_layer(self, layers):
        return feeding_module(self.transformer, layers)

    def grid(self, height, width):
        """(rows, columns) of the image tokens."""
        patch = self.transformer.config.patch_size
        factor = self.pipe.vae_scale_factor * patch
        return height // factor, width // factor

    def size(self, call):
        default = self.pipe.default_sample_size * self.pipe.vae_scale_factor
        return call["height"] or default, call["width"] or default

    def do_cfg(self, call):
        return call["guidance_scale"] > 1

    def cfg_scale(self, call):
        return call["guidance_scale"]

    def cond_rows(self, rows, call):
        """The conditional rows of a transformer call with `rows` rows."""
        return slice(rows // 2, rows) if self.do_cfg(call) else slice(0, rows)

    def combine(self, prediction, call):
        """The step's prediction as diffusers makes it of one transformer call's output (CFG)."""
        if not self.do_cfg(call):
            return prediction
        uncond, cond = prediction.chunk(2)
        return uncond + call["guidance_scale"] * (cond - uncond)

    def check_repeats(self, call):
        """Repeated steps run the step's prediction again inside the transformer call; a step made of
        more than that call (skip-layer guidance's extra pass) cannot repeat."""
        if call["skip_guidance_layers"] is not None:
            raise ValueError("guidance_repeats cannot run with skip_guidance_layers (its extra pass is a call of its own); "
                             "use guidance_repeats=1 or leave skip_guidance_layers out")

    def is_side_call(self, kwargs, first_in_step):
        """Calls that are not the step's prediction: skip-layer guidance's extra pass."""
        return kwargs.get("skip_layers") is not None or not first_in_step

    def settings(self, call):
        """What a trace records of the family's own arguments (a call with the trace takes them)."""
        return {name: call[name] for name in self.recorded_arguments}

    def encode_image(self, pixels):
        """The clean latents of `pixels` ([-1, 1]) as the transformer sees them: the inverse of the
        pipeline's decoding, latents / scaling_factor + shift_factor."""
        vae = self.pipe.vae
        latents = vae.encode(pixels.to(vae.dtype)).latent_dist.mode()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * vae.config.scaling_factor).to(self.transformer.dtype)


class Flux(StableDiffusion3):
    """FluxPipeline: the joint sequence is [text, image], text is T5 only (CLIP gives the pooled vector);
    guidance-distilled FLUX.1-dev makes one conditional pass per step (its guidance_scale is an
    embedding); true CFG (`true_cfg_scale > 1` with a negative prompt) is a second, separate pass."""

    name = "FLUX.1"
    pipeline_class = FluxPipeline
    cfg_argument = "true_cfg_scale"
    recorded_arguments = ("negative_prompt_2", "true_cfg_scale", "max_sequence_length")

    def prompt_words(self, prompt, max_sequence_length):
        words, positions = t5_words(self.pipe.tokenizer_2, prompt, max_sequence_length)
        return PromptWords(prompt, words, positions)

    def default_layers(self):
        """The second half of the double-stream blocks (FLUX.1-dev: 9-18 of 19), none of the single-stream
        ones: the backward runs through a third of the model (see docs/mmdit.md)."""
        double = [name for name in joint_attention_layers(self.transformer) if name.startswith("transformer_blocks.")]
        return double[len(double) // 2:]

    def grid(self, height, width):
        factor = self.pipe.vae_scale_factor * 2  # latents packed 2x2 into tokens
        return height // factor, width // factor

    def do_cfg(self, call):
        negative = call["negative_prompt"] is not None or call["negative_prompt_embeds"] is not None
        return call["true_cfg_scale"] > 1 and negative

    def cfg_scale(self, call):
        return call["true_cfg_scale"]

    def cond_rows(self, rows, call):
        return slice(0, rows)  # the conditional pass is a call of its own

    def combine(self, prediction, call):
        return prediction  # one conditional call: its output is the step's prediction

    def check_repeats(self, call):
        if self.do_cfg(call):
            raise ValueError("guidance_repeats cannot run with true CFG (true_cfg_scale > 1 with a negative prompt: the "
                             "negative pass is a call of its own); use guidance_repeats=1 or true_cfg_scale=1")

    def is_side_call(self, kwargs, first_in_step):
        return not first_in_step  # the negative prompt's pass comes second

    def encode_image(self, pixels):
        latents = super().encode_image(pixels)
        return self.pipe._pack_latents(latents, *latents.shape)  # 2x2 patches into tokens, as the pipeline packs


MMDIT_FAMILIES = (StableDiffusion3, Flux)


def mmdit_family_of(pipe):
    """The MMDiT adapter of `pipe`, or None for a pipeline of another kind."""
    for family in MMDIT_FAMILIES:
        if isinstance(pipe, family.pipeline_class):
            return family(pipe)
    return None


def call_arguments(pipe, prompt, kwargs):
    """Every argument of the pipeline's own __call__, with its defaults: an unknown one is the TypeError
    Python raises for it."""
    signature = inspect.signature(type(pipe).__call__)
    bound = signature.bind(pipe, prompt, **kwargs)
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    arguments.pop("self")
    return arguments


__all__ = ["StableDiffusion3", "Flux", "MMDIT_FAMILIES", "mmdit_family_of", "call_arguments", "block_order"]
