"""Image operations every data pipeline and tool shares, as OpenCV / mmcv compute them.

Keep-ratio sizes (`mmcv.rescale_size`), bilinear resizing with half-pixel centres and no
antialiasing (cv2.INTER_LINEAR, which mmcv uses), bottom-right padding, and ImageNet
normalisation on the 0-255 scale. Pure numpy; images are `[H, W, C]` uint8 or float, RGB.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# ImageNet statistics on the 0-255 scale, RGB (mmseg / mmdet `data_preprocessor`).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


def rescale_size(size: tuple[int, int], scale: Sequence[int]) -> tuple[int, int]:
  """`(height, width)` of a keep-ratio resize (`mmcv.rescale_size`): long edge at most
  `max(scale)`, short edge at most `min(scale)`, e.g. `(2048, 512)` for ADE20K; sides at
  least 1 (`scale_size`)."""
  h, w = size
  return scale_size(size, min(max(scale) / max(h, w), min(scale) / min(h, w)))


def scale_size(size: Sequence[int], factor: float) -> tuple[int, int]:
  """`(height, width)` times `factor` as mmcv `_scale_size` rounds it, `int(x * factor + 0.5)`,
  but at least 1: mmcv gives a 12x10000 strip fitted into (64, 32) 0 rows, which no resize
  takes; 1 row keeps its aspect as nearly as a whole pixel can."""
  return tuple(max(1, int(s * factor + 0.5)) for s in size)


def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Source indices and weights of OpenCV INTER_LINEAR along one axis."""
  src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
  src = np.clip(src, 0, n_in - 1)
  i0 = np.floor(src).astype(np.int64)
  i1 = np.minimum(i0 + 1, n_in - 1)
  return i0, i1, (src - i0).astype(np.float32)


def resize_image(
    image: np.ndarray, size: tuple[int, int], window: tuple[int, int, int, int] | None = None
) -> np.ndarray:
  """Bilinear resize `[H, W, C]` -> `[height, width, C]`, same dtype (uint8 rounded), with
  half-pixel centers and no antialiasing (cv2.INTER_LINEAR).

  `window=(y0, y1, x0, x1)` computes only `resize_image(image, size)[y0:y1, x0:x1]` (the
  training pipeline resizes up to 2x, then crops).
  """
  h, w = image.shape[:2]
  out_h, out_w = size
  y_lo, y_hi, x_lo, x_hi = window or (0, out_h, 0, out_w)
  if (h, w) == (out_h, out_w):
    return image[y_lo:y_hi, x_lo:x_hi].copy()
  y0, y1, wy = (a[y_lo:y_hi] for a in _linear_taps(h, out_h))
  x0, x1, wx = (a[x_lo:x_hi] for a in _linear_taps(w, out_w))
  x = image.astype(np.float32)
  x = x[y0] * (1 - wy)[:, None, None] + x[y1] * wy[:, None, None]
  x = x[:, x0] * (1 - wx)[None, :, None] + x[:, x1] * wx[None, :, None]
  if image.dtype == np.uint8:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)
  return x.astype(image.dtype)


def normalize(image: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
  """`(image - mean) / std` per channel on the 0-255 scale; returns float32 `[H, W, 3]`."""
  image = image.astype(np.float32)
  return (image - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def pad_image(image: np.ndarray, size: tuple[int, int], pad_value: float = 0) -> np.ndarray:
  """Pads `[h, w, ...]` at the bottom and right to `size` (mmcv `impad`); never crops."""
  h, w = image.shape[:2]
  if h > size[0] or w > size[1]:
    raise ValueError(f'cannot pad an array of size {(h, w)} to the smaller size {tuple(size)}')
  out = np.full(tuple(size) + image.shape[2:], pad_value, dtype=image.dtype)
  out[:h, :w] = image
  return out
