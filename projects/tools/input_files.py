"""Input files of the tools and datasets: expanding command-line inputs, reading images.

`expand_inputs` / `collect_inputs` turn files, folders and glob patterns into input files
with unique output stems; `read_image` reads a photo as a viewer shows it (EXIF orientation
applied), `read_stored_image` a dataset image as stored (annotations refer to those pixels).

Every tool reads pixels through one conversion, `rgb_pixels` (cvt-extract keeps its float
values, the others round them to uint8), so a file reads the same everywhere:
- 8-bit modes go to RGB as OpenCV's `imread` (mmcv, mmsegmentation) reads them: greyscale
  and 1-bit repeated, palettes to their colours, alpha dropped (not composited: a
  transparent pixel keeps its stored colour). CMYK goes by PIL's plain formula (no profile).
- 16 bits per channel (greyscale, grey+alpha, 48-bit RGB, 64-bit RGBA; PNG, TIFF, PGM)
  scale by 255 / 65535, so the uint8 readers give the 8-bit copy `round(value / 257)`.
  PIL keeps only the high byte of 16-bit colour; the low byte is decoded too.
- Images without a defined 0-255 reading (32-bit float 'F', 32-bit integers outside
  0..65535, LAB) are refused with `ImageModeError` rather than guessed at.
"""

from __future__ import annotations

import dataclasses
import glob
import io
import os
import re
import sys
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

_GLOB_CHARS = ('*', '?', '[')


def expand_inputs(inputs: Sequence[str],
                  exclude_dir: str | None = None) -> tuple[list[tuple[str, str]], list[str]]:
  """Files named by `inputs`, each with the output stem it would have.

  Folders are walked recursively (hidden files and folders skipped) and their files keep
  their relative sub-folder in the stem (`folder/a/b.png` -> `a/b`); a file named directly
  or matched by a pattern keeps its base name. Files are not opened here. Stems may clash:
  callers decide how to make them unique.

  Args:
    inputs: paths, folders and glob patterns (`**` for recursion).
    exclude_dir: files under this folder are skipped (the output folder).

  Returns:
    `(files, problems)`: `(path, stem)` in input order without duplicate files, and one
    message per path that does not exist or pattern that matches nothing.
  """
  problems: list[str] = []
  found: list[tuple[str, str]] = []
  exclude = os.path.join(os.path.realpath(exclude_dir), '') if exclude_dir else None

  def add_folder(folder: str) -> None:
    for dirpath, dirnames, filenames in os.walk(folder):
      dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
      for name in sorted(f for f in filenames if not f.startswith('.')):
        path = os.path.join(dirpath, name)
        found.append((path, os.path.splitext(os.path.relpath(path, folder))[0]))

  def add_file(path: str) -> None:
    found.append((path, os.path.splitext(os.path.basename(path))[0]))

  for item in inputs:
    if os.path.isdir(item):
      add_folder(item)
    elif os.path.isfile(item):
      add_file(item)
    elif any(c in item for c in _GLOB_CHARS):
      matches = sorted(glob.glob(item, recursive=True))
      if not matches:
        problems.append(f'{item}: no file matches this pattern')
      for path in matches:
        if os.path.isdir(path):
          add_folder(path)
        elif os.path.isfile(path):
          add_file(path)
    elif re.fullmatch(r'[0-9.]+', item):
      # `--crop-size 512 1024`: argparse hands the second number on as an input.
      problems.append(f'{item}: no such file or folder (a number: lists of numbers are '
                      f'written with commas, such as --crop-size 512,1024)')
    else:
      problems.append(f'{item}: no such file or folder')

  files, seen = [], set()
  for path, stem in found:
    real = os.path.realpath(path)
    if real in seen or (exclude and real.startswith(exclude)):
      continue
    seen.add(real)
    files.append((path, stem))
  return files, problems


@dataclasses.dataclass(frozen=True)
class InputImage:
  """One input file and the output name stem (relative to the output folder)."""

  path: str
  stem: str


class PredictError(Exception):
  """A problem with an input or output that --strict turns into a failure."""


def collect_inputs(
    inputs: Sequence[str], exclude_dir: str | None = None
) -> tuple[list[InputImage], list[str]]:
  """Expands files, folders and globs into input files with unique output stems.

  Folders are walked recursively (hidden files and folders skipped) and their files keep
  their relative sub-folder in the stem; a file given directly (or matched by a glob)
  keeps its base name. Files are not opened here: non-images are found when read. Stems
  that clash (`a.jpg` and `a.png`) get their extension appended (`a_png`).

  Args:
    inputs: paths, folders and glob patterns.
    exclude_dir: skip files under this folder (the output folder).

  Returns:
    `(images, problems)`: the inputs in order, without duplicates, and one message per
    path that does not exist or pattern that matches nothing.
  """
  found, problems = expand_inputs(inputs, exclude_dir)
  images, stems = [], set()
  for path, stem in found:
    if stem in stems:
      stem = f'{stem}_{os.path.splitext(path)[1].lstrip(".").lower() or "file"}'
    base, k = stem, 2
    while stem in stems:
      stem, k = f'{base}_{k}', k + 1
    stems.add(stem)
    images.append(InputImage(path, stem))
  return images, problems


class ImageModeError(ValueError):
  """An image whose pixel format has no defined RGB reading (float, 32-bit integers, LAB)."""


# 16-bit values map to [0, 255] as in their 8-bit copy (round(v / 257)); 65535 -> 255.
_SIXTEEN_BIT_SCALE = 255 / 65535
# PIL modes holding one 16-bit grey value per pixel. 'I' (32-bit integers) is how PIL opens
# 16-bit PGM files (and older Pillow versions 16-bit PNGs); values must lie in 0..65535.
_SIXTEEN_BIT_GREY = ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I')
# Modes of 8 bits per channel or fewer that `Image.convert('RGB')` reads (alpha dropped).
_EIGHT_BIT_MODES = ('1', 'L', 'LA', 'RGB', 'RGBA', 'RGBX', 'RGBa', 'CMYK', 'YCbCr')
# 16-bit colour: PIL decodes it into 8-bit 'RGB'/'RGBA' keeping the high byte of each value.
# Decoding the file again with the opposite byte order's unpacker keeps the low byte instead.
_OPPOSITE_ORDER = {'B': 'L', 'L': 'B', 'N': 'B' if sys.byteorder == 'little' else 'L'}  # N: native
_OTHER_BYTE = {f'{mode};16{order}': f'{mode};16{other}'
               for mode in ('RGB', 'RGBA') for order, other in _OPPOSITE_ORDER.items()}
# 16-bit grey+alpha PNGs open as 'RGBA' from raw mode 'LA;16B' (grey high byte repeated):
# decoded as 8-bit 'RGBA', the same 4 bytes a pixel are (grey high, grey low, alpha high, low).
_GREY_ALPHA_16 = 'LA;16B'
_EXIF_ORIENTATION = 0x0112


def _tile_rawmode(tile) -> str | None:
  args = tile[3]
  if isinstance(args, str):
    return args
  if isinstance(args, tuple) and args and isinstance(args[0], str):
    return args[0]
  return None


def _with_rawmode(tile, rawmode: str):
  args = tile[3]
  args = rawmode if isinstance(args, str) else (rawmode, *args[1:])
  return tile._replace(args=args) if hasattr(tile, '_replace') else (*tile[:3], args)


def _decode_as(data: bytes, rawmode: str) -> np.ndarray:
  """The first frame of the image file `data`, decoded with every tile's raw mode replaced."""
  with Image.open(io.BytesIO(data)) as copy:
    copy.tile = [_with_rawmode(t, rawmode) for t in copy.tile]
    copy.load()
    return np.asarray(copy)


def _sixteen_bit_colour(im: Image.Image) -> np.ndarray | None:
  """`[H, W, 3]` uint16 values of a not yet loaded 16-bit colour or grey+alpha image, else None.

  PIL has no 16-bit colour mode; this reads the file a second time from its open file object.
  If the second decoding fails (a PIL without these raw modes), None: PIL's 8-bit values are
  then used, at most one grey level from the rounded ones.
  """
  tiles, fp = getattr(im, 'tile', None), getattr(im, 'fp', None)
  if not tiles or fp is None or im.mode not in ('RGB', 'RGBA') or im.tell() != 0:
    return None
  rawmodes = {_tile_rawmode(t) for t in tiles}
  rawmode = rawmodes.pop() if len(rawmodes) == 1 else None
  if rawmode != _GREY_ALPHA_16 and rawmode not in _OTHER_BYTE:
    return None
  try:
    position = fp.tell()
    fp.seek(0)
    data = fp.read()
    fp.seek(position)
    if rawmode == _GREY_ALPHA_16:
      raw = _decode_as(data, 'RGBA').astype(np.uint16)
      return np.repeat((raw[..., 0] << 8 | raw[..., 1])[..., None], 3, axis=-1)
    low = _decode_as(data, _OTHER_BYTE[rawmode])[..., :3]
  except Exception:  # noqa: BLE001 (any failure: fall back to PIL's own 8-bit decoding)
    return None
  high = np.asarray(im)[..., :3]
  if high.shape != low.shape:
    return None
  return high.astype(np.uint16) << 8 | low


def rgb_pixels(im: Image.Image) -> np.ndarray:
  """The RGB pixel values of a PIL image, `[H, W, 3]` in [0, 255]; the one conversion of all tools.

  8-bit data (and 1-bit, palette, CMYK) comes back as uint8, 16-bit data as float32 scaled by
  255 / 65535 (`to_uint8` rounds it to the 8-bit copy). Alpha is dropped. Pass an image
  straight from `Image.open`, before `load()`, to keep the low byte of 16-bit colour files.

  Raises:
    ImageModeError: float pixels, 32-bit integers outside 0..65535, or another mode without
      a defined 0-255 reading (the message names the mode, not the file).
  """
  wide = _sixteen_bit_colour(im)
  if wide is not None:
    return wide.astype(np.float32) * np.float32(_SIXTEEN_BIT_SCALE)
  mode = im.mode
  if mode in _SIXTEEN_BIT_GREY:
    grey = np.asarray(im)
    if mode == 'I' and grey.size and (grey.min() < 0 or grey.max() > 65535):
      raise ImageModeError(
          f"32-bit integer pixels (PIL mode 'I') from {grey.min()} to {grey.max()}; expected "
          '16-bit values in 0..65535. Scale them to 0..65535 and save a 16-bit PNG')
    grey = grey.astype(np.float32) * np.float32(_SIXTEEN_BIT_SCALE)
    return np.repeat(grey[..., None], 3, axis=-1)
  if mode in ('P', 'PA'):
    # Through RGBA: PIL warns when a palette with per-entry alpha goes straight to RGB.
    return np.ascontiguousarray(np.asarray(im.convert('RGBA'))[..., :3])
  if mode in _EIGHT_BIT_MODES:
    return np.asarray(im if mode == 'RGB' else im.convert('RGB'))
  if mode == 'F':
    raise ImageModeError(
        "32-bit float pixels (PIL mode 'F') have no standard range; expected 8- or 16-bit "
        'values. Scale them to 0..255 or 0..65535 and save an 8- or 16-bit PNG')
  raise ImageModeError(f'PIL mode {mode!r} has no defined RGB reading; expected 8- or 16-bit '
                       'greyscale, palette, RGB(A) or CMYK. Convert it to RGB first')


def to_uint8(pixels: np.ndarray) -> np.ndarray:
  """`rgb_pixels` output as uint8: 8-bit values as they are, 16-bit ones rounded."""
  if pixels.dtype == np.uint8:
    return pixels
  return np.rint(np.clip(pixels, 0, 255)).astype(np.uint8)


def exif_orientation(im: Image.Image) -> int:
  """The EXIF (or XMP) orientation 1-8 of an image; 1 when absent, damaged or invalid."""
  try:
    orientation = int(im.getexif().get(_EXIF_ORIENTATION, 1))
  except Exception:  # noqa: BLE001 (a damaged EXIF block: show the pixels as stored)
    return 1
  return orientation if 1 <= orientation <= 8 else 1


def orient(pixels: np.ndarray, orientation: int) -> np.ndarray:
  """Pixels `[H, W, ...]` as stored -> as shown for an EXIF orientation (`ImageOps.exif_transpose`).

  Orientations 5-8 swap height and width.
  """
  swap = (1, 0, *range(2, pixels.ndim))
  oriented = {
      2: lambda a: a[:, ::-1],
      3: lambda a: a[::-1, ::-1],
      4: lambda a: a[::-1],
      5: lambda a: a.transpose(swap),
      6: lambda a: np.rot90(a, -1),
      7: lambda a: a[::-1, ::-1].transpose(swap),
      8: lambda a: np.rot90(a, 1),
  }.get(orientation, lambda a: a)(pixels)
  return oriented if oriented is pixels else np.ascontiguousarray(oriented)


def read_pixels(path: str, *, apply_exif: bool) -> np.ndarray:
  """Reads an image file's RGB pixels, `[H, W, 3]` in [0, 255] (see `rgb_pixels` for dtypes).

  Args:
    path: the image file.
    apply_exif: turn the pixels as the EXIF orientation says (as viewers show the image).

  Raises:
    ImageModeError: a pixel format without a defined RGB reading (the message names `path`).
    Whatever PIL raises for a file that is not an image or is damaged.
  """
  with Image.open(path) as im:
    try:
      pixels = rgb_pixels(im)
    except ImageModeError as e:
      raise ImageModeError(f'{path}: {e}') from None
    if apply_exif:
      pixels = orient(pixels, exif_orientation(im))
  return pixels


def read_image(path: str) -> np.ndarray:
  """Reads an image file as uint8 RGB `[H, W, 3]`, applying its EXIF orientation.

  OpenCV's `imread` (mmcv's reader) applies the EXIF orientation too, so the mask lines up
  with the image as viewers show it. 16-bit files read as their 8-bit copy (module docstring).

  Raises:
    PredictError: the file is not an image PIL can read, or has no defined RGB reading.
  """
  try:
    return to_uint8(read_pixels(path, apply_exif=True))
  except UnidentifiedImageError:
    raise PredictError(f'{path}: not an image file') from None
  except ImageModeError as e:
    raise PredictError(str(e)) from None
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise PredictError(f'{path}: unreadable image ({e})') from None


def check_image_header(path: str) -> None:
  """Raises `PredictError` unless PIL recognises `path` as an image (reads the header only)."""
  try:
    with Image.open(path):
      pass
  except UnidentifiedImageError:
    raise PredictError(f'{path}: not an image file') from None
  except OSError as e:
    raise PredictError(f'{path}: unreadable image ({e})') from None


def read_stored_image(path: str) -> np.ndarray:
  """Reads a dataset image as uint8 RGB `[H, W, 3]` in its stored pixel order.

  No EXIF orientation is applied: dataset annotations (masks, COCO boxes and sizes) refer to
  the stored pixels. 16-bit files read as their 8-bit copy (module docstring).

  Raises:
    ImageModeError: a pixel format without a defined RGB reading.
    Whatever PIL raises for a file that is not an image or is damaged.
  """
  return to_uint8(read_pixels(path, apply_exif=False))
