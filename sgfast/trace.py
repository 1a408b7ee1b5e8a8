"""Words of a prompt, and traces: the properties of a generation recorded step by step.

A trace holds, for every denoising step, each prompt word's attention maps at the captured layers
and its appearance vector. It is what edits take their targets from: the unedited reference of the
same prompt and seed, an earlier generation, or a real image.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from sgfast import properties


def at_least_float32(tensor):
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


@dataclass
class PromptWords:
    """The words of one prompt as the pipeline's tokenizer splits them, each with its token positions
    in the encoded prompt (position 0 is the start token)."""

    prompt: str
    words: list  # [str]
    positions: list  # [[int]] token positions of each word

    @classmethod
    def from_tokenizer(cls, tokenizer, prompt):
        ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
        words, positions, pieces = [], [], []
        for position, token_id in enumerate(ids):
            if token_id == tokenizer.bos_token_id:
                continue
            # Padding follows the end token; it may be a real token (SDXL's second tokenizer and
            # SD2's pad with "!"), so only the end token ends the prompt.
            if token_id == tokenizer.eos_token_id:
                break
            pieces.append(position)
            # CLIP's byte-level BPE marks the last piece of every word with "</w>".
            if tokenizer.convert_ids_to_tokens(token_id).endswith("</w>"):
                positions.append(pieces)
                pieces = []
        if pieces:  # a word cut off by truncation
            positions.append(pieces)
        for pieces in positions:
            words.append(tokenizer.decode([ids[p] for p in pieces]).strip().lower())
        return cls(prompt, words, positions)

    def index(self, word):
        """Index of `word` (its first occurrence); an unknown word is an error naming the prompt's words."""
        key = word.strip().lower()
        if key not in self.words:
            raise ValueError(f"word {word!r} is not in the prompt {self.prompt!r}; its words are: {self.words}")
        return self.words.index(key)


def selection(prompt_words, words, device):
    """Token indices and per-word averaging weights for capturing `words` of each prompt.

    Returns `token_index` [B, T_sel] and `word_weights` [B, S, T_sel] (each word's map is the mean of
    its sub-tokens' maps); rows are padded by repeating the first entry with zero weight.
    """
    batch = len(prompt_words)
    tokens = [[p for w in ws for p in pw.positions[pw.index(w)]] for pw, ws in zip(prompt_words, words)]
    width = max(len(t) for t in tokens)
    count = max(len(ws) for ws in words)
    token_index = torch.zeros(batch, width, dtype=torch.long)
    weights = torch.zeros(batch, count, width)
    for b, (pw, ws) in enumerate(zip(prompt_words, words)):
        token_index[b] = torch.tensor(tokens[b] + [tokens[b][0]] * (width - len(tokens[b])))
        column = 0
        for slot, word in enumerate(ws):
            n = len(pw.positions[pw.index(word)])
            weights[b, slot, column : column + n] = 1.0 / n
            column += n
    return token_index.to(device), weights.to(device)


class View:
    """The properties of one batch item at one step: maps per captured layer for a list of words,
    and the features for appearance. Energies are built from these; layers are averaged."""

    def __init__(self, words, maps, features=None, appearance=None, sharpness=10.0, slots=None):
        self.words = list(dict.fromkeys(words))  # the words this view shows
        self.slots = slots or {w: i for i, w in reversed(list(enumerate(words)))}  # word -> slot in `maps`
        self.maps = maps  # {layer: [S, H, W]}
        self.features = features  # [C, h, w] or None
        self._appearance = appearance  # precomputed [S, C] (a recorded trace) or None
        self.sharpness = sharpness

    def subset(self, words):
        """The same data, showing only `words` (what one edit reads)."""
        return View(words, self.maps, self.features, self._appearance, self.sharpness, self.slots)

    def _slot(self, word):
        if word not in self.slots:
            raise KeyError(f"word {word!r} was not recorded; recorded: {list(self.slots)}")
        return self.slots[word]

    def layer_maps(self, word):
        slot = self._slot(word)
        return [m[slot][None, None] for m in self.maps.values()]  # each [1, 1, H, W]

    def centroid(self, word):
        """[L, 2], one (x, y) per captured layer."""
        return torch.cat([properties.centroid(m)[0] for m in self.layer_maps(word)])

    def shape_centroid(self, word):
        """[L, 2]: the centroid of each layer's soft silhouette (the map thresholded, see `shape`)."""
        return torch.cat([properties.centroid(properties.shape(m, self.sharpness))[0] for m in self.layer_maps(word)])

    def size(self, word):
        """[L]."""
        return torch.cat([properties.size(m, self.sharpness)[0] for m in self.layer_maps(word)])

    def shape(self, word):
        """One [H, W] soft silhouette per layer."""
        return [properties.shape(m, self.sharpness)[0, 0] for m in self.layer_maps(word)]

    def mean_map(self, word, size):
        """The word's maps resized to `size` and averaged over layers: [1, 1, h, w]."""
        maps = [F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in self.layer_maps(word)]
        return torch.stack(maps).mean(0)

    def appearance(self, word):
        """[C]: mean feature inside the word's silhouette (mask from the layer-averaged map, detached)."""
        if self._appearance is not None:
            return self._appearance[self._slot(word)]
        if self.features is None:
            raise ValueError("appearance needs features: the capture has no feature layer")
        mask_map = self.mean_map(word, self.features.shape[-2:])
        features = at_least_float32(self.features[None])  # energies in fp32 even for an fp16 UNet
        return properties.appearance(mask_map.to(features.dtype), features, self.sharpness)[0, 0]


@dataclass
class TraceStep:
    maps: dict  # {layer: [S, H, W]} for every prompt word
    appearance: torch.Tensor = None  # [S, C]


@dataclass
class Trace:
    """A recorded generation (or real image) of one prompt: per timestep, every word's maps and
    appearance. Reusable as the reference or the source of any number of edits."""

    prompt: str
    words: list
    latents: torch.Tensor = None  # initial noise [1, C, h, w] of a generation (None for a real image)
    steps: dict = field(default_factory=dict)  # {timestep: TraceStep}, a repeated timestep's first call
    image_size: tuple = None
    # Every UNet call in order, [(timestep, TraceStep)]: PNDM and second-order schedulers call the UNet
    # twice at some timesteps, and an edit of the same generation reads each call's own record.
    calls: list = field(default_factory=list)
    # The generator state(s) the scheduler's step noise starts from, [(device, state)], so that an
    # edit of this generation on a stochastic scheduler draws the same step noise.
    noise_state: list = None
    # What the generation was called with (size, timesteps, guidance scale, negative prompt,
    # scheduler): an edit that reuses the trace as its unedited reference must match it.
    settings: dict = None
    # A photo's trace (sg.invert): the call arguments its edits use, its reconstruction and PSNR.
    inversion: dict = None
    # How the generation asked for its schedule ({"num_inference_steps": n}, {"timesteps": [...]} or
    # {"sigmas": [...]}): a call that takes the trace and leaves its schedule out asks the same.
    schedule: dict = None

    def add(self, timestep, maps, appearance):
        step = TraceStep(
            {layer: at_least_float32(m.detach()) for layer, m in maps.items()},
            None if appearance is None else at_least_float32(appearance.detach()),
        )
        self.steps.setdefault(int(timestep), step)
        self.calls.append((int(timestep), step))

    def view(self, timestep, sharpness=10.0, call=None):
        """The recorded properties of UNet call `call` when it was at `timestep`, else those nearest
        to `timestep`."""
        if not self.steps:
            raise ValueError("the trace is empty")
        if call is not None and call < len(self.calls) and self.calls[call][0] == int(timestep):
            step = self.calls[call][1]
        else:
            step = self.steps[min(self.steps, key=lambda t: abs(t - int(timestep)))]
        return View(self.words, step.maps, appearance=step.appearance, sharpness=sharpness)

    def nbytes(self):
        steps = [s for _, s in self.calls] or list(self.steps.values())
        tensors = [m for s in steps for m in s.maps.values()]
        tensors += [s.appearance for s in steps if s.appearance is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def index(self, word):
        key = word.strip().lower()
        if key not in self.words:
            raise ValueError(f"word {word!r} is not in the source prompt {self.prompt!r}; its words are: {self.words}")
        return key
