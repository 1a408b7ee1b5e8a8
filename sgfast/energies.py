"""Every edit's energy at once: a constant number of batched tensor ops per guided step.

Edits describe their energies as terms (`Edit.terms`: a property of a word, a weight, where its
target comes from); the per-layer formulation (`Edit.energy` on `View`s) stays the reference.
An `EnergyPlan` is built once per call from the terms of every batch item and the traces they read:

- the captured layers' maps arrive flat, `[B, S, N]` per layer, padded to the finest layer's
  `N` by repeating the last pixel (min and max, hence silhouettes, are unchanged; the padding has
  zero weight in every sum), and are stacked once per step: `[L, B, S, N]`;
- centroid (one matmul against per-layer (1, x, y) columns; of the silhouette, the same matmul on it),
  silhouette, log size and appearance
  (one matmul against per-layer bilinear-resize matrices, then one against the features) are
  computed for every layer, item and word together, only the kinds some term reads;
- every term's target for every guided call is computed before the loop, from the traces stacked
  the same way (targets are constants of the step), into one `[calls, E]` table; the weights,
  with each term's averaging folded in, into one `[E]` vector;
- the energy is one smooth-L1 of the residuals concatenated and one dot product with the weights.

Where a word appears in several terms of one kind (two holds of one silhouette), the kind gets
another plane of targets: the current property is compared with each.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sgfast import properties
from sgfast.edits import L1_SMOOTHING, SIZE_FLOOR
from sgfast.properties import transform_shape

KINDS = ("centroid", "shape_centroid", "size", "shape", "appearance")
CENTROIDS = ("centroid", "shape_centroid")  # kinds of [..., 2] positions


# ---------------------------------------------------------------------------------------------------
# Layers and their grids
# ---------------------------------------------------------------------------------------------------

def layer_depth(unet, name):
    """How many downsamplings deep a UNet2DConditionModel layer works: down block j at j, the middle
    block at the deepest level, up block i (coarsest first) at levels - 1 - i."""
    levels = len(unet.config.block_out_channels)
    parts = name.split(".")
    if parts[0] == "down_blocks":
        return int(parts[1])
    if parts[0] == "mid_block":
        return levels - 1
    if parts[0] == "up_blocks":
        return levels - 1 - int(parts[1])
    raise ValueError(f"cannot tell the resolution of layer {name!r}: expected down_blocks.*, mid_block.* or up_blocks.*")


def grid_at(latent_size, depth):
    """The grid `depth` stride-2 convolutions (padding 1) make of `latent_size`: ceil(n / 2) each."""
    height, width = latent_size
    for _ in range(depth):
        height, width = -(-height // 2), -(-width // 2)
    return height, width


@dataclass
class Layout:
    """The captured layers' grids, in capture order, and the padded length of their flat maps."""

    grids: list  # [(H, W)] per layer

    @classmethod
    def of(cls, unet, layers, latent_size):
        return cls([grid_at(tuple(latent_size), layer_depth(unet, name)) for name in layers])

    @property
    def length(self):
        return max(h * w for h, w in self.grids)

    def pad(self, flat):
        """`flat` [..., N_l] padded to [..., length] by repeating its last pixel (a fresh tensor)."""
        missing = self.length - flat.shape[-1]
        if missing == 0:
            return flat.clone()
        shape = flat.shape
        return F.pad(flat.reshape(-1, 1, shape[-1]), (0, missing), mode="replicate").reshape(*shape[:-1], self.length)

    def tables(self, dtype, device):
        """Per layer: moment columns [L, N, 3] (1, x, y; zero on padding) and pixel weights [L, N]
        (1 / N_l on the layer's pixels, zero on padding: means over the layer's own grid)."""
        moments = torch.zeros(len(self.grids), self.length, 3, dtype=dtype, device=device)
        means = torch.zeros(len(self.grids), self.length, dtype=dtype, device=device)
        for i, (h, w) in enumerate(self.grids):
            xs, ys = properties.pixel_centres(h, w, dtype, device)
            moments[i, : h * w, 0] = 1.0
            moments[i, : h * w, 1] = xs.reshape(-1)
            moments[i, : h * w, 2] = ys.reshape(-1)
            means[i, : h * w] = 1.0 / (h * w)
        return moments, means

    def resize_matrices(self, size, dtype, device):
        """(groups [G, L] one-hot of each layer's grid, resize [G, N, n]): bilinear resizing of a
        grid's flat maps to the grid `size` (F.interpolate's weights, align_corners=False), divided by
        L: summing the layers of a grid, then resizing, and summing the grids is the layer mean. One
        matrix per distinct grid, not per layer (SDXL's 30 layers share one)."""
        grids = list(dict.fromkeys(self.grids))
        n = size[0] * size[1]
        groups = torch.zeros(len(grids), len(self.grids), dtype=dtype, device=device)
        resize = torch.zeros(len(grids), self.length, n, dtype=dtype, device=device)
        for g, (h, w) in enumerate(grids):
            basis = torch.eye(h * w, dtype=dtype, device=device).reshape(h * w, 1, h, w)
            resized = F.interpolate(basis, size=size, mode="bilinear", align_corners=False)
            resize[g, : h * w] = resized.reshape(h * w, n) / len(self.grids)
            for i, grid in enumerate(self.grids):
                groups[g, i] = float(grid == (h, w))
        return groups, resize

    def unpad(self, flat, layer):
        h, w = self.grids[layer]
        return flat[..., : h * w].reshape(*flat.shape[:-1], h, w)


# ---------------------------------------------------------------------------------------------------
# Properties of stacked maps
# ---------------------------------------------------------------------------------------------------

def normalize(maps):
    """Min-max normalisation over the last (flat pixel) dim; as `properties.normalize`."""
    low, high = torch.aminmax(maps, dim=-1, keepdim=True)
    return (maps - low) / (high - low).clamp_min(properties.EPS)


def shape(maps, sharpness):
    """As `properties.shape`, over flat maps. The outer normalisation's bounds are constants: the
    inner one maps each map onto [0, 1] exactly (min to 0, max to range / range = 1), and the
    sigmoid is monotonic, so they are sigmoid(-sharpness / 2) and sigmoid(sharpness / 2), with zero
    gradient as in the reference (where the min and the max are the constant 0 and 1 of the inner
    normalisation). Only a map flatter than the reference's EPS (range below 1e-8, not a flat one)
    would come out otherwise."""
    low, high = 1.0 / (1.0 + math.exp(0.5 * sharpness)), 1.0 / (1.0 + math.exp(-0.5 * sharpness))
    soft = torch.sigmoid((normalize(maps) - 0.5) * sharpness)
    return (soft - low) * (1.0 / max(high - low, properties.EPS))


class Stacked:
    """Properties of padded flat maps for a layout: `dims` names the leading dims, "lbs" for a step's
    maps [L, B, S, N], "tls" for a trace's [T, L, S, N]; each property computed on first use."""

    def __init__(self, maps, layout, tables, sharpness, dims="lbs"):
        self.maps, self.layout, self.sharpness, self.dims = maps, layout, sharpness, dims
        self.moment_columns, self.pixel_means = tables
        self._shape = None

    def centroid(self):
        """[..., 2]."""
        return self._centroid_of(self.maps)

    def shape_centroid(self):
        """[..., 2]: the silhouette's centroid (the moment columns are zero on the padding)."""
        return self._centroid_of(self.shape())

    def _centroid_of(self, maps):
        moments = torch.einsum(f"{self.dims}n,lnk->{self.dims}k", maps, self.moment_columns)
        return moments[..., 1:] / moments[..., :1].clamp_min(properties.EPS)

    def shape(self):
        """[..., L, S, N] (garbage, finite, on padding)."""
        if self._shape is None:
            self._shape = shape(self.maps, self.sharpness)
        return self._shape

    def size(self):
        """The silhouette's mean over the layer's own pixels."""
        return torch.einsum(f"{self.dims}n,ln->{self.dims}", self.shape(), self.pixel_means)


def log_size(size):
    return size.clamp_min(SIZE_FLOOR).log()


def appearance(maps, resize, features, sharpness):
    """[B, S, C]: mean feature inside the silhouette of the layer-averaged map on the features' grid
    (the mask detached), as `View.appearance`. maps [L, B, S, N], resize: `Layout.resize_matrices`,
    features [B, C, h, w]."""
    groups, matrices = resize
    per_grid = torch.einsum("gl,lbsn->gbsn", groups, maps.detach())
    mean_map = torch.einsum("gbsn,gnq->bsq", per_grid, matrices)
    mask = shape(mean_map, sharpness)
    features = features.reshape(*features.shape[:2], -1)
    if features.dtype != torch.float64:
        features = features.float()  # energies in fp32 even for an fp16 UNet
    mask = mask.to(features.dtype)
    weighted = torch.bmm(mask, features.transpose(1, 2))
    return weighted / mask.sum(-1, keepdim=True).clamp_min(properties.EPS)


# ---------------------------------------------------------------------------------------------------
# Traces stacked for a call
# ---------------------------------------------------------------------------------------------------

def stack_trace_maps(steps, layers):
    """[T, L, S, N_max] padded flat maps of TraceSteps, and the trace's own layout. Layers of one
    grid are stacked in one op; the padded groups are joined and put back in layer order."""
    first = steps[0].maps
    grids = [tuple(first[name].shape[-2:]) for name in layers]
    layout = Layout(grids)
    groups = {}
    for i, grid in enumerate(grids):
        groups.setdefault(grid, []).append(i)
    parts, order = [], []
    for grid, members in groups.items():
        flat = torch.stack([step.maps[layers[i]].flatten(-2) for step in steps for i in members])
        flat = flat.reshape(len(steps), len(members), *flat.shape[1:])
        parts.append(layout.pad(flat) if flat.shape[-1] != layout.length else flat)
        order += members
    stacked = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    if order != sorted(order):
        stacked = stacked[:, [order.index(i) for i in range(len(order))]]
    return stacked, layout


class TraceTargets:
    """A trace's properties at the steps a call reads, [T, L, S, ...], each computed once."""

    def __init__(self, trace, steps, layers, dst_layout, sharpness):
        self.trace, self.sharpness, self.dst = trace, sharpness, dst_layout
        maps, self.layout = stack_trace_maps(steps, layers)
        tables = self.layout.tables(maps.dtype, maps.device)
        self.props = Stacked(maps, self.layout, tables, sharpness, dims="tls")
        self.steps = steps
        self._cache = {}

    def slot(self, word):
        return self.trace.words.index(word)

    def get(self, kind):
        """[T, L, S, 2] centroids (of maps or silhouettes), [T, L, S] log sizes, [T, L, S, N] silhouettes (on the trace's own
        grids: see `resampled`), [T, S, C] appearances."""
        if kind not in self._cache:
            if kind == "centroid":
                value = self.props.centroid()
            elif kind == "shape_centroid":
                value = self.props.shape_centroid()
            elif kind == "size":
                value = log_size(self.props.size())
            elif kind == "shape":
                value = self.props.shape()
            else:
                if any(s.appearance is None for s in self.steps):
                    raise ValueError(f"the trace of {self.trace.prompt!r} holds no appearance (recorded without a feature layer)")
                value = torch.stack([s.appearance for s in self.steps])
            self._cache[kind] = value
        return self._cache[kind]

    def resampled(self, shapes):
        """Silhouettes [T, L, N] of this trace on the current layers' grids (a source traced at
        another resolution: bilinear, as the reference formulation's `_resampled`)."""
        if self.layout.grids == self.dst.grids:
            return shapes
        layers = []
        for i, grid in enumerate(self.dst.grids):
            own = self.layout.unpad(shapes[:, i], i)[:, None]  # [T, 1, h, w]
            if tuple(own.shape[-2:]) != grid:
                own = F.interpolate(own, size=grid, mode="bilinear", align_corners=False)
            layers.append(self.dst.pad(own.flatten(-2)[:, 0]))
        return torch.stack(layers, dim=1)


def reference_steps(trace, timesteps, calls):
    """The TraceSteps `Trace.view(timestep, call=call)` reads, for host-side timesteps."""
    if not trace.steps:
        raise ValueError("the trace is empty")
    out = []
    for t, call in zip(timesteps, calls):
        if call is not None and call < len(trace.calls) and trace.calls[call][0] == int(t):
            out.append(trace.calls[call][1])
        else:
            out.append(trace.steps[min(trace.steps, key=lambda s: abs(s - int(t)))])
    return out


# ---------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------

class EnergyPlan:
    """The energies of one call's guided steps: `energy(maps, features, step)` on the current pass.

    `items`: per batch item, (edits, its recorded words in slot order, its reference Trace or None,
    its PromptWords).
    `timesteps` / `calls`: host-side, the guided UNet calls in order (step k of the plan is the k-th).
    """

    def __init__(self, items, layout, timesteps, calls, layers, feature_size=None, sharpness=10.0,
                 dtype=torch.float32, device="cpu"):
        self.layout, self.sharpness, self.layers = layout, sharpness, list(layers)
        self.batch = len(items)
        self.slots = max(len(words) for _, words, _, _ in items)
        self.feature_size = feature_size
        self.timesteps, self.calls = list(timesteps), list(calls)
        terms = []  # (b, slot, Term)
        for b, (edits, words, _, prompt_words) in enumerate(items):
            for edit in edits:
                # The words the edit's view shows in the reference formulation (View.subset).
                for term in edit.terms(list(dict.fromkeys(edit.needed_words(prompt_words)))):
                    if term.weight:
                        terms.append((b, words.index(term.word), term))
        self.kinds = [k for k in KINDS if any(t.kind == k for _, _, t in terms)]
        if "appearance" in self.kinds and feature_size is None:
            raise ValueError("appearance needs features: the capture has no feature layer")
        self._targets = {}
        self._references = [r for _, _, r, _ in items]
        self._build(terms, dtype, device)
        self._targets = None  # only the tables are kept

    # -- building ----------------------------------------------------------------------------------

    def _trace_targets(self, trace, by_call):
        """TraceTargets of a trace for this call's guided steps: the reference of an item by UNet call
        (`Trace.view(t, call=...)`), a source by timestep (`Trace.view(t)`)."""
        key = (id(trace), by_call)
        if key not in self._targets:
            calls = self.calls if by_call else [None] * len(self.calls)
            steps = reference_steps(trace, self.timesteps, calls)
            self._targets[key] = TraceTargets(trace, steps, self.layers, self.layout, self.sharpness)
        return self._targets[key]

    def _target(self, b, term):
        """[T, L, 2] / [T, L] / [T, L, N] / [T, C] target of a term at every guided step."""
        steps = len(self.timesteps)
        if term.kind in CENTROIDS and term.const is not None:
            const = torch.tensor(term.const, dtype=torch.float32)
            return const.expand(steps, len(self.layers), 2)
        trace = term.source if term.source is not None else self._references[b]
        if trace is None:
            raise ValueError(f"{term.kind} of {term.word!r} reads the unedited reference, and there is none")
        targets = self._trace_targets(trace, by_call=term.source is None)
        slot = targets.slot(term.source_word or term.word)
        value = targets.get(term.kind)
        if term.kind == "appearance":
            return value[:, slot]
        value = value[:, :, slot]
        if term.kind in CENTROIDS and term.offset is not None:
            # As the reference formulation builds it: a float32 offset, whatever the maps' dtype.
            value = value + torch.tensor(term.offset).to(value)
        if term.kind == "size" and term.scale != 1.0:
            value = value + math.log(term.scale)
        if term.kind == "shape":
            if term.transform is not None or term.place is not None:
                value = self._transformed(value, targets.layout, b, term)
            value = targets.resampled(value)
        return value

    def _transformed(self, shapes, layout, b, term):
        """Silhouettes [T, L, N] moved about their centroids on their own grids (transform_shape)."""
        out = []
        for k in range(shapes.shape[0]):
            if term.place is not None:  # a place's own silhouette: to where the object is asked to go
                # (host reads of the reference's centroid, before the loop: transform_shape takes numbers)
                reference = self._references[b]
                centre = self._trace_targets(reference, by_call=True).get("centroid")[k, :, reference.words.index(term.word)]
                centre = centre.detach().mean(0)
                transform = dict(translate=(term.place[0] - float(centre[0]), term.place[1] - float(centre[1])))
            else:
                transform = term.transform
            layers = []
            for i in range(len(self.layers)):
                silhouette = layout.unpad(shapes[k, i], i)[None, None]
                moved = transform_shape(silhouette, **transform)[0, 0]
                layers.append(layout.pad(moved.flatten()))
            out.append(torch.stack(layers))
        return torch.stack(out)

    def _build(self, terms, dtype, device):
        steps, layers, batch, slots = len(self.timesteps), len(self.layers), self.batch, self.slots
        tail = {"centroid": (layers, 2), "shape_centroid": (layers, 2), "size": (layers,), "shape": (layers, self.layout.length),
                "appearance": None}
        planes = {}
        for b, s, term in terms:
            key = (term.kind, b, s)
            planes[key] = planes.get(key, 0) + 1
        self.planes = {k: max([n for (kind, _, _), n in planes.items() if kind == k], default=0) for k in KINDS}
        moment_columns, pixel_means = self.layout.tables(dtype, device)
        self.tables = (moment_columns, pixel_means)
        targets, weights, used = {}, {}, {}
        for b, s, term in terms:
            kind = term.kind
            if kind not in targets:
                channels = None
                if kind == "appearance":
                    channels = self._target(b, term).shape[-1]
                    tail["appearance"] = (channels,)
                shape = (steps, self.planes[kind], batch, slots) + tail[kind]
                targets[kind] = torch.zeros(shape, dtype=dtype, device=device)
                weights[kind] = torch.zeros(shape[1:], dtype=dtype, device=device)
            plane = used.get((kind, b, s), 0)
            used[(kind, b, s)] = plane + 1
            value = self._target(b, term).to(dtype=dtype, device=device)
            targets[kind][:, plane, b, s] = value
            weights[kind][plane, b, s] = self._weights(kind, term.weight, value.shape[1:], pixel_means, dtype, device)
        # Layers first within a plane, as the current properties come: [P, L, B, S, ...].
        order = {"centroid": (0, 1, 4, 2, 3, 5), "shape_centroid": (0, 1, 4, 2, 3, 5), "size": (0, 1, 4, 2, 3), "shape": (0, 1, 4, 2, 3, 5),
                 "appearance": (0, 1, 2, 3, 4)}
        self.target_table = torch.cat(
            [targets[k].permute(*order[k]).reshape(steps, -1) for k in self.kinds], dim=1
        ) if self.kinds else torch.zeros(steps, 0, dtype=dtype, device=device)
        self.weights = torch.cat(
            [weights[k].permute(*[i - 1 for i in order[k][1:]]).reshape(-1) for k in self.kinds]
        ) / L1_SMOOTHING if self.kinds else torch.zeros(0, dtype=dtype, device=device)
        if "appearance" in self.kinds:
            self.resize = self.layout.resize_matrices(self.feature_size, dtype, device)

    def _weights(self, kind, weight, shape, pixel_means, dtype, device):
        """Each element's share of its term: the term's means (over layers, pixels, channels) folded in."""
        layers = len(self.layers)
        if kind in CENTROIDS:
            return torch.full(shape, weight / layers, dtype=dtype, device=device)
        if kind == "size":
            return torch.full(shape, weight / layers, dtype=dtype, device=device)
        if kind == "shape":
            return weight * pixel_means / layers
        return torch.full(shape, weight / shape[-1], dtype=dtype, device=device)

    # -- the step ----------------------------------------------------------------------------------

    @property
    def needs_features(self):
        return "appearance" in self.kinds

    def current(self, maps, features):
        """The flat vector of current properties, in the target table's order. maps [L, B, S, N]."""
        props = Stacked(maps, self.layout, self.tables, self.sharpness)
        parts = []
        for kind in self.kinds:
            if kind == "centroid":
                value = props.centroid()
            elif kind == "shape_centroid":
                value = props.shape_centroid()
            elif kind == "size":
                value = log_size(props.size())
            elif kind == "shape":
                value = props.shape()
            else:
                value = appearance(maps, self.resize, features, self.sharpness)
            parts.append(value.unsqueeze(0).expand(self.planes[kind], *value.shape).reshape(-1))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def energy(self, maps, features, targets, weights=None):
        """The total energy (a 0-dim tensor): maps [L, B, S, N] stacked, features [B, C, h, w] or None,
        targets: this step's row of `target_table`, weights: `self.weights` (or a copy of them)."""
        if not self.kinds:  # every term weighs 0: a zero that still depends on the maps
            return maps.sum() * 0.0
        distance = (self.current(maps, features) - targets).abs()
        near = distance.clamp_max(L1_SMOOTHING)
        # Smooth L1 (edits._l1) times L1_SMOOTHING: near * (d - near / 2), quadratic within the smoothing.
        return torch.dot(near * torch.add(distance, near, alpha=-0.5), self.weights if weights is None else weights)

