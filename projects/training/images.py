"""Image files as RGB pixels: the one reader of the datasets and the tools.

8-bit modes read as OpenCV's `imread` (mmcv, mmsegmentation) reads them: grey and 1-bit
repeated, palettes to their colours, alpha dropped (not composited), CMYK by PIL's plain
formula. 16 bits per channel scale by 255 / 65535, so the uint8 readers give the 8-bit copy
`round(value / 257)`; PIL keeps only the high byte of 16-bit colour, so the low byte is
decoded too. Float pixels, 32-bit integers outside 0..65535 and LAB are refused.
"""

from __future__ import annotations

import io
import sys

import numpy as np
from PIL import Image, UnidentifiedImageError


class ImageError(ValueError):
  """A file that cannot be read as an image (not one, damaged, or no RGB reading); names it."""


class ImageModeError(ImageError):
  """An image whose pixel format has no defined RGB reading (float, 32-bit integers, LAB)."""


_SIXTEEN_BIT_SCALE = 255 / 65535  # 65535 -> 255, as the 8-bit copy round(v / 257)
# One 16-bit grey value per pixel; 'I' is how PIL opens 16-bit PGM files.
_SIXTEEN_BIT_GREY = ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I')
_EIGHT_BIT_MODES = ('1', 'L', 'LA', 'RGB', 'RGBA', 'RGBX', 'RGBa', 'CMYK', 'YCbCr')
# PIL decodes 16-bit colour keeping the high byte; the opposite byte order's unpacker keeps
# the low byte instead.
_OPPOSITE_ORDER = {'B': 'L', 'L': 'B', 'N': 'B' if sys.byteorder == 'little' else 'L'}
_OTHER_BYTE = {f'{mode};16{order}': f'{mode};16{other}'
               for mode in ('RGB', 'RGBA') for order, other in _OPPOSITE_ORDER.items()}
# 16-bit grey+alpha PNGs open as 'RGBA' from 'LA;16B'; decoded as 8-bit 'RGBA' a pixel's
# 4 bytes are grey high, grey low, alpha high, alpha low.
_GREY_ALPHA_16 = 'LA;16B'
_EXIF_ORIENTATION = 0x0112
_UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


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
  """uint16 `[H, W, 3]` of a not yet loaded 16-bit colour or grey+alpha image, else None.

  The file is decoded a second time; if that fails (a PIL without these raw modes), None
  and PIL's 8-bit values are used, at most one grey level off.
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
  """`[H, W, 3]` RGB in [0, 255]: uint8 for 8-bit data, float32 for 16-bit data.

  Pass an image straight from `Image.open`, before `load()`, to keep the low byte of 16-bit
  colour files.

  Raises:
    ImageModeError: no defined 0-255 reading (the message names the mode, not the file).
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
  """`rgb_pixels` as uint8: 8-bit values as they are, 16-bit ones rounded."""
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
  """Pixels `[H, W, ...]` as stored -> as shown (`ImageOps.exif_transpose`); 5-8 swap H and W."""
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
  """`rgb_pixels` of an image file, turned as its EXIF orientation says when `apply_exif`.

  Raises:
    ImageModeError: no defined RGB reading (the message names `path`).
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


def read_stored_image(path: str) -> np.ndarray:
  """A dataset image, uint8 `[H, W, 3]` in its stored pixel order (annotations refer to it).

  Raises:
    ImageModeError, or whatever PIL raises for a file that is not an image or is damaged.
  """
  return to_uint8(read_pixels(path, apply_exif=False))


def _image_error(path: str, error: Exception) -> ImageError:
  if isinstance(error, ImageError):
    return error
  if isinstance(error, UnidentifiedImageError):
    return ImageError(f'{path}: not an image file')
  return ImageError(f'{path}: unreadable image ({error})')


def read_image(path: str, *, exact: bool = False) -> np.ndarray:
  """A photo as viewers show it (EXIF orientation applied, as OpenCV's `imread`), `[H, W, 3]`.

  uint8, or with `exact` float32 in [0, 255] keeping the precision of 16-bit files.

  Raises:
    ImageError: not an image, damaged, or without a defined RGB reading.
  """
  try:
    pixels = read_pixels(path, apply_exif=True)
  except _UNREADABLE as e:
    raise _image_error(path, e) from None
  return pixels.astype(np.float32, copy=False) if exact else to_uint8(pixels)


def displayed_size(path: str) -> tuple[int, int]:
  """`(height, width)` as shown (EXIF orientation applied), from the header only.

  Raises:
    ImageError: PIL does not recognise the file as an image.
  """
  try:
    with Image.open(path) as im:
      width, height = im.size
      orientation = exif_orientation(im)
  except _UNREADABLE as e:
    raise _image_error(path, e) from None
  return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


def check_image_header(path: str) -> None:
  """Raises `ImageError` unless PIL recognises `path` as an image (reads the header only)."""
  displayed_size(path)
