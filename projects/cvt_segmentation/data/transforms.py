"""mmsegmentation's augmentations as pure numpy functions of an explicit generator.

Images are `[H, W, 3]` RGB (uint8 or float), labels `[H, W]` class ids (255 = ignore).
The ADE20K / Cityscapes training pipeline (mmseg 1.x `configs/_base_/datasets/ade20k.py`):

  RandomResize(scale, ratio_range=(0.5, 2.0), keep_ratio=True)
  -> RandomCrop(crop_size, cat_max_ratio=0.75) -> RandomFlip(0.5)
  -> PhotoMetricDistortion -> normalize (ImageNet mean/std) -> pad to crop size
     (image 0, label 255; mmseg's SegDataPreProcessor pads after normalization).

Resizing follows OpenCV, as mmcv: bilinear with half-pixel centers and no antialiasing
for images, `floor(dst * in / out)` nearest for labels.
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


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Nearest-neighbour resize of a label map `[H, W]` to `size`, as cv2.INTER_NEAREST."""
  h, w = label.shape[:2]
  out_h, out_w = size
  # OpenCV's nearest uses floor(dst * in / out), not pixel centers; mmseg inherits it.
  ys = np.minimum(np.floor(np.arange(out_h) * (h / out_h)).astype(np.int64), h - 1)
  xs = np.minimum(np.floor(np.arange(out_w) * (w / out_w)).astype(np.int64), w - 1)
  return label[ys[:, None], xs[None, :]]


def random_resize_size(rng: np.random.Generator, size: tuple[int, int], scale: Sequence[int],
                       ratio_range: tuple[float, float] = (0.5, 2.0)) -> tuple[int, int]:
  """Output `(height, width)` of mmseg `RandomResize` for an input of `size` (one draw)."""
  lo, hi = ratio_range
  ratio = rng.random() * (hi - lo) + lo
  return rescale_size(size, (int(scale[0] * ratio), int(scale[1] * ratio)))


def random_resize(rng: np.random.Generator, image: np.ndarray, label: np.ndarray,
                  scale: Sequence[int],
                  ratio_range: tuple[float, float] = (0.5, 2.0)) -> tuple[np.ndarray, np.ndarray]:
  """mmseg `RandomResize(scale, ratio_range, keep_ratio=True)`: a keep-ratio resize to fit
  `r * scale` (`rescale_size`), r ~ U(ratio_range); image bilinear, label nearest."""
  size = random_resize_size(rng, image.shape[:2], scale, ratio_range)
  return resize_image(image, size), resize_label(label, size)


def _crop_box(rng: np.random.Generator, shape: tuple[int, int], crop_size: tuple[int, int]):
  margin_h = max(shape[0] - crop_size[0], 0)
  margin_w = max(shape[1] - crop_size[1], 0)
  y = int(rng.integers(0, margin_h + 1))
  x = int(rng.integers(0, margin_w + 1))
  return y, y + crop_size[0], x, x + crop_size[1]


def random_crop_box(rng: np.random.Generator, label: np.ndarray, crop_size: tuple[int, int],
                    cat_max_ratio: float = 0.75,
                    ignore_index: int = IGNORE_INDEX) -> tuple[int, int, int, int]:
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


def random_crop(rng: np.random.Generator, image: np.ndarray, label: np.ndarray,
                crop_size: tuple[int, int], cat_max_ratio: float = 0.75,
                ignore_index: int = IGNORE_INDEX) -> tuple[np.ndarray, np.ndarray]:
  """mmseg `RandomCrop(crop_size, cat_max_ratio)`: `min(H, crop_h) x min(W, crop_w)`.

  With `cat_max_ratio < 1` a crop needs two classes or more (not counting `ignore_index`),
  the most frequent under `cat_max_ratio` of the labelled pixels; after 10 rejections the
  next draw is used unchecked, exactly as mmseg does.
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


def pad(image: np.ndarray, label: np.ndarray | None, size: tuple[int, int], pad_value: float = 0,
        label_pad_value: int = IGNORE_INDEX) -> tuple[np.ndarray, np.ndarray | None]:
  """Pads image and label (or None) bottom and right to `size` (mmcv `impad`); never crops.

  Image fill 0 (mmseg pads after normalization), label fill 255 (ignore).
  """
  padded = pad_image(image, size, pad_value)
  return padded, None if label is None else pad_image(label, size, label_pad_value)


def rgb_to_hsv(image: np.ndarray) -> np.ndarray:
  """RGB `[H, W, 3]` (0-255) -> float32 HSV in OpenCV's 8-bit convention: H in [0, 180), S
  and V in [0, 255]; not rounded (callers round where OpenCV would)."""
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


def photometric_distortion(rng: np.random.Generator, image: np.ndarray, brightness_delta: int = 32,
                           contrast_range: tuple[float, float] = (0.5, 1.5),
                           saturation_range: tuple[float, float] = (0.5, 1.5),
                           hue_delta: int = 18) -> np.ndarray:
  """mmseg `PhotoMetricDistortion`: brightness, contrast, saturation, hue (same shape, dtype).

  Each applied with probability 1/2, contrast second or last (coin flip), the draws in
  mmseg's order; uint8 is truncated after each step as mmseg does, float (0-255) only
  clipped. `hue_delta` is in OpenCV units (180 = full circle), drawn from [-delta, delta).
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


@dataclasses.dataclass(frozen=True)
class TrainTransform:
  """The mmseg training pipeline: `(image uint8 [H, W, 3], label [H, W], rng) -> (inputs
  float32 [crop_h, crop_w, 3], label int32 [crop_h, crop_w])`.

  `scale`: base `(long, short)` limits of `random_resize` (None: no resize); the rest as
  the functions above; `mean`, `std` on the 0-255 scale, RGB.
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
  """mmseg's test pipeline: keep-ratio resize of the image to `scale` (None: as it is), then
  normalize; the label stays at its original resolution (mmseg scores predictions resized
  back to it)."""

  scale: tuple[int, int] | None = None
  mean: tuple[float, float, float] = IMAGENET_MEAN
  std: tuple[float, float, float] = IMAGENET_STD

  def __call__(self, image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns `(inputs float32 [h, w, 3], label int32 [H, W])`, `(h, w)` the resized size."""
    if self.scale is not None:
      image = resize_image(image, rescale_size(image.shape[:2], self.scale))
    return normalize(image, self.mean, self.std), label.astype(np.int32)
