"""Input images for feature extraction: finding files, reading, resizing, normalizing.

Pixels go to the backbone as the released CvT weights were trained (microsoft/CvT
`lib/dataset/build.py`): RGB in [0, 1], then `(x - mean) / std` with the ImageNet
mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225), NHWC float32.

- Pixels are read by the conversion every tool shares (`projects.tools.input_files.rgb_pixels`):
  greyscale repeated, palettes to their colours, alpha dropped; 16 bits per channel
  (greyscale and colour: medical and aerial scans) scaled by 255 / 65535 as float32,
  keeping the precision the other tools round to their 8-bit copy.
- The EXIF orientation is applied, so maps line up with the image as viewers show it.
- `max_side` only shrinks: the longer side becomes `max_side`, the other keeps the
  aspect ratio (rounded). Resizing uses PIL's bilinear filter, which on downscaling
  averages all input pixels under each output pixel (antialiased, like
  `torchvision`'s `antialias=True`), on float32 pixels (no 8-bit rounding).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from cvt_backbone.cvt import MIN_INPUT_SIZE
from projects.tools import input_files
from projects.tools.input_files import expand_inputs

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# EXIF orientations 5-8 are transposed or rotated by 90 degrees: width and height swap.
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)


class InputError(Exception):
  """An input that cannot be used (missing, not an image, unreadable, too small)."""


@dataclasses.dataclass(frozen=True)
class InputImage:
  """One input file and its output stem (a path relative to the output folder, no suffix)."""

  path: str
  stem: str


def collect_inputs(
    inputs: Sequence[str], exclude_dir: str | None = None
) -> tuple[list[InputImage], list[str], list[str]]:
  """Expands files, folders and glob patterns into inputs with distinct output stems.

  Folders are walked recursively (hidden entries skipped) and every file in them is
  an input, image or not: non-images are reported when probed. A file under a folder
  keeps its sub-folder in the stem (`folder/a/b.png` -> `a/b`); a file named directly
  or by a pattern keeps its base name. Stems that clash (case-insensitively, for
  case-insensitive file systems), e.g. `x/1.png` and `y/1.png` named directly, get
  `_2`, `_3`, ... in input order, with a note, never overwriting each other.

  Args:
    inputs: paths, folders and glob patterns (`**` for recursion).
    exclude_dir: files under this folder are skipped (the output folder).

  Returns:
    `(images, problems, notes)`: the inputs without duplicates; one message per path
    that does not exist or pattern that matches nothing; one note per renamed stem.
  """
  found, problems = expand_inputs(inputs, exclude_dir)
  images, notes = [], []
  taken: dict[str, str] = {}  # casefolded stem -> the path that has it
  for path, stem in found:
    unique, k = stem, 2
    while unique.casefold() in taken:
      unique, k = f'{stem}_{k}', k + 1
    if unique != stem:
      notes.append(f'{path} and {taken[stem.casefold()]} share the output name {stem!r}; '
                   f'writing {path} as {unique!r}')
    taken[unique.casefold()] = path
    images.append(InputImage(path, unique))
  return images, problems, notes


def _open(path: str) -> Image.Image:
  try:
    return Image.open(path)
  except UnidentifiedImageError:
    raise InputError(f'{path}: not an image file') from None
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise InputError(f'{path}: unreadable image ({e})') from None


def probe_size(path: str) -> tuple[int, int]:
  """`(height, width)` as displayed (EXIF orientation applied), from the header only.

  Raises:
    InputError: PIL does not recognise the file as an image.
  """
  with _open(path) as im:
    width, height = im.size
    orientation = input_files.exif_orientation(im)  # The rule `read_image` applies.
  return (width, height) if orientation in _SWAPPING_ORIENTATIONS else (height, width)


def target_size(height: int, width: int, max_side: int | None) -> tuple[int, int]:
  """The size fed to the model: the longer side shrunk to `max_side`, aspect ratio kept."""
  if max_side is None or max(height, width) <= max_side:
    return height, width
  scale = max_side / max(height, width)
  return max(1, round(height * scale)), max(1, round(width * scale))


def resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Bilinear, antialiased resize of float pixels `[H, W, C]` -> `[h, w, C]` (PIL 'F' mode)."""
  height, width = size
  if image.shape[:2] == (height, width):
    return image
  channels = [
      np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c], np.float32), mode='F')
                 .resize((width, height), Image.Resampling.BILINEAR))
      for c in range(image.shape[-1])
  ]
  return np.stack(channels, axis=-1)


def to_rgb_pixels(im: Image.Image) -> np.ndarray:
  """A PIL image as float32 RGB pixel values in [0, 255], `[H, W, 3]` (no EXIF orientation).

  The conversion all tools share (`projects.tools.input_files.rgb_pixels`), unrounded.

  Raises:
    ImageModeError: float pixels or another mode without a defined RGB reading.
  """
  return input_files.rgb_pixels(im).astype(np.float32, copy=False)


def read_image(path: str, size: tuple[int, int] | None = None) -> np.ndarray:
  """Reads an image file as float32 RGB pixels in [0, 255], `[H, W, 3]`, resized to `size`.

  The EXIF orientation is applied; the values are those `projects.tools.input_files.read_image`
  rounds to uint8.

  Raises:
    InputError: not an image, a truncated or corrupt one, or one without a defined RGB
      reading (float pixels).
  """
  try:
    pixels = input_files.read_pixels(path, apply_exif=True).astype(np.float32, copy=False)
  except UnidentifiedImageError:
    raise InputError(f'{path}: not an image file') from None
  except input_files.ImageModeError as e:
    raise InputError(str(e)) from None
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise InputError(f'{path}: unreadable image ({e})') from None
  return resize(pixels, size) if size is not None else pixels


def check_size(height: int, width: int, path: str = 'the image') -> None:
  """Raises `InputError` for images the backbone cannot take (a side under 16 pixels)."""
  if min(height, width) < MIN_INPUT_SIZE:
    raise InputError(f'{path}: {height}x{width} pixels; CvT needs at least '
                     f'{MIN_INPUT_SIZE}x{MIN_INPUT_SIZE}')


def normalize(pixels: np.ndarray) -> np.ndarray:
  """RGB pixel values in [0, 255] -> ImageNet-normalized float32 (same shape)."""
  mean = np.asarray(IMAGENET_MEAN, np.float32) * 255
  std = np.asarray(IMAGENET_STD, np.float32) * 255
  return ((np.asarray(pixels, np.float32) - mean) / std).astype(np.float32)
