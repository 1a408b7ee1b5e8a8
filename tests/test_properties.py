"""Properties against an independent float64 implementation written with explicit loops."""

import itertools

import pytest
import torch

from sgfast import properties


def loop_centroid(m):
    H, W = m.shape
    mass = sx = sy = 0.0
    for i, j in itertools.product(range(H), range(W)):
        v = float(m[i, j])
        mass += v
        sx += v * (j + 0.5) / W
        sy += v * (i + 0.5) / H
    return sx / mass, sy / mass


def loop_normalize(values):
    low, high = min(values), max(values)
    return [(v - low) / (high - low) for v in values]


def loop_shape(m, sharpness):
    import math

    flat = [float(v) for v in m.flatten()]
    soft = [1 / (1 + math.exp(-sharpness * (v - 0.5))) for v in loop_normalize(flat)]
    return torch.tensor(loop_normalize(soft), dtype=torch.float64).reshape(m.shape)


@pytest.mark.parametrize("H,W", [(5, 7), (9, 4), (1, 3)])
def test_centroid_size_shape_match_loops(H, W):
    g = torch.Generator().manual_seed(H * 31 + W)
    maps = torch.rand(2, 3, H, W, generator=g, dtype=torch.float64)
    c = properties.centroid(maps)
    s = properties.shape(maps, sharpness=7.0)
    z = properties.size(maps, sharpness=7.0)
    assert c.shape == (2, 3, 2) and s.shape == maps.shape and z.shape == (2, 3)
    for b, k in itertools.product(range(2), range(3)):
        x, y = loop_centroid(maps[b, k])
        assert c[b, k, 0].item() == pytest.approx(x, abs=1e-12)
        assert c[b, k, 1].item() == pytest.approx(y, abs=1e-12)
        expected = loop_shape(maps[b, k], 7.0)
        torch.testing.assert_close(s[b, k], expected, rtol=1e-10, atol=1e-12)
        assert z[b, k].item() == pytest.approx(expected.mean().item(), abs=1e-12)


def test_appearance_matches_loops_and_detaches_mask():
    g = torch.Generator().manual_seed(3)
    maps = torch.rand(1, 2, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    feats = torch.randn(1, 4, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    a = properties.appearance(maps, feats, sharpness=5.0)
    for k in range(2):
        mask = loop_shape(maps[0, k].detach(), 5.0)
        expected = [(mask * feats[0, c].detach()).sum() / mask.sum() for c in range(4)]
        torch.testing.assert_close(a[0, k].detach(), torch.stack(expected), rtol=1e-10, atol=1e-12)
    a.sum().backward()
    assert maps.grad is None  # the silhouette is detached
    assert feats.grad is not None and feats.grad.abs().sum() > 0


def test_appearance_resizes_mask_to_feature_grid():
    maps = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    maps[..., :2, :2] = 1.0  # object in the top-left quarter
    feats = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    feats[..., :4, :4] = 2.0
    a = properties.appearance(maps, feats, sharpness=50.0)
    assert 1.5 < a.item() <= 2.0


@pytest.mark.parametrize("fn", ["centroid", "size", "shape"])
def test_gradcheck(fn):
    g = torch.Generator().manual_seed(11)
    maps = (torch.rand(1, 2, 3, 5, generator=g, dtype=torch.float64) + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(getattr(properties, fn), (maps,))


def test_gradcheck_appearance_through_features():
    g = torch.Generator().manual_seed(12)
    maps = torch.rand(1, 2, 3, 3, generator=g, dtype=torch.float64)
    feats = torch.randn(1, 3, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f: properties.appearance(maps, f), (feats,))


@pytest.mark.parametrize("factor", [2, 3])
def test_centroid_invariant_under_upsampling(factor):
    g = torch.Generator().manual_seed(factor)
    maps = torch.rand(2, 3, 5, 7, generator=g, dtype=torch.float64)
    up = maps.repeat_interleave(factor, -2).repeat_interleave(factor, -1)
    torch.testing.assert_close(properties.centroid(up), properties.centroid(maps), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_preserved(dtype):
    maps = torch.rand(1, 1, 4, 4, dtype=dtype)
    feats = torch.rand(1, 2, 4, 4, dtype=dtype)
    for out in (properties.centroid(maps), properties.size(maps), properties.shape(maps), properties.appearance(maps, feats)):
        assert out.dtype == dtype


def test_transform_shape_translate_scale_rotate():
    sil = torch.zeros(1, 1, 32, 32, dtype=torch.float64)
    sil[..., 8:16, 4:20] = 1.0  # a 8x16 bar
    c0 = properties.centroid(sil)[0, 0]
    moved = properties.transform_shape(sil, translate=(0.25, 0.125))
    torch.testing.assert_close(properties.centroid(moved)[0, 0], c0 + torch.tensor([0.25, 0.125], dtype=torch.float64), atol=1e-6, rtol=0)
    bigger = properties.transform_shape(sil, scale=1.5)
    assert bigger.sum().item() == pytest.approx(sil.sum().item() * 2.25, rel=0.05)
    # bilinear resampling of the edges moves the centroid by well under half a pixel (1/64)
    torch.testing.assert_close(properties.centroid(bigger)[0, 0], c0, atol=1 / 64, rtol=0)
    turned = properties.transform_shape(sil, rotate=90)
    rows = (turned[0, 0] > 0.5).any(1).sum().item()
    cols = (turned[0, 0] > 0.5).any(0).sum().item()
    assert (rows, cols) == (16, 8)  # the bar now stands upright
    torch.testing.assert_close(properties.centroid(turned)[0, 0], c0, atol=1 / 64, rtol=0)


@pytest.mark.parametrize("degrees", [30.0, -30.0, 120.0])
def test_transform_shape_rotates_clockwise_on_screen(degrees):
    # A long bar along x: after the rotation its long axis, read from second moments with y
    # pointing down, is at +degrees (clockwise on screen), not -degrees.
    import math

    sil = torch.zeros(1, 1, 48, 48, dtype=torch.float64)
    sil[..., 21:27, 8:40] = 1.0
    turned = properties.transform_shape(sil, rotate=degrees)[0, 0]
    ys, xs = torch.meshgrid(torch.arange(48.0, dtype=torch.float64), torch.arange(48.0, dtype=torch.float64), indexing="ij")
    mx, my = (turned * xs).sum() / turned.sum(), (turned * ys).sum() / turned.sum()
    cxx, cyy = (turned * (xs - mx) ** 2).sum(), (turned * (ys - my) ** 2).sum()
    cxy = (turned * (xs - mx) * (ys - my)).sum()
    angle = 0.5 * math.degrees(math.atan2(2 * cxy.item(), (cxx - cyy).item()))
    assert (angle - degrees + 90) % 180 - 90 == pytest.approx(0.0, abs=2.0)


def test_hard_shape_and_default_sharpness_match_loops():
    g = torch.Generator().manual_seed(21)
    maps = torch.rand(1, 2, 5, 6, generator=g, dtype=torch.float64)
    for k in range(2):
        flat = [float(v) for v in maps[0, k].flatten()]
        expected = torch.tensor([v > 0.5 for v in loop_normalize(flat)], dtype=torch.float64).reshape(5, 6)
        torch.testing.assert_close(properties.hard_shape(maps)[0, k], expected)
        # The documented default sharpness is 10, for shape and size alike.
        torch.testing.assert_close(properties.shape(maps)[0, k], loop_shape(maps[0, k], 10.0), rtol=1e-10, atol=1e-12)
        assert properties.size(maps)[0, k].item() == pytest.approx(loop_shape(maps[0, k], 10.0).mean().item(), abs=1e-12)


def test_view_uses_its_sharpness():
    from sgfast.trace import View

    g = torch.Generator().manual_seed(22)
    maps = {"a": torch.rand(1, 6, 6, generator=g, dtype=torch.float64)}
    view = View(["circle"], maps, sharpness=4.0)
    assert view.size("circle").item() == pytest.approx(loop_shape(maps["a"][0], 4.0).mean().item(), abs=1e-12)


def test_transform_shape_translation_is_a_pure_shift():
    # 0.25 of a 32-pixel grid is 8 pixels exactly: bilinear resampling gives the rolled silhouette,
    # with nothing turned or scaled by the defaults.
    sil = torch.zeros(1, 1, 32, 32, dtype=torch.float64)
    sil[..., 8:16, 4:20] = 1.0
    torch.testing.assert_close(properties.transform_shape(sil, translate=(0.25, 0.125)), sil.roll((4, 8), dims=(-2, -1)), atol=1e-9, rtol=0)
    assert properties.transform_shape(sil) is sil


@pytest.mark.parametrize("kwargs", [dict(translate=(1.0, 0.0)), dict(translate=(0.0, 1.0)), dict(scale=2.0), dict(rotate=1.0)])
def test_transform_shape_applies_every_non_identity(kwargs):
    sil = torch.zeros(1, 1, 32, 32, dtype=torch.float64)
    sil[..., 8:16, 4:20] = 1.0
    assert (properties.transform_shape(sil, **kwargs) - sil).abs().max() > 0.01


def test_pixel_centres_are_full_grids():
    xs, ys = properties.pixel_centres(3, 5, torch.float64)
    assert xs.shape == ys.shape == (3, 5)
    for i, j in itertools.product(range(3), range(5)):
        assert (xs[i, j].item(), ys[i, j].item()) == pytest.approx(((j + 0.5) / 5, (i + 0.5) / 3), abs=1e-15)


def test_hard_shape_is_strictly_above_one_half():
    maps = torch.tensor([[[[0.0, 0.25, 0.5], [0.75, 1.0, 0.5]]]], dtype=torch.float64)
    expected = torch.tensor([[[[0.0, 0.0, 0.0], [1.0, 1.0, 0.0]]]], dtype=torch.float64)
    assert torch.equal(properties.hard_shape(maps), expected)


def loop_bilinear(grid, height, width):
    """Bilinear resampling on pixel centres (a source pixel i sits at i + 0.5), edges held."""
    import math

    def taps(n_out, n_in):
        out = []
        for i in range(n_out):
            src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
            i0 = min(int(math.floor(src)), n_in - 1)
            out.append((i0, min(i0 + 1, n_in - 1), src - i0))
        return out
    rows, cols = taps(height, len(grid)), taps(width, len(grid[0]))
    return [[(1 - wy) * ((1 - wx) * grid[y0][x0] + wx * grid[y0][x1]) + wy * ((1 - wx) * grid[y1][x0] + wx * grid[y1][x1])
             for x0, x1, wx in cols] for y0, y1, wy in rows]


def test_appearance_resamples_the_silhouette_on_pixel_centres_in_the_features_dtype():
    # float64 maps at 5 x 7, float32 features at 9 x 11: the mask is resampled to the features' grid
    # and the mean taken in the features' dtype, at the default sharpness.
    g = torch.Generator().manual_seed(23)
    maps = torch.rand(1, 2, 5, 7, generator=g, dtype=torch.float64)
    feats = torch.randn(1, 3, 9, 11, generator=g, dtype=torch.float64)
    a = properties.appearance(maps, feats.float())  # the default sharpness, 10
    assert a.dtype == torch.float32 and a.shape == (1, 2, 3)
    for k in range(2):
        mask = torch.tensor(loop_bilinear(loop_shape(maps[0, k], 10.0).tolist(), 9, 11), dtype=torch.float64)
        expected = torch.stack([(mask * feats[0, c]).sum() / mask.sum() for c in range(3)])
        torch.testing.assert_close(a[0, k].double(), expected, rtol=1e-5, atol=1e-6)
