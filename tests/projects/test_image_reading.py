"""One image reader for every tool: 16-bit, greyscale, palette, alpha, CMYK and EXIF alike.

`images.read_image` (the predict tools), `images.read_stored_image` (the
segmentation and COCO datasets) and `feature_extraction.images.read_image` (cvt-extract)
must give the same pixels; a 16-bit file must read like its 8-bit copy
`round(value / 257)`, never all white.
"""

import json
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from projects.cvt_detection.data import CocoDetection
from projects.cvt_segmentation.data.folders import SegmentationFolder
from projects.feature_extraction import images as extract_images
from projects.training import images

H, W = 12, 20  # Odd sizes catch transposed axes.


# Adam7 passes: (first row, first column, row step, column step).
_ADAM7 = ((0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4), (2, 0, 4, 2), (0, 1, 2, 2),
          (1, 0, 2, 1))


def _filtered_rows(pixels: np.ndarray) -> bytes:
  """PNG scanlines of `pixels`, cycling the rows through all five filters."""
  h = pixels.shape[0]
  channels = 1 if pixels.ndim == 2 else pixels.shape[2]
  size = pixels.dtype.itemsize
  rows = pixels.astype(f'>u{size}').reshape(h, -1).view(np.uint8).astype(np.int32)
  bpp = channels * size
  prior = np.zeros_like(rows[0])
  data = b''
  for y, row in enumerate(rows):
    left = np.concatenate([np.zeros(bpp, np.int32), row[:-bpp]])
    upleft = np.concatenate([np.zeros(bpp, np.int32), prior[:-bpp]])
    p = left + prior - upleft
    pa, pb, pc = np.abs(p - left), np.abs(p - prior), np.abs(p - upleft)
    paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prior, upleft))
    kind = y % 5  # none, sub, up, average, Paeth
    predicted = [0, left, prior, (left + prior) // 2, paeth][kind]
    data += bytes([kind]) + ((row - predicted) % 256).astype(np.uint8).tobytes()
    prior = row
  return data


def _png(path, pixels: np.ndarray, interlace: bool = False) -> None:
  """Writes `pixels` ([H, W] or [H, W, C], uint8 or uint16) as a PNG without going through PIL.

  Pillow cannot write 16-bit colour. The rows go through all five PNG filters, so a decoder's
  unfiltering (which depends on the bytes per pixel) is exercised.
  """
  pixels = np.asarray(pixels)
  h, w = pixels.shape[:2]
  channels = 1 if pixels.ndim == 2 else pixels.shape[2]
  colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
  if interlace:
    passes = [pixels[y0::dy, x0::dx] for y0, x0, dy, dx in _ADAM7]
    data = b''.join(_filtered_rows(p) for p in passes if p.size)
  else:
    data = _filtered_rows(pixels)

  def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack('>I', len(body)) + kind + body + struct.pack('>I', zlib.crc32(kind + body))

  header = struct.pack('>IIBBBBB', w, h, pixels.dtype.itemsize * 8, colour_type, 0, 0,
                       int(interlace))
  path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header)
                   + chunk(b'IDAT', zlib.compress(data)) + chunk(b'IEND', b''))


def _values16(channels: int = 1, seed: int = 0) -> np.ndarray:
  """16-bit pixels over the whole range, both ends included."""
  shape = (H, W) if channels == 1 else (H, W, channels)
  values = np.random.default_rng(seed).integers(0, 65536, shape, dtype=np.uint16)
  values.reshape(-1)[:2] = (0, 65535)
  return values


def _rgb8(channels: int = 3, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (H, W, channels), dtype=np.uint8)


def _grey(values: np.ndarray) -> np.ndarray:
  return np.repeat(values[..., None], 3, axis=-1)


def _8bit_copy(values16: np.ndarray) -> np.ndarray:
  """The 8-bit copy of a 16-bit image, as an image editor saves it."""
  return (values16 / 257).round().astype(np.uint8)


# Each case writes a file and returns the RGB values its stored pixels stand for, in [0, 255]
# (16-bit values scaled by 255 / 65535).
def _case_rgb(path):
  rgb = _rgb8()
  Image.fromarray(rgb).save(path.with_suffix('.png'))
  return path.with_suffix('.png'), rgb, 'RGB'


def _case_l(path):
  grey = _rgb8(1)[..., 0]
  Image.fromarray(grey).save(path.with_suffix('.png'))
  return path.with_suffix('.png'), _grey(grey), 'L'


def _case_p(path):
  index = _rgb8(1)[..., 0] % 7
  palette = np.random.default_rng(1).integers(0, 256, (7, 3), dtype=np.uint8)
  im = Image.fromarray(index, 'P')
  im.putpalette(palette.ravel().tolist())
  im.info['transparency'] = bytes([0, 128] + [255] * 5)  # tRNS: alpha per palette entry
  im.save(path.with_suffix('.png'))
  return path.with_suffix('.png'), palette[index], 'P'


def _case_la(path):
  la = _rgb8(2)
  Image.fromarray(la, 'LA').save(path.with_suffix('.png'))
  return path.with_suffix('.png'), _grey(la[..., 0]), 'LA'  # alpha dropped, like cv2.imread


def _case_rgba(path):
  rgba = _rgb8(4)
  rgba[..., 3] = np.arange(W, dtype=np.uint8) * 12  # fully transparent on the left
  Image.fromarray(rgba, 'RGBA').save(path.with_suffix('.png'))
  return path.with_suffix('.png'), rgba[..., :3], 'RGBA'


def _case_cmyk(path):
  cmyk = _rgb8(4)
  Image.fromarray(cmyk, 'CMYK').save(path.with_suffix('.tif'))
  c = cmyk.astype(np.float64)
  # The plain CMYK -> RGB formula (no colour profile), which PIL applies.
  return path.with_suffix('.tif'), (255 - c[..., :3]) * (255 - c[..., 3:]) / 255, 'CMYK'


def _case_1bit(path):
  bits = _rgb8(1)[..., 0] > 127
  Image.fromarray(bits).save(path.with_suffix('.png'))
  return path.with_suffix('.png'), _grey(bits * 255), '1'


def _case_i16_pil_png(path):
  values = _values16()
  Image.fromarray(values).save(path.with_suffix('.png'))  # PIL mode 'I;16'
  return path.with_suffix('.png'), _grey(values * (255 / 65535)), 'I;16'


def _case_i16b_tiff(path):
  values = _values16()
  Image.fromarray(values.astype('>u2')).save(path.with_suffix('.tif'))  # PIL mode 'I;16B'
  return path.with_suffix('.tif'), _grey(values * (255 / 65535)), 'I;16B'


def _case_i_pgm(path):
  values = _values16()
  Image.fromarray(values).save(path.with_suffix('.pgm'))  # maxval 65535: PIL opens it as 'I'
  return path.with_suffix('.pgm'), _grey(values * (255 / 65535)), 'I'


def _case_grey16_png(path):
  values = _values16()
  _png(path.with_suffix('.png'), values)
  return path.with_suffix('.png'), _grey(values * (255 / 65535)), 'I;16'


def _case_grey_alpha16_png(path):
  values = _values16(2)
  _png(path.with_suffix('.png'), values)
  return path.with_suffix('.png'), _grey(values[..., 0] * (255 / 65535)), 'RGBA'


def _case_rgb48_png(path):
  values = _values16(3)
  _png(path.with_suffix('.png'), values)
  return path.with_suffix('.png'), values * (255 / 65535), 'RGB'


def _case_rgb48_interlaced_png(path):
  values = _values16(3)
  _png(path.with_suffix('.png'), values, interlace=True)
  return path.with_suffix('.png'), values * (255 / 65535), 'RGB'


def _case_rgba64_png(path):
  values = _values16(4)
  _png(path.with_suffix('.png'), values)
  return path.with_suffix('.png'), values[..., :3] * (255 / 65535), 'RGBA'


def _case_rgb48_tiff(path):
  tifffile = pytest.importorskip('tifffile')
  values = _values16(3)
  tifffile.imwrite(path.with_suffix('.tif'), values, photometric='rgb', rowsperstrip=5)
  return path.with_suffix('.tif'), values * (255 / 65535), 'RGB'


def _case_rgb48_tiff_zlib(path):  # PIL decodes this one through libtiff
  tifffile = pytest.importorskip('tifffile')
  values = _values16(3)
  tifffile.imwrite(path.with_suffix('.tif'), values, photometric='rgb', compression='zlib')
  return path.with_suffix('.tif'), values * (255 / 65535), 'RGB'


CASES = {
    'RGB': _case_rgb, 'L': _case_l, 'P': _case_p, 'LA': _case_la, 'RGBA': _case_rgba,
    'CMYK': _case_cmyk, '1': _case_1bit, 'I;16 (PIL png)': _case_i16_pil_png,
    'I;16B (tiff)': _case_i16b_tiff, 'I (16-bit pgm)': _case_i_pgm,
    '16-bit grey png': _case_grey16_png, '16-bit grey+alpha png': _case_grey_alpha16_png,
    '48-bit png': _case_rgb48_png, '48-bit interlaced png': _case_rgb48_interlaced_png,
    '64-bit rgba png': _case_rgba64_png,
    '48-bit tiff': _case_rgb48_tiff, '48-bit tiff (libtiff)': _case_rgb48_tiff_zlib,
}


def _read_all(path):
  """The three readers, with warnings turned into errors (a reader must not warn)."""
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    return (images.read_image(str(path)), images.read_stored_image(str(path)),
            extract_images.read_image(str(path)))


@pytest.mark.parametrize('case', list(CASES))
def test_every_mode_reads_like_its_8bit_copy(tmp_path, case):
  path, expected, mode = CASES[case](tmp_path / 'image')
  with Image.open(path) as im:
    assert im.mode == mode  # The case covers the PIL mode it is named after.
  viewer, stored, extracted = _read_all(path)
  for pixels in (viewer, stored):
    assert pixels.shape == (H, W, 3) and pixels.dtype == np.uint8
    diff = np.abs(pixels.astype(np.int32) - np.round(expected))
    assert diff.max() <= 1, f'{case}: {np.mean(diff > 1):.0%} of the values off by more than 1'
  np.testing.assert_array_equal(viewer, stored)  # No EXIF orientation in these files.
  # cvt-extract keeps the precision: its values are the exact ones, the others round them.
  assert extracted.shape == (H, W, 3) and extracted.dtype == np.float32
  exact = np.abs(extracted - expected).max()
  assert exact <= (0.5 if case == 'CMYK' else 1e-4), f'{case}: off by {exact}'
  np.testing.assert_array_equal(np.rint(extracted).astype(np.uint8), stored)


@pytest.mark.parametrize('reader', ['read_image', 'read_stored_image'])
def test_16bit_png_is_not_all_white(tmp_path, reader):
  """The issue's report: a 16-bit PNG read as 255 everywhere."""
  values = _values16()
  Image.fromarray(values).save(tmp_path / 'scan.png')
  pixels = getattr(images, reader)(str(tmp_path / 'scan.png'))
  eight = _grey(_8bit_copy(values))
  off = np.abs(pixels.astype(np.int32) - eight) > 1
  assert not off.any(), f'{off.mean():.0%} of the values differ from the 8-bit copy by more than 1'


def test_every_16bit_value_rounds_like_the_8bit_copy(tmp_path):
  values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
  _png(tmp_path / 'all.png', values)
  stored = images.read_stored_image(str(tmp_path / 'all.png'))
  np.testing.assert_array_equal(stored, _grey(_8bit_copy(values)))
  extracted = extract_images.read_image(str(tmp_path / 'all.png'))
  np.testing.assert_allclose(extracted, _grey(values * (255 / 65535)), rtol=1e-6, atol=1e-5)


def test_48bit_png_keeps_16_bits_per_channel(tmp_path):
  """PIL reduces 16-bit colour to its high byte; the readers keep the low byte too."""
  values = np.array([[[256, 383, 384]]], np.uint16).repeat(2, 0)  # high byte 1 for all three
  _png(tmp_path / 'rgb48.png', values)
  extracted = extract_images.read_image(str(tmp_path / 'rgb48.png'))
  np.testing.assert_allclose(extracted[0, 0], values[0, 0] * (255 / 65535), rtol=1e-6)
  stored = images.read_stored_image(str(tmp_path / 'rgb48.png'))
  np.testing.assert_array_equal(stored[0, 0], [1, 1, 1])  # 256/257, 383/257 round to 1
  values = np.array([[[385, 65535, 0]]], np.uint16).repeat(2, 0)  # 385 / 257 = 1.498
  _png(tmp_path / 'rgb48.png', values)
  np.testing.assert_array_equal(
      images.read_stored_image(str(tmp_path / 'rgb48.png'))[0, 0], [1, 255, 0])


def test_interlaced_png_writer_matches_pil(tmp_path):
  """The test's own PNG writer, checked where PIL can read the result in full."""
  for values in (_values16(), _rgb8(), _rgb8(4)):
    _png(tmp_path / 'x.png', values, interlace=True)
    with Image.open(tmp_path / 'x.png') as im:
      np.testing.assert_array_equal(np.asarray(im), values)


@pytest.mark.parametrize('channels', [2, 3, 4])
def test_16bit_colour_falls_back_to_pil_8bit_values(tmp_path, monkeypatch, channels):
  """A PIL that cannot decode the low bytes: its high bytes, still within 1 of the copy."""
  def fail(*args):
    raise ValueError('unknown raw mode for given image mode')

  monkeypatch.setattr(images, '_decode_as', fail)
  values = _values16(channels)
  _png(tmp_path / 'x.png', values)
  stored = images.read_stored_image(str(tmp_path / 'x.png'))
  copy = _grey(_8bit_copy(values[..., 0])) if channels == 2 else _8bit_copy(values[..., :3])
  assert np.abs(stored.astype(np.int32) - copy).max() <= 1


def test_segmentation_folder_reads_16bit_images(tmp_path):
  values = _values16()
  Image.fromarray(values).save(tmp_path / 'scan.png')
  Image.fromarray(np.ones((H, W), np.uint8)).save(tmp_path / 'scan_mask.png')
  ds = SegmentationFolder([str(tmp_path / 'scan.png')], [str(tmp_path / 'scan_mask.png')],
                          num_classes=2, class_names=('background', 'thing'))
  image = ds[0]['image']
  assert image.dtype == np.uint8
  assert np.abs(image.astype(np.int32) - _grey(_8bit_copy(values))).max() <= 1


def test_coco_dataset_reads_16bit_images(tmp_path):
  values = _values16()
  (tmp_path / 'images').mkdir()
  Image.fromarray(values).save(tmp_path / 'images' / 'scan.png')
  gt = {'images': [{'id': 1, 'file_name': 'scan.png', 'height': H, 'width': W}],
        'annotations': [{'id': 1, 'image_id': 1, 'category_id': 1, 'bbox': [2, 3, 5, 4],
                         'area': 20, 'iscrowd': 0}],
        'categories': [{'id': 1, 'name': 'thing'}]}
  (tmp_path / 'instances.json').write_text(json.dumps(gt))
  image = CocoDetection(tmp_path / 'instances.json', tmp_path / 'images')[0]['image']
  assert image.dtype == np.uint8
  assert np.abs(image.astype(np.int32) - _grey(_8bit_copy(values))).max() <= 1


@pytest.mark.parametrize('orientation', range(1, 9))
def test_exif_orientation_only_for_the_viewer_reader(tmp_path, orientation):
  exif = Image.Exif()
  exif[0x0112] = orientation
  Image.fromarray(_rgb8()).save(tmp_path / 'photo.jpg', exif=exif, quality=95)
  with Image.open(tmp_path / 'photo.jpg') as im:
    as_stored = np.asarray(im.convert('RGB'))
    as_shown = np.asarray(ImageOps.exif_transpose(im).convert('RGB'))
  viewer, stored, extracted = _read_all(tmp_path / 'photo.jpg')
  np.testing.assert_array_equal(stored, as_stored)
  np.testing.assert_array_equal(viewer, as_shown)
  np.testing.assert_array_equal(extracted, as_shown.astype(np.float32))
  assert images.displayed_size(str(tmp_path / 'photo.jpg')) == viewer.shape[:2]


def test_exif_orientation_of_a_16bit_png(tmp_path):
  values = _values16()
  exif = Image.Exif()
  exif[0x0112] = 6  # Shown rotated 90 degrees clockwise.
  Image.fromarray(values).save(tmp_path / 'scan.png', exif=exif)
  viewer, stored, extracted = _read_all(tmp_path / 'scan.png')
  np.testing.assert_array_equal(stored, _grey(_8bit_copy(values)))
  np.testing.assert_array_equal(viewer, np.rot90(stored, -1))
  np.testing.assert_array_equal(np.rint(extracted).astype(np.uint8), viewer)


def test_float_and_out_of_range_images_are_refused_clearly(tmp_path):
  Image.fromarray(np.full((H, W), 0.5, np.float32)).save(tmp_path / 'float.tif')
  Image.fromarray(np.full((H, W), -3, np.int32)).save(tmp_path / 'int32.tif')
  for name, found in (('float.tif', "'F'"), ('int32.tif', '-3')):
    path = str(tmp_path / name)
    with pytest.raises(images.ImageModeError, match=rf'{name}: .*{found}'):
      images.read_stored_image(path)
    with pytest.raises(images.ImageError, match=rf'{name}: .*{found}'):
      images.read_image(path)
    with pytest.raises(images.ImageError, match=rf'{name}: .*{found}'):
      extract_images.read_image(path)


@pytest.mark.parametrize('mode', ['I;16', 'I;16L', 'I;16B', 'I'])
def test_to_rgb_pixels_on_16bit_images_in_memory(mode):
  values = _values16()
  if mode == 'I':
    im = Image.fromarray(values.astype(np.int32))
  else:
    im = Image.frombytes(mode, (W, H), values.astype('>u2' if mode == 'I;16B' else '<u2').tobytes())
  assert im.mode == mode
  np.testing.assert_allclose(images.rgb_pixels(im).astype(np.float32), _grey(values * (255 / 65535)),
                             rtol=1e-6)
  np.testing.assert_array_equal(images.to_uint8(images.rgb_pixels(im)),
                                _grey(_8bit_copy(values)))
