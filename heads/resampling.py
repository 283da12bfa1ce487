"""Resizing and adaptive pooling of `[N, H, W, C]` maps, equal to PyTorch's `F.interpolate`
and `nn.AdaptiveAvgPool2d` to the pixel: converted weights give the reference heads' logits only
if these agree on sizes that are not multiples of each other (62/31/16 maps for 250 px).
Index tables are numpy at trace time for static sizes, the same float32 arithmetic on `iota`
in the graph where a size is symbolic (a model exported once for every size)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from heads.features import as_size, is_symbolic


def _spatial_size(size: Sequence[int]) -> tuple[int, int]:
  if len(size) != 2:
    raise ValueError(f'Expected a (height, width) size, got {tuple(size)}.')
  return as_size(size[0]), as_size(size[1])


def _xp(*sizes: int) -> Any:
  """numpy for static sizes (index tables built at trace time), jax.numpy where a size is a
  symbolic dimension of `jax.export` (the same float32 arithmetic, on `iota` in the graph)."""
  return jnp if is_symbolic(*sizes) else np


def _check_nhwc(x: jax.Array, what: str) -> None:
  if x.ndim != 4:
    raise ValueError(f'{what} expects an [N, H, W, C] array, got shape {tuple(x.shape)}.')


def _bilinear_taps(in_size: int, out_size: int, align_corners: bool) -> tuple[Any, Any, Any]:
  """Source taps of `F.interpolate(..., mode='bilinear')` along one axis: the two source rows of
  each output and the weight of the second, from PyTorch's `area_pixel_compute_source_index`
  in float32 like its CPU kernel (float64 positions move the weights by up to 1e-5)."""
  xp = _xp(in_size, out_size)
  in_f, out_f = xp.asarray(in_size, xp.float32), xp.asarray(out_size, xp.float32)
  dst = xp.arange(out_size, dtype=xp.float32)
  if not align_corners:
    # max(p, 0.5) - 0.5 is max(p - 0.5, 0) exactly (the subtraction is exact), and keeps XLA
    # from fusing the product and the subtraction into one differently rounded FMA.
    half = xp.float32(0.5)
    src = xp.maximum((dst + half) * (in_f / out_f), half) - half
  elif xp is np:
    # PyTorch samples the first pixel when there is a single output.
    src = dst * (xp.float32(in_size - 1) / xp.float32(out_size - 1) if out_size > 1
                 else xp.float32(0.0))
  else:
    src = dst * jnp.where(out_f > 1, (in_f - 1) / jnp.maximum(out_f - 1, 1), 0).astype(
        jnp.float32)
  lo = xp.clip(xp.floor(src).astype(xp.int32), 0, in_size - 1)
  return lo, xp.minimum(lo + 1, in_size - 1), (src - lo.astype(xp.float32)).astype(xp.float32)


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
  if not align_corners and _xp(h, w, out_h, out_w) is np:
    return jax.image.resize(x, (n, out_h, out_w, c), method='bilinear', antialias=False)
  # align_corners=True is not a scale-and-translate of pixel areas at the edges, and
  # jax.image.resize needs static sizes, so these are two gathers and a lerp per axis.
  for axis, in_size, out_size in ((1, h, out_h), (2, w, out_w)):
    if in_size == out_size:
      continue
    lo, hi, frac = _bilinear_taps(in_size, out_size, align_corners)
    shape = [1, 1, 1, 1]
    shape[axis] = out_size
    frac = jnp.asarray(frac, dtype=x.dtype).reshape(shape)
    x_lo = jnp.take(x, jnp.asarray(lo), axis=axis)
    x_hi = jnp.take(x, jnp.asarray(hi), axis=axis)
    x = x_lo + (x_hi - x_lo) * frac
  return x


def bilinear_matrix(in_size: int, out_size: int, *, align_corners: bool = False) -> np.ndarray:
  """`resize_bilinear` along one axis as an `[out_size, in_size]` float32 matrix (two taps a
  row), to resize a block at a time."""
  lo, hi, frac = _bilinear_taps(in_size, out_size, align_corners)
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
    xp = _xp(in_size, out_size)
    scale = xp.asarray(in_size, xp.float32) / xp.asarray(out_size, xp.float32)
    src = xp.floor(xp.arange(out_size, dtype=xp.float32) * scale).astype(xp.int32)
    x = jnp.take(x, jnp.asarray(xp.minimum(src, in_size - 1)), axis=axis)
  return x


def adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
  """`[out_size, in_size]` weights of `nn.AdaptiveAvgPool` along one axis: bin `i` averages
  rows `floor(i * in / out)` to `ceil((i + 1) * in / out)` (aten AdaptiveAveragePooling.cpp)."""
  xp = _xp(in_size, out_size)
  bins, rows = xp.arange(out_size)[:, None], xp.arange(in_size)[None, :]
  start = (bins * in_size) // out_size
  end = -((-(bins + 1) * in_size) // out_size)  # ceil division
  inside = (rows >= start) & (rows < end)
  return xp.where(inside, 1.0 / (end - start), 0.0).astype(xp.float32)


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
