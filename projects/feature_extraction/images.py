"""Input images of cvt-extract: size to the model, resizing, normalization.

Pixels are read by the datasets' and tools' reader (`projects.training.images`), unrounded,
and normalized as the released CvT weights were trained (microsoft/CvT
`lib/dataset/build.py`): RGB / 255, minus the ImageNet mean, over its std.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from cvt_backbone.cvt import MIN_INPUT_SIZE
from projects.training import images
from projects.training.images import ImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def target_size(height: int, width: int, max_side: int | None) -> tuple[int, int]:
  """The size fed to the model: the longer side shrunk to `max_side`, aspect ratio kept."""
  if max_side is None or max(height, width) <= max_side:
    return height, width
  scale = max_side / max(height, width)
  return max(1, round(height * scale)), max(1, round(width * scale))


def resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """float `[H, W, C]` -> `[h, w, C]`, PIL bilinear on 'F' planes (antialiased when shrinking)."""
  height, width = size
  if image.shape[:2] == (height, width):
    return image
  channels = [
      np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c], np.float32), mode='F')
                 .resize((width, height), Image.Resampling.BILINEAR))
      for c in range(image.shape[-1])
  ]
  return np.stack(channels, axis=-1)


def read_image(path: str, size: tuple[int, int] | None = None) -> np.ndarray:
  """float32 RGB `[H, W, 3]` in [0, 255] as shown (EXIF applied), resized to `size`.

  Raises:
    ImageError: not an image, damaged, or without a defined RGB reading.
  """
  pixels = images.read_image(path, exact=True)
  return resize(pixels, size) if size is not None else pixels


def model_size(height: int, width: int, max_side: int | None,
               path: str = 'the image') -> tuple[int, int]:
  """`target_size`; `ImageError` when the backbone cannot take it (a side under 16 pixels),
  naming the image's size and the shrunk one."""
  size = target_size(height, width, max_side)
  if min(size) < MIN_INPUT_SIZE:
    shrunk = '' if size == (height, width) else ', shrunk to {}x{} (max side {})'.format(
        *size, max_side)
    raise ImageError(f'{path}: {height}x{width} pixels{shrunk}; CvT needs at least '
                     f'{MIN_INPUT_SIZE}x{MIN_INPUT_SIZE}')
  return size


def normalize(pixels: np.ndarray) -> np.ndarray:
  """RGB pixel values in [0, 255] -> ImageNet-normalized float32 (same shape)."""
  mean = np.asarray(IMAGENET_MEAN, np.float32) * 255
  std = np.asarray(IMAGENET_STD, np.float32) * 255
  return ((np.asarray(pixels, np.float32) - mean) / std).astype(np.float32)
