"""Resizing and adaptive pooling of `[N, H, W, C]` maps, equal to PyTorch's `F.interpolate`
and `nn.AdaptiveAvgPool2d` to the pixel: converted weights give the reference heads' logits only
if these agree on sizes that are not multiples of each other (62/31/16 maps for 250 px).
Index arithmetic is static (shapes are Python ints at trace time)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _spatial_size(size: Sequence[int]) -> tuple[int, int]:
  if len(size) != 2:
    raise ValueError(f'Expected a (height, width) size, got {tuple(size)}.')
  return int(size[0]), int(size[1])


def _check_nhwc(x: jax.Array, what: str) -> None:
  if x.ndim != 4:
    raise ValueError(f'{what} expects an [N, H, W, C] array, got shape {tuple(x.shape)}.')


def _align_corners_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Source taps of `F.interpolate(..., mode='bilinear', align_corners=True)` along one axis."""
  if out_size > 1:
    scale = np.float32(in_size - 1) / np.float32(out_size - 1)
  else:
    scale = np.float32(0.0)  # PyTorch samples the first pixel when there is a single output.
  # float32 like PyTorch's CPU kernel: float64 positions move the weights by up to 1e-5.
  return _taps(np.arange(out_size, dtype=np.float32) * scale, in_size)


def _taps(src: np.ndarray, in_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The two source rows of each output and the weight of the second, for sources `src`."""
  lo = np.clip(np.floor(src).astype(np.int64), 0, in_size - 1)
  return lo, np.minimum(lo + 1, in_size - 1), (src - lo.astype(np.float32)).astype(np.float32)


def resize_bilinear(x: jax.Array, size: Sequence[int], *,
                    align_corners: bool = False) -> jax.Array:
  """`[N, H, W, C]` -> `[N, H_out, W_out, C]`, as `F.interpolate(x, size, mode='bilinear')`:
  half-pixel centres without antialiasing (`jax.image.resize`'s default antialiasing would
  low-pass filter when downsampling), or corner pixel centres mapped onto each other."""
  _check_nhwc(x, 'resize_bilinear')
  out_h, out_w = _spatial_size(size)
  n, h, w, c = x.shape
  if (h, w) == (out_h, out_w):
    return x
  if not align_corners:
    return jax.image.resize(x, (n, out_h, out_w, c), method='bilinear', antialias=False)
  # align_corners=True is not a scale-and-translate of pixel areas at the edges, so it is
  # written as two static gathers and a lerp per axis.
  for axis, in_size, out_size in ((1, h, out_h), (2, w, out_w)):
    if in_size == out_size:
      continue
    lo, hi, frac = _align_corners_taps(in_size, out_size)
    shape = [1, 1, 1, 1]
    shape[axis] = out_size
    frac = jnp.asarray(frac, dtype=x.dtype).reshape(shape)
    x_lo = jnp.take(x, jnp.asarray(lo), axis=axis)
    x_hi = jnp.take(x, jnp.asarray(hi), axis=axis)
    x = x_lo + (x_hi - x_lo) * frac
  return x


def bilinear_matrix(in_size: int, out_size: int, *, align_corners: bool = False) -> np.ndarray:
  """`resize_bilinear` along one axis as an `[out_size, in_size]` float32 matrix (two taps a
  row; PyTorch's `area_pixel_compute_source_index` in float32), to resize a block at a time."""
  if align_corners:
    lo, hi, frac = _align_corners_taps(in_size, out_size)
  else:
    scale = np.float32(in_size) / np.float32(out_size)
    lo, hi, frac = _taps(np.maximum((np.arange(out_size, dtype=np.float32) + np.float32(0.5))
                                    * scale - np.float32(0.5), np.float32(0.0)), in_size)
  matrix = np.zeros((out_size, in_size), np.float32)
  rows = np.arange(out_size)
  np.add.at(matrix, (rows, lo), np.float32(1.0) - frac)
  np.add.at(matrix, (rows, hi), frac)
  return matrix


def resize_nearest(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """`[N, H, W, C]` -> `[N, H_out, W_out, C]`, as `F.interpolate(x, size, mode='nearest')`:
  PyTorch's legacy `floor(dst * in / out)` (the FPNs of mmdet, detectron2 and torchvision),
  not the half-pixel rows of `jax.image.resize`."""
  _check_nhwc(x, 'resize_nearest')
  out_h, out_w = _spatial_size(size)
  for axis, in_size, out_size in ((1, x.shape[1], out_h), (2, x.shape[2], out_w)):
    if in_size == out_size:
      continue
    # PyTorch computes the scale and the product in float32; do the same so rounding agrees.
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    x = jnp.take(x, jnp.asarray(np.minimum(src, in_size - 1)), axis=axis)
  return x


def adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
  """`[out_size, in_size]` weights of `nn.AdaptiveAvgPool` along one axis: bin `i` averages
  rows `floor(i * in / out)` to `ceil((i + 1) * in / out)` (aten AdaptiveAveragePooling.cpp)."""
  weights = np.zeros((out_size, in_size), np.float32)
  for i in range(out_size):
    start = (i * in_size) // out_size
    end = -((-(i + 1) * in_size) // out_size)  # ceil division
    weights[i, start:end] = 1.0 / (end - start)
  return weights


def adaptive_avg_pool(x: jax.Array, size: int | Sequence[int]) -> jax.Array:
  """`[N, H, W, C]` -> `[N, H_out, W_out, C]`, as `nn.AdaptiveAvgPool2d(size)` (int or pair):
  two small static matrix products, exact and cheap for the few-pixel outputs of a PPM."""
  _check_nhwc(x, 'adaptive_avg_pool')
  out_h, out_w = (size, size) if isinstance(size, int) else _spatial_size(size)
  pool_h = jnp.asarray(adaptive_pool_matrix(x.shape[1], out_h), dtype=x.dtype)
  pool_w = jnp.asarray(adaptive_pool_matrix(x.shape[2], out_w), dtype=x.dtype)
  # HIGHEST precision: on accelerators the default matmul precision would round the inputs
  # to bf16, and this is an average, not a learned projection.
  return jnp.einsum('ih,jw,nhwc->nijc', pool_h, pool_w, x, precision=jax.lax.Precision.HIGHEST)
