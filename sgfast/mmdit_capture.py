"""Selective capture of word maps from the joint attention of MMDiT transformers (SD3 / SD3.5, FLUX.1).

An MMDiT block attends over image and text tokens together: SD3 puts the image tokens first, FLUX
the text first; FLUX applies rotary embeddings to both, SD3.5 and FLUX normalise Q and K (RMS norm).
A word's map is the image queries' attention on that word's text-token columns, taken after those
transforms, averaged over heads. Only the captured blocks get our processor (it computes the block's
output as diffusers' own processor does, op for op, and next to it the selected columns); every other
block keeps its own, and nothing is stored that no edit or trace reads.

The row normaliser (`softmax`): "joint" (default) divides by the sum over every key the query
attends to, image keys included: the map is the share of each image query's attention that goes to
the word, as the model applies it. "text" renormalises over the text keys only, as SD's
cross-attention softmax over its 77 keys does.
"""

import torch
from diffusers.models.attention_processor import JointAttnProcessor2_0
from diffusers.models.transformers.transformer_flux import (
    FluxAttnProcessor,
    _get_qkv_projections,
    apply_rotary_emb,
    dispatch_attention_fn,
)
import torch.nn.functional as F

from sgfast.capture import Capture, grid_size
from sgfast.kernels.joint_attention_stats import joint_attention_stats

SOFTMAXES = ("joint", "text")


def joint_attention_layers(transformer):
    """Name -> attention module of every block whose attention reads text keys, in forward order:
    SD3's joint blocks (`transformer_blocks.i.attn`; SD3.5-medium's second, image-only attention
    `attn2` is not one), FLUX's double-stream (`transformer_blocks.i.attn`) then single-stream
    blocks (`single_transformer_blocks.i.attn`)."""
    return {
        name: module
        for name, module in transformer.named_modules()
        if name.endswith(".attn") and name.count(".") == 2
        and name.split(".")[0] in ("transformer_blocks", "single_transformer_blocks")
    }


def resolve_joint_layers(transformer, names):
    """Layer names (exact, or a block prefix such as "transformer_blocks.3" or "single_transformer_blocks")
    as attention module names; an unknown name is an error listing what exists."""
    layers = joint_attention_layers(transformer)
    if isinstance(names, str):
        names = [names]
    resolved = []
    for name in names:
        matches = [layer for layer in layers if layer == name or layer.startswith(name + ".")]
        if not matches:
            raise ValueError(f"unknown joint-attention layer {name!r}; this transformer has {len(layers)}: " + ", ".join(layers))
        resolved += [layer for layer in matches if layer not in resolved]
    return [layer for layer in layers if layer in resolved]  # forward order


def block_order(transformer):
    """Every block of the transformer in forward order, as (name, module)."""
    blocks = [(f"transformer_blocks.{i}", b) for i, b in enumerate(transformer.transformer_blocks)]
    blocks += [(f"single_transformer_blocks.{i}", b) for i, b in enumerate(getattr(transformer, "single_transformer_blocks", []))]
    return blocks


def feeding_module(transformer, layers):
    """The module whose output feeds the block of the last captured layer: the block before it, or the
    image patch embedding before the first block. Appearance features from there add nothing to
    the backward's length."""
    last = layers[-1].rsplit(".", 1)[0]
    names = [name for name, _ in block_order(transformer)]
    index = names.index(last)
    if index > 0:
        return names[index - 1]
    return "x_embedder" if hasattr(transformer, "x_embedder") else "pos_embed"


def text_column_maps(query, key, token_index, image, text, scale, softmax="joint"):
    """Head-averaged attention of the image queries on the selected text keys: [B, T_sel, N_img].

    `query`, `key`: [B, heads, L, d] over the joint sequence; `image`, `text`: slices of it;
    `token_index`: [B, T_sel] positions within the text tokens. The probabilities are
    exp(q k_sel * scale - LSE) with LSE the row's log-sum-exp over the joint keys ("joint") or over
    the text keys only ("text"), in float32 at least."""
    dtype = torch.promote_types(query.dtype, torch.float32)
    q = query[:, :, image].to(dtype)
    keys = key.to(dtype) if softmax == "joint" else key[:, :, text].to(dtype)
    text_keys = key[:, :, text].to(dtype)
    index = token_index[:, None, :, None].expand(-1, text_keys.shape[1], -1, text_keys.shape[-1])
    selected = torch.gather(text_keys, 2, index)  # [B, heads, T_sel, d]
    lse = torch.logsumexp(q @ keys.transpose(-1, -2) * scale, dim=-1, keepdim=True)  # [B, heads, N, 1]
    probabilities = torch.exp(q @ selected.transpose(-1, -2) * scale - lse)  # [B, heads, N, T_sel]
    return probabilities.mean(1).transpose(1, 2)


class JointCaptureProcessor:
    """SD3's joint attention (diffusers' JointAttnProcessor2_0, op for op) plus the selected words' maps."""

    def __init__(self, capture, name):
        self.capture, self.name = capture, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        residual = hidden_states
        batch = hidden_states.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (x.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        text_query = attn.add_q_proj(encoder_hidden_states)
        text_key = attn.add_k_proj(encoder_hidden_states)
        text_value = attn.add_v_proj(encoder_hidden_states)
        text_query, text_key, text_value = (
            x.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for x in (text_query, text_key, text_value)
        )
        if attn.norm_added_q is not None:
            text_query = attn.norm_added_q(text_query)
        if attn.norm_added_k is not None:
            text_key = attn.norm_added_k(text_key)
        query = torch.cat([query, text_query], dim=2)
        key = torch.cat([key, text_key], dim=2)
        value = torch.cat([value, text_value], dim=2)
        if self.capture.recording:
            images = residual.shape[1]  # image tokens first
            self.capture.record_attention(self.name, query, key, slice(0, images), slice(images, None), head_dim**-0.5)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out, text_out = out[:, : residual.shape[1]], out[:, residual.shape[1]:]
        if not attn.context_pre_only:
            text_out = attn.to_add_out(text_out)
        out = attn.to_out[1](attn.to_out[0](out))
        return out, text_out


class FluxCaptureProcessor:
    """FLUX's attention (diffusers' FluxAttnProcessor, op for op: double-stream blocks with text inputs,
    single-stream blocks on the concatenated [text, image] sequence) plus the selected words' maps."""

    def __init__(self, capture, name, original):
        self.capture, self.name = capture, name
        self._attention_backend = getattr(original, "_attention_backend", None)
        self._parallel_config = getattr(original, "_parallel_config", None)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        query, key, value, text_query, text_key, text_value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            text_query = attn.norm_added_q(text_query.unflatten(-1, (-1, attn.head_dim)))
            text_key = attn.norm_added_k(text_key.unflatten(-1, (-1, attn.head_dim)))
            text_value = text_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([text_query, query], dim=1)
            key = torch.cat([text_key, key], dim=1)
            value = torch.cat([text_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        if self.capture.recording:
            images = self.capture.image_tokens  # text first: the last tokens are the image's
            texts = query.shape[1] - images
            self.capture.record_attention(self.name, query.transpose(1, 2), key.transpose(1, 2), slice(texts, None),
                                          slice(0, texts), attn.head_dim**-0.5)
        out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, backend=self._attention_backend,
                                    parallel_config=self._parallel_config)
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out
        text_out, out = out.split_with_sizes([encoder_hidden_states.shape[1], out.shape[1] - encoder_hidden_states.shape[1]], dim=1)
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        return out, attn.to_add_out(text_out.contiguous())


# Processors ours reproduces op for op; any other (IP-Adapter, a user's own) does something ours would drop.
PLAIN_JOINT_PROCESSORS = (JointAttnProcessor2_0, FluxAttnProcessor, JointCaptureProcessor, FluxCaptureProcessor)


class JointCapture(Capture):
    """Capture (sgfast.capture) for an MMDiT transformer: our processor on `layers` only, a forward hook
    on `feature_layer` (a module name; its image-stream output is the appearance features). While
    recording, `maps[layer]` is [B, S, H, W] per selected word and `features` [B, C, H, W], on the
    image-token grid (`latent_size` given to `record` is that grid)."""

    def __init__(self, transformer, layers, feature_layer=None, softmax="joint", impl="torch", cut_graph=False):
        """`impl`: "torch" (the reference, sgfast.mmdit_capture.text_column_maps), "triton" or "auto"
        (the fused op, Triton on CUDA; joint softmax only)."""
        if softmax not in SOFTMAXES:
            raise ValueError(f"softmax must be one of {SOFTMAXES}, got {softmax!r}")
        if impl != "torch" and softmax != "joint":
            raise ValueError(f"the fused op computes the joint softmax's maps; softmax={softmax!r} needs mode='reference'")
        modules = joint_attention_layers(transformer)
        for name in layers:
            if name not in modules:
                raise ValueError(f"unknown joint-attention layer {name!r}; this transformer has: " + ", ".join(modules))
        self.unet = transformer  # the name Capture's users read
        self.layers, self.modules = list(layers), {name: modules[name] for name in layers}
        self.flux = hasattr(transformer, "single_transformer_blocks")
        self.feature_layer, self.softmax, self.impl, self.cut_graph = feature_layer, softmax, impl, cut_graph
        self.feature_module = None
        if feature_layer:
            named = dict(transformer.named_modules())
            if feature_layer not in named:
                blocks = [name for name, _ in block_order(transformer)]
                raise ValueError(f"unknown feature layer {feature_layer!r}; choose a block such as: " + ", ".join(blocks))
            self.feature_module = named[feature_layer]
        self.recording, self.stop, self.can_stop_early = False, False, True
        self.maps, self.features = {}, None
        self._saved, self._hook = None, None

    def foreign_processors(self):
        return {name: type(m.processor).__name__ for name, m in self.modules.items()
                if type(m.processor) not in PLAIN_JOINT_PROCESSORS}

    def check_processors(self):
        foreign = self.foreign_processors()
        if foreign:
            raise ValueError(
                "self-guidance replaces the attention processors of the captured blocks, and these have their own: "
                + ", ".join(f"{n} ({c})" for n, c in foreign.items())
                + "; restore diffusers' default processors there or capture other blocks (layers=...)"
            )

    def __enter__(self):
        self.check_processors()
        self._saved = {name: module.processor for name, module in self.modules.items()}
        try:
            for name, module in self.modules.items():
                processor = FluxCaptureProcessor(self, name, module.processor) if self.flux else JointCaptureProcessor(self, name)
                module.set_processor(processor)
            if self.feature_module is not None:
                self._hook = self.feature_module.register_forward_hook(self._record_features)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    @property
    def image_tokens(self):
        return self.latent_size[0] * self.latent_size[1]

    def record_attention(self, name, query, key, image, text, scale):
        """Store the selected words' maps of one captured layer ([B, heads, L, d] joint query and key)."""
        query, key = query[self.batch_slice], key[self.batch_slice]
        height, width = grid_size(query[:, :, image].shape[2], *self.latent_size)
        if self.impl == "torch":
            token_maps = text_column_maps(query, key, self.token_index, image, text, scale, self.softmax)
        else:  # the fused op (sgfast.kernels.joint_attention_stats): the joint softmax
            _, token_maps = joint_attention_stats(query[:, :, image], key[:, :, image], key[:, :, text], self.token_index,
                                                  height, width, scale=scale, impl=self.impl)
        word_maps = torch.bmm(self.word_weights.to(token_maps.dtype), token_maps)
        self.maps[name] = word_maps.reshape(*word_maps.shape[:2], height, width).clone()
        self._recorded(name)

    def _record_features(self, module, inputs, output):
        if self.recording and self.want_features:
            tokens = output[1] if isinstance(output, tuple) else output  # blocks return (text, image)
            tokens = tokens[self.batch_slice]
            height, width = self.latent_size
            self.features = tokens.reshape(tokens.shape[0], height, width, -1).permute(0, 3, 1, 2)
            self._recorded(self.feature_layer)
