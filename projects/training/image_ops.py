"""Image operations every data pipeline and tool shares, as OpenCV / mmcv compute them.

Keep-ratio sizes (`mmcv.rescale_size`), bilinear resizing with half-pixel centres and no
antialiasing (cv2.INTER_LINEAR, which mmcv uses), bottom-right padding, and ImageNet
normalisation on the 0-255 scale. numpy and OpenCV (mmcv's kernels), the latter imported
where used: the deploy tools take the statistics and `normalize` (traced) from here on
installs without it. Images are `[H, W, C]` uint8 or float, RGB.
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


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Bilinear resize `[H, W, C]` -> `[height, width, C]`, same dtype (uint8, uint16, int16,
  float32 or float64): `cv2.resize` with INTER_LINEAR, as mmcv (half-pixel centres, no
  antialiasing; uint8 in OpenCV's fixed point)."""
  import cv2

  out_h, out_w = size
  if image.shape[:2] == (out_h, out_w):
    return image.copy()
  return cv2.resize(image, (out_w, out_h), interpolation=cv2.INTER_LINEAR).reshape(
      (out_h, out_w) + image.shape[2:])


def normalize(image: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
  """`(image - mean) / std` per channel on the 0-255 scale; returns float32 `[..., 3]`.

  numpy uint8 `[H, W, 3]` look their pixels up in the 256 normalised values of each channel
  (the same float32 numbers, several times faster); other arrays, jax's too, are computed.
  """
  if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3:
    import cv2

    return cv2.LUT(image, normalize(np.arange(256, dtype=np.float32)[:, None, None], mean, std))
  image = image.astype(np.float32)
  return (image - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def pad_image(image: np.ndarray, size: tuple[int, int], pad_value: float = 0) -> np.ndarray:
  """Pads `[h, w, ...]` at the bottom and right to `size` (mmcv `impad`); never crops.

  An array already of `size` is returned as it is, not copied."""
  h, w = image.shape[:2]
  if h > size[0] or w > size[1]:
    raise ValueError(f'cannot pad an array of size {(h, w)} to the smaller size {tuple(size)}')
  if (h, w) == tuple(size):
    return image
  out = np.full(tuple(size) + image.shape[2:], pad_value, dtype=image.dtype)
  out[:h, :w] = image
  return out
