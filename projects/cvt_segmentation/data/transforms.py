"""Segmentation augmentations of mmsegmentation, as small pure numpy functions.

Each function takes an image `[H, W, 3]` (uint8 or float, RGB) and, where it
matters, a label map `[H, W]` (integer class ids, 255 = ignore), plus an explicit
`np.random.Generator`; none keeps state. Together they reproduce the mmsegmentation
training pipeline used by the ADE20K / Cityscapes recipes (mmseg 1.x,
`configs/_base_/datasets/ade20k.py`):

  RandomResize(scale, ratio_range=(0.5, 2.0), keep_ratio=True)
  -> RandomCrop(crop_size, cat_max_ratio=0.75) -> RandomFlip(0.5)
  -> PhotoMetricDistortion -> normalize (ImageNet mean/std) -> pad to crop size
     (image 0, label 255; done by mmseg's SegDataPreProcessor after normalization).

Resizing follows OpenCV (which mmcv uses): bilinear with half-pixel centers and no
antialiasing for images, `floor(dst * in / out)` nearest for labels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from projects.training.image_ops import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    normalize,
    pad_image,
    rescale_size,
    resize_image,
)

IGNORE_INDEX = 255

# ------------------------------------------------------------------- resizing


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Nearest-neighbour resize of a label map, as cv2.INTER_NEAREST.

  Args:
    label: `[H, W]` integer map.
    size: output `(height, width)`.

  Returns:
    `[height, width]`, same dtype.
  """
  h, w = label.shape[:2]
  out_h, out_w = size
  # OpenCV's nearest uses floor(dst * in / out), not pixel centers; mmseg inherits it.
  ys = np.minimum(np.floor(np.arange(out_h) * (h / out_h)).astype(np.int64), h - 1)
  xs = np.minimum(np.floor(np.arange(out_w) * (w / out_w)).astype(np.int64), w - 1)
  return label[ys[:, None], xs[None, :]]


def random_resize_size(
    rng: np.random.Generator,
    size: tuple[int, int],
    scale: Sequence[int],
    ratio_range: tuple[float, float] = (0.5, 2.0),
) -> tuple[int, int]:
  """Output `(height, width)` of mmseg `RandomResize` for an input of `size` (one draw)."""
  lo, hi = ratio_range
  ratio = rng.random() * (hi - lo) + lo
  return rescale_size(size, (int(scale[0] * ratio), int(scale[1] * ratio)))


def random_resize(
    rng: np.random.Generator,
    image: np.ndarray,
    label: np.ndarray,
    scale: Sequence[int],
    ratio_range: tuple[float, float] = (0.5, 2.0),
) -> tuple[np.ndarray, np.ndarray]:
  """mmseg `RandomResize(scale, ratio_range, keep_ratio=True)`.

  A ratio r ~ U(ratio_range) multiplies both limits of `scale`; the image is then
  rescaled keeping its aspect ratio to fit `r * scale` (see `rescale_size`).

  Args:
    rng: random generator (one uniform draw).
    image: `[H, W, 3]`.
    label: `[H, W]`.
    scale: base edge limits, e.g. `(2048, 512)`.
    ratio_range: `(min, max)` multiplier of `scale`.

  Returns:
    Resized `(image, label)`, image bilinear, label nearest.
  """
  size = random_resize_size(rng, image.shape[:2], scale, ratio_range)
  return resize_image(image, size), resize_label(label, size)


# ------------------------------------------------------------- crop, flip, pad


def _crop_box(rng: np.random.Generator, shape: tuple[int, int], crop_size: tuple[int, int]):
  margin_h = max(shape[0] - crop_size[0], 0)
  margin_w = max(shape[1] - crop_size[1], 0)
  y = int(rng.integers(0, margin_h + 1))
  x = int(rng.integers(0, margin_w + 1))
  return y, y + crop_size[0], x, x + crop_size[1]


def random_crop_box(
    rng: np.random.Generator,
    label: np.ndarray,
    crop_size: tuple[int, int],
    cat_max_ratio: float = 0.75,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[int, int, int, int]:
  """The `(y0, y1, x0, x1)` box of mmseg `RandomCrop` (see `random_crop`)."""
  box = _crop_box(rng, label.shape, crop_size)
  if cat_max_ratio < 1.0:
    for _ in range(10):
      y0, y1, x0, x1 = box
      classes, counts = np.unique(label[y0:y1, x0:x1], return_counts=True)
      counts = counts[classes != ignore_index]
      if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
        break
      box = _crop_box(rng, label.shape, crop_size)
  return box


def random_crop(
    rng: np.random.Generator,
    image: np.ndarray,
    label: np.ndarray,
    crop_size: tuple[int, int],
    cat_max_ratio: float = 0.75,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[np.ndarray, np.ndarray]:
  """mmseg `RandomCrop(crop_size, cat_max_ratio)`.

  If `cat_max_ratio < 1`, a crop is accepted only if it holds at least two classes
  (ignoring `ignore_index`) and the most frequent covers less than `cat_max_ratio` of
  the labelled pixels; up to 10 rejected crops are redrawn, and after the 10th
  rejection the next draw is used unchecked, exactly as mmseg does. Images smaller
  than the crop give a smaller output (padded later by `pad`).

  Args:
    rng: random generator.
    image: `[H, W, 3]`.
    label: `[H, W]`.
    crop_size: `(height, width)`.
    cat_max_ratio: maximum share of one class in the crop; 1 disables the check.
    ignore_index: label value not counted.

  Returns:
    `(image, label)` of size `min(H, crop_h) x min(W, crop_w)`.
  """
  y0, y1, x0, x1 = random_crop_box(rng, label, crop_size, cat_max_ratio, ignore_index)
  return image[y0:y1, x0:x1], label[y0:y1, x0:x1]


def random_flip(
    rng: np.random.Generator, image: np.ndarray, label: np.ndarray, prob: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
  """Horizontal flip of image and label together with probability `prob`."""
  if rng.random() < prob:
    return image[:, ::-1], label[:, ::-1]
  return image, label


def pad(
    image: np.ndarray,
    label: np.ndarray | None,
    size: tuple[int, int],
    pad_value: float = 0,
    label_pad_value: int = IGNORE_INDEX,
) -> tuple[np.ndarray, np.ndarray | None]:
  """Pads bottom and right to `size` (mmcv `impad`); never crops.

  Args:
    image: `[H, W, C]` with `H <= size[0]`, `W <= size[1]`.
    label: `[H', W']` or None.
    size: `(height, width)` of the output.
    pad_value: image fill (0: mmseg pads after normalization).
    label_pad_value: label fill (255 = ignore).

  Returns:
    `(image [size..., C], label [size...] or None)`.
  """

  padded = pad_image(image, size, pad_value)
  return padded, None if label is None else pad_image(label, size, label_pad_value)


# ------------------------------------------------------- photometric distortion


def rgb_to_hsv(image: np.ndarray) -> np.ndarray:
  """RGB -> HSV in OpenCV's 8-bit convention: H in [0, 180), S and V in [0, 255].

  Args:
    image: `[H, W, 3]` on the 0-255 scale.

  Returns:
    float32 `[H, W, 3]` (not rounded; callers round where OpenCV would).
  """
  x = image.astype(np.float32)
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  v = np.maximum(np.maximum(r, g), b)
  diff = v - np.minimum(np.minimum(r, g), b)
  out = np.empty(x.shape, np.float32)
  out[..., 1] = 255 * diff / np.maximum(v, 1)  # v == 0 implies diff == 0
  # Grey pixels (diff 0) have equal channels, so every numerator below is 0 there.
  inv = 30 / np.maximum(diff, 1)  # 60 degrees per unit, halved for the 0-180 range
  h = np.where(v == g, (b - r) * inv + 60, (r - g) * inv + 120)
  h = np.where(v == r, (g - b) * inv, h)
  out[..., 0] = np.where(h < 0, h + 180, h)
  out[..., 2] = v
  return out


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
  """Inverse of `rgb_to_hsv` (OpenCV 8-bit convention); returns float32 `[H, W, 3]`."""
  h = hsv[..., 0].astype(np.float32) * 2 / 60  # hue in sixths of the circle
  s = hsv[..., 1].astype(np.float32) / 255
  v = hsv[..., 2].astype(np.float32)
  # Closed form per channel n in (5, 3, 1) for (r, g, b): v - v s clip(min(k, 4 - k), 0, 1).
  out = np.empty(hsv.shape, np.float32)
  for c, n in enumerate((5, 3, 1)):
    k = (n + h) % 6
    out[..., c] = v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1)
  return out


def _convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0, as_uint8: bool = True):
  # mmseg PhotoMetricDistortion.convert: scale, shift, clip, truncate to uint8.
  x = np.clip(x.astype(np.float32) * alpha + beta, 0, 255)
  return x.astype(np.uint8) if as_uint8 else x


def photometric_distortion(
    rng: np.random.Generator,
    image: np.ndarray,
    brightness_delta: int = 32,
    contrast_range: tuple[float, float] = (0.5, 1.5),
    saturation_range: tuple[float, float] = (0.5, 1.5),
    hue_delta: int = 18,
) -> np.ndarray:
  """mmseg `PhotoMetricDistortion`: brightness, contrast, saturation, hue.

  Each of the four is applied with probability 1/2; contrast comes second or last
  (coin flip). The random draws happen in mmseg's order. A uint8 image is truncated to
  uint8 after each step as mmseg does; a float image (0-255 scale) is only clipped.

  Args:
    rng: random generator.
    image: `[H, W, 3]` RGB, uint8 or float on the 0-255 scale.
    brightness_delta: shift drawn from U(-delta, delta).
    contrast_range: multiplier range.
    saturation_range: multiplier range of S in HSV.
    hue_delta: H shift (OpenCV units, 180 = full circle) drawn from [-delta, delta).

  Returns:
    Distorted image, same shape and dtype.
  """
  as_uint8 = image.dtype == np.uint8

  def contrast(img):
    if rng.integers(2):
      return _convert(img, alpha=rng.uniform(*contrast_range), as_uint8=as_uint8)
    return img

  img = image
  if rng.integers(2):
    img = _convert(img, beta=rng.uniform(-brightness_delta, brightness_delta), as_uint8=as_uint8)
  contrast_first = rng.integers(2) == 1
  if contrast_first:
    img = contrast(img)
  if rng.integers(2):
    hsv = rgb_to_hsv(img)
    if as_uint8:  # OpenCV's 8-bit HSV image is rounded.
      hsv = np.rint(hsv)
    hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(*saturation_range), as_uint8=as_uint8)
    img = _from_hsv(hsv, as_uint8)
  if rng.integers(2):
    hsv = rgb_to_hsv(img)
    if as_uint8:
      hsv = np.rint(hsv)
    hsv[..., 0] = (hsv[..., 0] + int(rng.integers(-hue_delta, hue_delta))) % 180
    img = _from_hsv(hsv, as_uint8)
  if not contrast_first:
    img = contrast(img)
  return img.astype(image.dtype, copy=False)


def _from_hsv(hsv: np.ndarray, as_uint8: bool) -> np.ndarray:
  rgb = hsv_to_rgb(hsv)
  return np.clip(np.rint(rgb), 0, 255).astype(np.uint8) if as_uint8 else np.clip(rgb, 0, 255)


# ------------------------------------------------------------------ pipelines


@dataclasses.dataclass(frozen=True)
class TrainTransform:
  """The mmseg training pipeline as one pure function of (image, label, rng).

  Attributes:
    crop_size: `(height, width)` of every output.
    scale: base `(long, short)` edge limits of `random_resize`, e.g. `(2048, 512)`; None
      skips resizing.
    ratio_range: multiplier range of `scale`.
    cat_max_ratio: `random_crop` class-share limit (1 disables).
    flip_prob: probability of a horizontal flip.
    photometric: whether to apply `photometric_distortion`.
    mean: normalization mean (0-255 scale, RGB).
    std: normalization std.
    ignore_index: label value for ignored and padded pixels.
  """

  crop_size: tuple[int, int]
  scale: tuple[int, int] | None = None
  ratio_range: tuple[float, float] = (0.5, 2.0)
  cat_max_ratio: float = 0.75
  flip_prob: float = 0.5
  photometric: bool = True
  mean: tuple[float, float, float] = IMAGENET_MEAN
  std: tuple[float, float, float] = IMAGENET_STD
  ignore_index: int = IGNORE_INDEX

  def __call__(
      self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator
  ) -> tuple[np.ndarray, np.ndarray]:
    """Augments one example.

    Args:
      image: `[H, W, 3]` uint8 RGB.
      label: `[H, W]` integer labels (255 = ignore).
      rng: generator owning every random decision of this example.

    Returns:
      `(inputs float32 [crop_h, crop_w, 3], label int32 [crop_h, crop_w])`.
    """
    # random_resize then random_crop, fused: the label is resized whole (the crop check
    # needs it) but only the crop window of the image, which is the same result as
    # resizing everything and cropping at a fraction of the cost (up to 16x at ratio 2).
    size = image.shape[:2]
    if self.scale is not None:
      size = random_resize_size(rng, size, self.scale, self.ratio_range)
      label = resize_label(label, size)
    y0, y1, x0, x1 = random_crop_box(
        rng, label, self.crop_size, self.cat_max_ratio, self.ignore_index
    )
    y1, x1 = min(y1, size[0]), min(x1, size[1])
    image = resize_image(image, size, window=(y0, y1, x0, x1))
    label = label[y0:y1, x0:x1]
    image, label = random_flip(rng, image, label, self.flip_prob)
    if self.photometric:
      image = photometric_distortion(rng, image)
    image = normalize(image, self.mean, self.std)
    image, label = pad(image, label.astype(np.int32), self.crop_size, 0, self.ignore_index)
    return image, label


@dataclasses.dataclass(frozen=True)
class EvalTransform:
  """mmseg test pipeline: keep-ratio resize of the image only, then normalize.

  The label stays at its original resolution: mmseg scores predictions resized back
  to the original size.

  Attributes:
    scale: `(long, short)` edge limits of the test resize, e.g. `(2048, 512)`; None keeps
      the image size.
    mean: normalization mean.
    std: normalization std.
  """

  scale: tuple[int, int] | None = None
  mean: tuple[float, float, float] = IMAGENET_MEAN
  std: tuple[float, float, float] = IMAGENET_STD

  def __call__(self, image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns `(inputs float32 [h, w, 3], label int32 [H, W])`, `(h, w)` the resized size."""
    if self.scale is not None:
      image = resize_image(image, rescale_size(image.shape[:2], self.scale))
    return normalize(image, self.mean, self.std), label.astype(np.int32)
