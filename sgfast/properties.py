"""Properties of objects read off cross-attention maps (the paper's section 3).

`maps` are head-averaged cross-attention probabilities for S selected tokens, `[B, S, H, W]`.
Coordinates are at pixel centres, x = (j + 0.5) / W, y = (i + 0.5) / H, origin top-left, so that
maps of different resolutions agree. Every function is differentiable and keeps the input dtype.
"""

import math

import torch
import torch.nn.functional as F

EPS = 1e-8


def pixel_centres(height, width, dtype=torch.float32, device=None):
    """(x, y) coordinate grids of shape [H, W]."""
    ys = (torch.arange(height, dtype=dtype, device=device) + 0.5) / height
    xs = (torch.arange(width, dtype=dtype, device=device) + 0.5) / width
    return xs.expand(height, width), ys[:, None].expand(height, width)


def centroid(maps):
    """Attention-weighted mean position of each map: `[B, S, 2]` as (x, y)."""
    height, width = maps.shape[-2:]
    xs, ys = pixel_centres(height, width, maps.dtype, maps.device)
    mass = maps.sum(dim=(-2, -1)).clamp_min(EPS)
    x = (maps * xs).sum(dim=(-2, -1)) / mass
    y = (maps * ys).sum(dim=(-2, -1)) / mass
    return torch.stack([x, y], dim=-1)


def normalize(maps):
    """Per-map min-max normalisation to [0, 1]."""
    low = maps.amin(dim=(-2, -1), keepdim=True)
    high = maps.amax(dim=(-2, -1), keepdim=True)
    return (maps - low) / (high - low).clamp_min(EPS)


def shape(maps, sharpness=10.0):
    """Soft silhouette: a sigmoid threshold at half of each normalised map, renormalised. `[B, S, H, W]`."""
    return normalize(torch.sigmoid(sharpness * (normalize(maps) - 0.5)))


def hard_shape(maps):
    """Hard silhouette (normalised map above one half), as a float mask; a target, not differentiable."""
    return (normalize(maps) > 0.5).to(maps.dtype)


def size(maps, sharpness=10.0):
    """Fraction of the image the object covers: mean of the soft silhouette. `[B, S]`."""
    return shape(maps, sharpness).mean(dim=(-2, -1))


def appearance(maps, features, sharpness=10.0):
    """Mean activation inside each object's silhouette: `[B, S, C]`.

    The silhouette is detached (gradient flows through the features only, as in the paper) and
    resized to the features' grid.
    """
    mask = shape(maps.detach(), sharpness)
    if mask.shape[-2:] != features.shape[-2:]:
        mask = F.interpolate(mask, size=features.shape[-2:], mode="bilinear", align_corners=False)
    mask = mask.to(features.dtype)
    weighted = torch.einsum("bshw,bchw->bsc", mask, features)
    return weighted / mask.sum(dim=(-2, -1))[..., None].clamp_min(EPS)


def transform_shape(silhouette, translate=(0.0, 0.0), scale=1.0, rotate=0.0):
    """Move a silhouette `[B, S, H, W]` about its centroid: scale, rotate (degrees, clockwise on
    screen, where y points down), then translate by (dx, dy) in image fractions. Used to build
    copy-shape targets. Coordinates are normalised per axis, so rotation assumes a square grid."""
    if translate == (0.0, 0.0) and scale == 1.0 and rotate == 0.0:
        return silhouette
    batch, count, height, width = silhouette.shape
    flat = silhouette.reshape(batch * count, 1, height, width)
    centre = centroid(flat)[:, 0] * 2 - 1  # [-1, 1] grid coordinates
    shift = torch.tensor(translate, dtype=flat.dtype, device=flat.device) * 2
    cos, sin = math.cos(math.radians(rotate)), math.sin(math.radians(rotate))
    # grid_sample maps output coordinates to input coordinates: invert the forward transform
    # p_out = c + shift + s * R (p_in - c)  =>  p_in = c + R^T (p_out - c - shift) / s.
    inverse = torch.tensor([[cos, sin], [-sin, cos]], dtype=flat.dtype, device=flat.device) / scale
    theta = torch.zeros(batch * count, 2, 3, dtype=flat.dtype, device=flat.device)
    theta[:, :, :2] = inverse
    theta[:, :, 2] = centre - (centre + shift) @ inverse.T
    grid = F.affine_grid(theta, flat.shape, align_corners=False)
    moved = F.grid_sample(flat, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return moved.reshape(batch, count, height, width)
