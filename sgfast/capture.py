"""Selective capture of cross-attention maps and decoder features.

Only the configured layers (`from_pipe(layers=...)`) get our processor; every other layer keeps its
own, untouched; the edits choose which tokens are recorded. A captured layer still computes its
output with scaled-dot-product attention (xformers' memory-efficient attention when it is installed
and the UNet is on a GPU); next to it, it recomputes
(differentiably, from Q and K) the head-averaged probabilities of the selected tokens only, for the
conditional half of the batch only.
"""

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0, XFormersAttnProcessor

from sgfast.kernels.attention_stats import attention_stats


def cross_attention_layers(unet):
    """Name -> Attention module for every cross-attention layer of a UNet, in forward order."""
    return {
        name: module
        for name, module in unet.named_modules()
        if isinstance(module, Attention) and module.is_cross_attention
    }


def default_layers(unet):
    """Decoder cross-attention layers, leaving out the finest decoder resolution when there are three
    or more (for SD1.x at 512px: the 16x16 and 32x32 up blocks). The finest layers would make the
    backward run through the most expensive part of the UNet for little extra localisation."""
    layers = cross_attention_layers(unet)
    blocks = sorted({name.split(".")[1] for name in layers if name.startswith("up_blocks.")}, key=int)
    if len(blocks) >= 3:
        blocks = blocks[:-1]
    return [name for name in layers if name.startswith("up_blocks.") and name.split(".")[1] in blocks]


def default_feature_layer(unet, layers):
    """The decoder block whose output feeds the finest captured up block (its input features), so
    that appearance adds nothing to the backward's length. Falls back to that block itself."""
    up_indices = sorted({int(name.split(".")[1]) for name in layers if name.startswith("up_blocks.")})
    if not up_indices:
        return "up_blocks.0"
    finest = up_indices[-1]
    return f"up_blocks.{max(finest - 1, up_indices[0])}"


def resolve_layers(unet, names):
    """Expand layer names (exact cross-attention layer names or prefixes such as "up_blocks.1") into
    cross-attention layer names; an unknown name is an error listing what exists."""
    layers = cross_attention_layers(unet)
    if names is None:
        return default_layers(unet)
    if isinstance(names, str):
        names = [names]
    resolved = []
    for name in names:
        matches = [layer for layer in layers if layer == name or layer.startswith(name + ".")]
        if not matches:
            raise ValueError(
                f"unknown cross-attention layer {name!r}; this UNet has {len(layers)}: " + ", ".join(layers)
            )
        resolved += [layer for layer in matches if layer not in resolved]
    return resolved


def check_feature_layer(unet, name):
    modules = dict(unet.named_modules())
    if name not in modules or not name:
        blocks = [n for n in modules if n.count(".") == 1 and n.split(".")[0] in ("down_blocks", "up_blocks")]
        raise ValueError(f"unknown feature layer {name!r}; choose a UNet block such as: " + ", ".join(blocks))
    return modules[name]


def grid_size(tokens, latent_height, latent_width):
    """(H, W) of a layer's query grid from its sequence length and the latent size. Each of the UNet's
    downsamplers (stride-2 convolutions, padding 1) maps n to ceil(n / 2), so a layer k downsamples
    deep sees ceil(h / 2**k) x ceil(w / 2**k): odd sizes included (a 9x9 latent gives 5x5, then 3x3)."""
    height, width = latent_height, latent_width
    while height * width > tokens and (height > 1 or width > 1):
        height, width = -(-height // 2), -(-width // 2)
    if height * width != tokens:
        raise ValueError(f"cannot place {tokens} queries on a grid for latents {latent_height}x{latent_width}")
    return height, width


def xformers_attention(unet):
    """xformers' `memory_efficient_attention` when it is installed and `unet` is on a GPU, else None
    (xformers has no CPU kernels)."""
    if next(unet.parameters()).device.type != "cuda":
        return None
    try:
        from xformers.ops import memory_efficient_attention
    except ImportError:
        return None
    return memory_efficient_attention


class RecordingDone(Exception):
    """Raised inside the UNet once every captured layer has recorded, when the recording asked to stop."""


# Processors whose output ours reproduces (plain attention); any other (IP-Adapter, prompt-to-prompt,
# a user's own) does something ours would drop.
PLAIN_PROCESSORS = (AttnProcessor, AttnProcessor2_0, XFormersAttnProcessor)


class CaptureAttnProcessor:
    """Cross-attention processor of a captured layer: SDPA for the output (as diffusers'
    AttnProcessor2_0), plus the selected tokens' head-averaged maps when the capture is recording."""

    def __init__(self, capture, name):
        self.capture = capture
        self.name = name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        residual = hidden_states
        batch = hidden_states.shape[0]
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (x.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value))

        if self.capture.recording:
            self.capture.record_attention(self.name, query, key, attn.scale)

        if attention_mask is None and self.capture.attention is not None:
            # xformers takes and returns [B, N, heads, d]; the scale is its default, d ** -0.5, as SDPA's.
            out = self.capture.attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
        else:
            if attention_mask is not None:
                attention_mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch)
                attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
            out = out.transpose(1, 2)
        out = out.reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class Capture:
    """Installs capture processors on `layers` and a forward hook on `feature_layer` (or none) for the
    duration of a `with` block, restoring the original processors afterwards, also after an error.

    While `recording(...)` is active, each captured layer stores `maps[layer]`: `[B, S, H, W]`
    head-averaged probabilities of the selected tokens, averaged within each selected word
    (`word_weights`, `[B, S, T_sel]`), and the hook stores `features`: `[B, C, H, W]`.
    """

    def __init__(self, unet, layers, feature_layer=None, impl="torch", cut_graph=False):
        self.unet = unet
        self.layers = list(layers)
        self.feature_layer = feature_layer
        self.impl = impl  # attention statistics: "torch" (reference), "triton" or "auto" (fused on CUDA)
        # Stop building the autograd graph once the last captured layer has recorded: the energy
        # reads nothing after it, so the rest of the UNet need save no activations.
        self.cut_graph = cut_graph
        modules = cross_attention_layers(unet)
        for name in self.layers:
            if name not in modules:
                raise ValueError(f"unknown cross-attention layer {name!r}")
            attn = modules[name]
            if attn.spatial_norm is not None or attn.group_norm is not None:
                raise ValueError(f"layer {name!r} uses a normalisation the capture does not support")
        self.modules = {name: modules[name] for name in self.layers}
        self.feature_module = check_feature_layer(unet, feature_layer) if feature_layer else None
        self.recording = False
        self.stop = False
        self.can_stop_early = True  # the pipeline turns it off for a compiled UNet
        self.maps, self.features = {}, None
        self._saved, self._hook = None, None

    def foreign_processors(self):
        """{layer: processor class name} of captured layers whose processor is not plain attention."""
        return {
            name: type(module.processor).__name__
            for name, module in self.modules.items()
            if type(module.processor) not in PLAIN_PROCESSORS + (CaptureAttnProcessor,)
        }

    def check_processors(self):
        """Refuse to replace processors that do more than plain attention: their work would be lost."""
        foreign = self.foreign_processors()
        if foreign:
            raise ValueError(
                "self-guidance replaces the attention processors of the captured layers, and these have their own: "
                + ", ".join(f"{n} ({c})" for n, c in foreign.items())
                + "; restore plain attention there (unet.set_default_attn_processor()) or capture other layers (layers=...)"
            )

    def __enter__(self):
        self.check_processors()
        self._saved = {name: module.processor for name, module in self.modules.items()}
        self.attention = xformers_attention(self.unet)  # per call: the UNet may have moved; None: SDPA
        try:
            for name, module in self.modules.items():
                module.set_processor(CaptureAttnProcessor(self, name))
            if self.feature_module is not None:
                self._hook = self.feature_module.register_forward_hook(self._record_features)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        for name, processor in (self._saved or {}).items():
            self.modules[name].set_processor(processor)
        if self._hook is not None:
            self._hook.remove()
        self._saved, self._hook, self.recording = None, None, False
        self.maps, self.features = {}, None
        return False

    @contextmanager
    def record(self, token_index, word_weights, latent_size, batch_slice=slice(None), features=True, stop=False,
               layout=None, tokens_checked=False):
        """Record maps of the tokens `token_index` ([B, T_sel] key indices) grouped into words by
        `word_weights` ([B, S, T_sel]; None: one token per word, the identity), for the batch rows
        `batch_slice` of each UNet call, and the feature layer's output if `features`. `stop`: raise
        RecordingDone inside the UNet as soon as everything is recorded (a caller that needs the maps
        only skips the rest of the UNet). `layout` (sgfast.energies.Layout): maps are kept flat,
        `[B, S, N]` padded to the layout's length, for the batched energies. `tokens_checked`: the
        caller checked the token indices' range on the host (no device read per layer)."""
        self.stop = stop
        self.token_index, self.word_weights = token_index, word_weights
        self.latent_size, self.batch_slice = latent_size, batch_slice
        self.layout, self.tokens_checked = layout, tokens_checked
        self.maps, self.features = {}, None
        self.want_features = features and self.feature_module is not None
        self.pending = set(self.layers) | ({self.feature_layer} if self.want_features else set())
        self.recording = True
        grad_mode = torch.is_grad_enabled()
        try:
            yield self
        finally:
            self.recording = False
            torch.set_grad_enabled(grad_mode)

    def captured_bytes(self):
        """Bytes of what the current recording holds (maps and features)."""
        tensors = list(self.maps.values()) + ([self.features] if self.features is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def _recorded(self, name):
        self.pending.discard(name)
        if self.pending:
            return
        if self.stop:
            raise RecordingDone
        if self.cut_graph:
            torch.set_grad_enabled(False)

    def record_attention(self, name, query, key, scale):
        query, key = query[self.batch_slice], key[self.batch_slice]
        height, width = grid_size(query.shape[2], *self.latent_size)
        _, word_maps = attention_stats(
            query, key, self.token_index, height, width, scale=scale, return_maps=True, impl=self.impl,
            check_tokens=not self.tokens_checked, return_sums=False,
        )
        if self.word_weights is not None:
            word_maps = torch.bmm(self.word_weights.to(word_maps.dtype), word_maps)
        # A fresh tensor, not a view: inductor on the CPU was seen to return wrong gradients for a
        # view stored as a side effect of the compiled forward.
        if self.layout is not None:
            expected = self.layout.grids[self.layers.index(name)]
            if (height, width) != expected:
                raise ValueError(f"layer {name!r} saw a {height}x{width} grid where {expected[0]}x{expected[1]} was expected")
            self.maps[name] = self.layout.pad(word_maps)
        else:
            self.maps[name] = word_maps.reshape(*word_maps.shape[:2], height, width).clone()
        self._recorded(name)

    def stacked_maps(self):
        """The flat maps of every captured layer, [L, B, S, N] (a `layout` recording)."""
        return torch.stack([self.maps[name] for name in self.layers])

    def _record_features(self, module, inputs, output):
        if self.recording and self.want_features:
            output = output[0] if isinstance(output, tuple) else output
            self.features = output[self.batch_slice]
            self._recorded(self.feature_layer)
