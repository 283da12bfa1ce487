"""Resizing and adaptive pooling of NHWC maps, matching PyTorch's conventions exactly.

The reference heads (mmsegmentation, Hugging Face UperNet and SegFormer, mmdet/detectron2 FPN)
resize with `F.interpolate` and pool with `nn.AdaptiveAvgPool2d`. Converted weights only give
the same logits if these ops agree to the pixel, on sizes that are not multiples of each other
(a 250 px image gives 62/31/16 maps, so a coarse map is never exactly half of the finer one).
All index arithmetic here is static: shapes are Python ints at trace time.
"""

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
  src = np.arange(out_size, dtype=np.float32) * scale
  lo = np.clip(np.floor(src).astype(np.int64), 0, in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = (src - lo.astype(np.float32)).astype(np.float32)
  return lo, hi, frac


def resize_bilinear(
    x: jax.Array, size: Sequence[int], *, align_corners: bool = False
) -> jax.Array:
  """Bilinear resize of the spatial axes, as `F.interpolate(x, size, mode='bilinear')`.

  With `align_corners=False` this is half-pixel-centred sampling without antialiasing (the
  PyTorch default, used by every reference head); `jax.image.resize` implements exactly that
  when `antialias=False` (with its default antialiasing, downsampling would low-pass filter and
  differ from PyTorch). `align_corners=True` maps corner pixel centres onto each other.

  Args:
    x: `[N, H, W, C]`.
    size: target `(H_out, W_out)`.
    align_corners: PyTorch's `align_corners` flag.

  Returns:
    `[N, H_out, W_out, C]` in the dtype of `x`.
  """
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
  """`resize_bilinear` along one axis as a matrix: `out = matrix @ in`.

  Half-pixel sampling as PyTorch's `F.interpolate(..., mode='bilinear', align_corners=False)`
  (`area_pixel_compute_source_index`: source `(dst + 0.5) * in / out - 0.5`, clamped at 0,
  computed in float32), or corner-aligned sampling. Used where the resize must be applied a
  block of rows at a time (`heads.segmentation.loss`).

  Returns:
    `[out_size, in_size]` float32, two taps per row, each row summing to one.
  """
  if align_corners:
    lo, hi, frac = _align_corners_taps(in_size, out_size)
  else:
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.maximum((np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale
                     - np.float32(0.5), np.float32(0.0))
    lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = (src - lo.astype(np.float32)).astype(np.float32)
  matrix = np.zeros((out_size, in_size), np.float32)
  rows = np.arange(out_size)
  np.add.at(matrix, (rows, lo), np.float32(1.0) - frac)
  np.add.at(matrix, (rows, hi), frac)
  return matrix


def resize_nearest(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """Nearest-neighbour resize, as PyTorch's `F.interpolate(x, size, mode='nearest')`.

  PyTorch's legacy 'nearest' picks `floor(dst * in / out)` (no half-pixel offset), which is what
  the FPN top-down path of mmdet, detectron2 and torchvision uses. `jax.image.resize(...,
  'nearest')` uses half-pixel centres and so picks different rows on non-integer ratios.

  Args:
    x: `[N, H, W, C]`.
    size: target `(H_out, W_out)`.

  Returns:
    `[N, H_out, W_out, C]`.
  """
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
  """Averaging weights of `nn.AdaptiveAvgPool` along one axis.

  Bin `i` averages rows `floor(i * in / out)` to `ceil((i + 1) * in / out)` (exclusive), the
  bins of PyTorch's `AdaptiveAvgPool2d` (aten/src/ATen/native/AdaptiveAveragePooling.cpp).
  Bins overlap when `in` is not a multiple of `out`, and when `out > in`.

  Returns:
    `[out_size, in_size]` float32, rows summing to one.
  """
  weights = np.zeros((out_size, in_size), np.float32)
  for i in range(out_size):
    start = (i * in_size) // out_size
    end = -((-(i + 1) * in_size) // out_size)  # ceil division
    weights[i, start:end] = 1.0 / (end - start)
  return weights


def adaptive_avg_pool(x: jax.Array, size: int | Sequence[int]) -> jax.Array:
  """Adaptive average pooling, as PyTorch's `nn.AdaptiveAvgPool2d(size)`.

  Written as two small static matrix products (one per axis), which is exact and cheap:
  the pooled sizes in a pyramid pooling module are at most a few pixels.

  Args:
    x: `[N, H, W, C]`.
    size: output size, an int for a square output or `(H_out, W_out)`.

  Returns:
    `[N, H_out, W_out, C]`.
  """
  _check_nhwc(x, 'adaptive_avg_pool')
  out_h, out_w = (size, size) if isinstance(size, int) else _spatial_size(size)
  pool_h = jnp.asarray(adaptive_pool_matrix(x.shape[1], out_h), dtype=x.dtype)
  pool_w = jnp.asarray(adaptive_pool_matrix(x.shape[2], out_w), dtype=x.dtype)
  # HIGHEST precision: on accelerators the default matmul precision would round the inputs
  # to bf16, and this is an average, not a learned projection.
  return jnp.einsum('ih,jw,nhwc->nijc', pool_h, pool_w, x, precision=jax.lax.Precision.HIGHEST)
