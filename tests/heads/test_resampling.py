"""Resizing and adaptive pooling agree with PyTorch on the odd sizes real backbones produce."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from heads.resampling import (
    adaptive_avg_pool,
    adaptive_pool_matrix,
    resize_bilinear,
    resize_nearest,
)

torch = pytest.importorskip('torch')
F = torch.nn.functional

# (input size, output size): stage maps of 97x131 and 250 px inputs, up and down, to the input.
RESIZES = [((6, 9), (24, 33)), ((12, 17), (24, 33)), ((16, 16), (62, 62)), ((31, 31), (62, 62)),
           ((24, 33), (97, 131)), ((62, 62), (31, 31)), ((97, 131), (24, 33)), ((5, 5), (1, 1)),
           ((1, 1), (5, 7))]


def _pair(shape, seed=0):
  x = np.random.default_rng(seed).standard_normal((2, *shape, 3)).astype(np.float32)
  return x, torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def _to_nhwc(t):
  return t.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize('align_corners', [False, True])
@pytest.mark.parametrize('in_size,out_size', RESIZES)
def test_bilinear_matches_torch_interpolate(in_size, out_size, align_corners):
  x, t = _pair(in_size)
  expected = _to_nhwc(F.interpolate(t, size=out_size, mode='bilinear',
                                    align_corners=align_corners))
  ours = np.asarray(resize_bilinear(jnp.asarray(x), out_size, align_corners=align_corners))
  np.testing.assert_allclose(ours, expected, atol=1e-5)


@pytest.mark.parametrize('in_size,out_size', RESIZES)
def test_nearest_matches_torch_interpolate(in_size, out_size):
  x, t = _pair(in_size)
  expected = _to_nhwc(F.interpolate(t, size=out_size, mode='nearest'))
  np.testing.assert_array_equal(np.asarray(resize_nearest(jnp.asarray(x), out_size)), expected)


@pytest.mark.parametrize('in_size', [(4, 4), (6, 9), (16, 16), (31, 31), (12, 17)])
@pytest.mark.parametrize('scale', [1, 2, 3, 6])
def test_adaptive_avg_pool_matches_torch(in_size, scale):
  x, t = _pair(in_size)
  expected = _to_nhwc(F.adaptive_avg_pool2d(t, scale))
  np.testing.assert_allclose(np.asarray(adaptive_avg_pool(jnp.asarray(x), scale)), expected,
                             atol=1e-6)


def test_adaptive_pool_bins_overlap_on_non_divisible_sizes():
  # torch's bins for 5 -> 3: [0, 2), [1, 4), [3, 5).
  np.testing.assert_allclose(adaptive_pool_matrix(5, 3), [[.5, .5, 0, 0, 0], [0, 1 / 3, 1 / 3,
                                                          1 / 3, 0], [0, 0, 0, .5, .5]])


def test_resize_rejects_non_nhwc():
  with pytest.raises(ValueError, match=r'\[N, H, W, C\].*\(3, 4, 5\)'):
    resize_bilinear(jnp.zeros((3, 4, 5)), (8, 8))
