"""Depthwise 2-D convolution, written for the backend it runs on.

XLA:CPU lowers `feature_group_count=C` convolutions to a slow generic loop, 15-50x slower than
a sum of k*k shifted (strided) slices times per-channel weights, which XLA fuses into one loop
(8x56x56x64, 3x3, stride 1: 43 ms vs 0.9 ms); CvT runs three per block. GPU and TPU keep the
library kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from cvt_backbone.kernels import resolve

IMPLEMENTATIONS = ('auto', 'slices', 'conv')


def depthwise_conv2d(
    x: jax.Array,
    kernel: jax.Array,
    *,
    stride: int,
    padding: int,
    implementation: str = 'auto',
) -> jax.Array:
  """x `[N, H, W, C]`, kernel `[kh, kw, 1, C]` -> `[N, Ho, Wo, C]`, symmetric zero padding,
  no bias; `implementation` 'slices', 'conv' or 'auto' (slices on CPU)."""
  kh, kw, _, channels = kernel.shape
  if resolve('depthwise conv', implementation, IMPLEMENTATIONS, cpu='slices',
             other='conv') == 'conv':
    return lax.conv_general_dilated(
        x, kernel.astype(x.dtype), window_strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=channels)
  n, h, w, _ = x.shape
  out_h = (h + 2 * padding - kh) // stride + 1
  out_w = (w + 2 * padding - kw) // stride + 1
  x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  kernel = kernel.astype(x.dtype)
  out = None
  for i in range(kh):
    for j in range(kw):
      tap = lax.slice(
          x, (0, i, j, 0),
          (n, i + stride * (out_h - 1) + 1, j + stride * (out_w - 1) + 1, channels),
          (1, stride, stride, 1))
      term = tap * kernel[i, j, 0]
      out = term if out is None else out + term
  return out
