"""Multi-scale deformable attention (plain PyTorch, grid_sample) against a direct loop reference."""

from __future__ import annotations

import math

import pytest
import torch

from TextGuidedSegLib.models.blocks import MultiScaleDeformableAttention, ms_deform_attn


def bilinear(img: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """``img`` [d, H, W] at (x, y) in [0, 1] (pixel centres at (i + 0.5) / W); zero outside."""
    d, h, w = img.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(d, dtype=img.dtype)
    for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                out += wy * wx * img[:, yy, xx]
    return out


def reference(value, shapes, locations, weights):
    b, _, heads, d = value.shape
    q, points = locations.shape[1], locations.shape[4]
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(b, q, heads, d, dtype=value.dtype)
    for bi in range(b):
        for qi in range(q):
            for hi in range(heads):
                for li, (h, w) in enumerate(shapes):
                    img = value[bi, starts[li]:starts[li + 1], hi].reshape(h, w, d).permute(2, 0, 1)
                    for pi in range(points):
                        x, y = locations[bi, qi, hi, li, pi].tolist()
                        out[bi, qi, hi] += weights[bi, qi, hi, li, pi] * bilinear(img, x, y)
    return out.reshape(b, q, heads * d)


def test_matches_the_loop_reference_values():
    g = torch.Generator().manual_seed(0)
    shapes = [(6, 5), (3, 4), (2, 2)]
    b, heads, d, q, points = 2, 2, 3, 5, 3
    value = torch.randn(b, sum(h * w for h, w in shapes), heads, d, generator=g, dtype=torch.float64)
    # points inside, on the border band and outside the map (zero padding)
    locations = torch.rand(b, q, heads, len(shapes), points, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2
    weights = torch.rand(b, q, heads, len(shapes), points, generator=g, dtype=torch.float64)
    weights = weights / weights.sum(dim=(-1, -2), keepdim=True)
    got = ms_deform_attn(value, shapes, locations, weights)
    want = reference(value, shapes, locations, weights)
    assert got.shape == (b, q, heads * d)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    assert want.abs().max() > 0.1  # not a trivially zero comparison


def test_pixel_centre_returns_the_pixel():
    value = torch.arange(12, dtype=torch.float32).reshape(1, 12, 1, 1)   # one 3x4 level
    loc = torch.tensor([[[[[[(2 + 0.5) / 4, (1 + 0.5) / 3]]]]]])          # x = column 2, y = row 1
    out = ms_deform_attn(value, [(3, 4)], loc, torch.ones(1, 1, 1, 1, 1))
    assert out.item() == pytest.approx(6.0)                              # row 1 * 4 + column 2


def test_module_shapes_gradients_and_start():
    torch.manual_seed(0)
    attn = MultiScaleDeformableAttention(dim=8, heads=2, levels=2, points=2)
    shapes = [(4, 4), (2, 2)]
    value = torch.randn(2, 20, 8, requires_grad=True)
    query = torch.randn(2, 20, 8)
    ref = torch.rand(2, 20, 2)
    out = attn(query, ref, value, shapes)
    assert out.shape == (2, 20, 8) and torch.isfinite(out).all()
    out.sum().backward()
    assert value.grad.abs().sum() > 0
    assert attn.offsets.weight.grad.abs().sum() > 0 and attn.attention.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="divisible"):
        MultiScaleDeformableAttention(dim=10, heads=4)
