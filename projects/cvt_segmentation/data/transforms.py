"""mmsegmentation's augmentations as functions of an explicit numpy generator.

Images are `[H, W, 3]` RGB (uint8; resizing also takes float), labels `[H, W]` class ids
(255 = ignore).
The ADE20K / Cityscapes training pipeline (mmseg 1.x `configs/_base_/datasets/ade20k.py`):

  RandomResize(scale, ratio_range=(0.5, 2.0), keep_ratio=True)
  -> RandomCrop(crop_size, cat_max_ratio=0.75) -> RandomFlip(0.5)
  -> PhotoMetricDistortion -> normalize (ImageNet mean/std) -> pad to crop size
     (image 0, label 255; mmseg's SegDataPreProcessor pads after normalization).

The pixel work is OpenCV's, as in mmcv / mmseg: `cv2.resize` (bilinear images, nearest
labels), `cv2.cvtColor` for HSV, lookup tables for the uint8 brightness, contrast,
saturation and hue steps (the values mmseg's float arithmetic truncates to).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import cv2
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
  """Nearest-neighbour resize of a label map `[H, W]` to `size`: cv2.INTER_NEAREST, as mmseg
  (`floor(dst * in / out)`, not pixel centres)."""
  return cv2.resize(label, size[::-1], interpolation=cv2.INTER_NEAREST)


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


def random_crop(rng: np.random.Generator, image: np.ndarray, label: np.ndarray,
                crop_size: tuple[int, int], cat_max_ratio: float = 0.75,
                ignore_index: int = IGNORE_INDEX) -> tuple[np.ndarray, np.ndarray]:
  """mmseg `RandomCrop(crop_size, cat_max_ratio)`: `min(H, crop_h) x min(W, crop_w)` views.

  With `cat_max_ratio < 1` a crop needs two classes or more (not counting `ignore_index`),
  the most frequent under `cat_max_ratio` of the labelled pixels; after 10 rejections the
  next draw is used unchecked, exactly as mmseg does. `label` is uint8.
  """
  if label.dtype != np.uint8:
    raise TypeError(f'random_crop: label must be uint8 class ids (255 = ignore), as the '
                    f'datasets give them; got {label.dtype}.')
  y0, y1, x0, x1 = _crop_box(rng, label.shape, crop_size)
  if cat_max_ratio < 1.0:
    for _ in range(10):
      # mmseg counts with np.unique; a histogram gives the same counts without a sort.
      counts = cv2.calcHist([label[y0:y1, x0:x1]], [0], None, [256], [0, 256]).ravel()
      counts[ignore_index] = 0
      if np.count_nonzero(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
        break
      y0, y1, x0, x1 = _crop_box(rng, label.shape, crop_size)
  return image[y0:y1, x0:x1], label[y0:y1, x0:x1]


def random_flip(
    rng: np.random.Generator, image: np.ndarray, label: np.ndarray, prob: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
  """Horizontal flip of image and label together with probability `prob` (copies)."""
  if rng.random() < prob:
    # cv2.flip: reading a reversed numpy view is many times slower for OpenCV and numpy.
    return cv2.flip(image, 1), cv2.flip(label, 1)
  return image, label


def pad(image: np.ndarray, label: np.ndarray | None, size: tuple[int, int], pad_value: float = 0,
        label_pad_value: int = IGNORE_INDEX) -> tuple[np.ndarray, np.ndarray | None]:
  """Pads image and label (or None) bottom and right to `size` (mmcv `impad`); never crops.

  Image fill 0 (mmseg pads after normalization), label fill 255 (ignore).
  """
  padded = pad_image(image, size, pad_value)
  return padded, None if label is None else pad_image(label, size, label_pad_value)


def _lookup(image: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
  # mmseg PhotoMetricDistortion.convert (scale, shift in float32, clip, truncate to uint8)
  # computed for the 256 levels once, then looked up.
  table = np.clip(np.arange(256, dtype=np.float32) * alpha + beta, 0, 255).astype(np.uint8)
  return cv2.LUT(image, table)


def photometric_distortion(rng: np.random.Generator, image: np.ndarray, brightness_delta: int = 32,
                           contrast_range: tuple[float, float] = (0.5, 1.5),
                           saturation_range: tuple[float, float] = (0.5, 1.5),
                           hue_delta: int = 18) -> np.ndarray:
  """mmseg `PhotoMetricDistortion` of a uint8 `[H, W, 3]` image: brightness, contrast,
  saturation, hue.

  Each applied with probability 1/2, contrast second or last (coin flip), the draws in
  mmseg's order, uint8 truncated after each step; saturation and hue each go to OpenCV's
  8-bit HSV and back, `hue_delta` in its units (180 = full circle), from [-delta, delta).
  """
  if image.dtype != np.uint8:
    raise TypeError(f'photometric_distortion takes uint8 images (as mmseg), got {image.dtype}')

  def contrast(img):
    if rng.integers(2):
      return _lookup(img, alpha=rng.uniform(*contrast_range))
    return img

  img = image
  if rng.integers(2):
    img = _lookup(img, beta=rng.uniform(-brightness_delta, brightness_delta))
  contrast_first = rng.integers(2) == 1
  if contrast_first:
    img = contrast(img)
  if rng.integers(2):
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
    hsv[..., 1] = _lookup(hsv[..., 1], alpha=rng.uniform(*saturation_range))
    img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
  if rng.integers(2):
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
    shift = int(rng.integers(-hue_delta, hue_delta))
    hsv[..., 0] = cv2.LUT(hsv[..., 0], ((np.arange(256) + shift) % 180).astype(np.uint8))
    img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
  if not contrast_first:
    img = contrast(img)
  return img


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
    if self.scale is not None:
      image, label = random_resize(rng, image, label, self.scale, self.ratio_range)
    image, label = random_crop(rng, image, label, self.crop_size, self.cat_max_ratio,
                               self.ignore_index)
    image, label = random_flip(rng, image, label, self.flip_prob)
    if self.photometric:
      image = photometric_distortion(rng, image)
    h, w = label.shape
    # Padded in uint8 and normalised once (one float array, not two); mmseg pads after
    # normalising, so the padding is then set to 0.
    image, label = pad(image, label, self.crop_size, 0, self.ignore_index)
    image = normalize(image, self.mean, self.std)
    image[h:], image[:, w:] = 0, 0
    return image, label.astype(np.int32)


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
