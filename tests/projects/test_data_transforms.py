"""Contracts of the mmseg-style augmentations in projects/cvt_segmentation/data/transforms.py."""

import cv2
import numpy as np
import pytest

from projects.cvt_segmentation.data import transforms as T


def _image(h, w, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    'size, scale, expected',
    [
        ((512, 683), (2048, 512), (512, 683)),  # typical ADE20K: short side already 512
        ((1024, 2048), (2048, 512), (512, 1024)),  # short edge limits
        ((100, 1000), (2048, 512), (205, 2048)),  # long edge limits: factor 2.048
        ((1024, 2048), (2048, 1024), (1024, 2048)),  # Cityscapes at its test scale
    ],
)
def test_rescale_size_matches_mmcv(size, scale, expected):
  assert T.rescale_size(size, scale) == expected
  assert T.rescale_size(size, scale[::-1]) == expected  # order of the limits is irrelevant


def test_resize_image_is_opencv_bilinear():
  # Half-pixel centers, clamped at the border, no antialiasing: [0, 10] -> 4 samples.
  row = np.array([[[0.0], [10.0]]], np.float32)
  np.testing.assert_allclose(T.resize_image(row, (1, 4))[0, :, 0], [0, 2.5, 7.5, 10])
  # 2x downscale samples between pixel pairs (no wider filter).
  x = np.arange(8, dtype=np.float32).reshape(1, 8, 1)
  np.testing.assert_allclose(T.resize_image(x, (1, 4))[0, :, 0], [0.5, 2.5, 4.5, 6.5])
  img = _image(5, 7)
  assert T.resize_image(img, (9, 3)).dtype == np.uint8
  np.testing.assert_array_equal(T.resize_image(img, (5, 7)), img)


def test_resize_label_is_opencv_nearest():
  label = np.arange(8, dtype=np.uint8).reshape(1, 8)
  np.testing.assert_array_equal(T.resize_label(label, (1, 4)), [[0, 2, 4, 6]])  # floor(d * 2)
  np.testing.assert_array_equal(T.resize_label(label, (1, 16))[0, :4], [0, 0, 1, 1])


def test_random_resize_keeps_ratio_within_range():
  img, label = _image(40, 60), np.zeros((40, 60), np.uint8)
  shorts = []
  for seed in range(20):
    out, lab = T.random_resize(np.random.default_rng(seed), img, label, (120, 40), (0.5, 2.0))
    assert out.shape[:2] == lab.shape
    assert abs(out.shape[1] / out.shape[0] - 1.5) < 0.05
    shorts.append(out.shape[0])
  assert 20 <= min(shorts) and max(shorts) <= 80 and len(set(shorts)) > 5


def _band_label():
  # Class 1 on columns 8..23 of a 32x32 map: about half of the 16x16 crops hold both
  # classes with neither above 75 %.
  label = np.zeros((32, 32), np.uint8)
  label[:, 8:24] = 1
  return label


def _satisfies(crop, ratio=0.75):
  classes, counts = np.unique(crop, return_counts=True)
  counts = counts[classes != 255]
  return len(counts) > 1 and counts.max() / counts.sum() < ratio


def test_random_crop_honours_cat_max_ratio():
  img, label = _image(32, 32), _band_label()
  for seed in range(30):
    out, lab = T.random_crop(np.random.default_rng(seed), img, label, (16, 16), 0.75)
    assert out.shape == (16, 16, 3) and lab.shape == (16, 16)
    assert _satisfies(lab), seed
  # Without the check many crops are dominated by one class.
  unchecked = [
      _satisfies(T.random_crop(np.random.default_rng(s), img, label, (16, 16), 1.0)[1])
      for s in range(30)
  ]
  assert not all(unchecked)


def test_random_crop_image_and_label_stay_aligned():
  label = np.arange(32 * 32).reshape(32, 32) % 200
  img = np.stack([label] * 3, -1).astype(np.uint8)
  out, lab = T.random_crop(np.random.default_rng(3), img, label.astype(np.uint8), (10, 12), 1.0)
  np.testing.assert_array_equal(out[..., 0], lab)


def test_random_crop_ignores_ignore_index_and_gives_up_after_ten_tries():
  # Only class 0 and ignore: no crop can pass, the 11th draw is returned anyway.
  label = np.zeros((32, 32), np.uint8)
  label[:, 16:] = 255
  out, lab = T.random_crop(np.random.default_rng(0), _image(32, 32), label, (16, 16), 0.75)
  assert lab.shape == (16, 16)


def test_random_crop_names_a_label_that_is_not_uint8():
  label = np.zeros((8, 8), np.int32)
  with pytest.raises(TypeError, match='label must be uint8 class ids .* got int32'):
    T.random_crop(np.random.default_rng(0), np.zeros((8, 8, 3), np.uint8), label, (4, 4))


def test_random_crop_smaller_image_then_pad():
  img, label = _image(10, 20), np.ones((10, 20), np.uint8)
  out, lab = T.random_crop(np.random.default_rng(0), img, label, (16, 16), 0.75)
  assert out.shape == (10, 16, 3) and lab.shape == (10, 16)
  padded, plab = T.pad(out, lab, (16, 16))
  assert padded.shape == (16, 16, 3) and plab.shape == (16, 16)
  assert (padded[10:] == 0).all() and (plab[10:] == 255).all()
  np.testing.assert_array_equal(padded[:10], out)
  np.testing.assert_array_equal(plab[:10], lab)


def test_pad_refuses_to_crop():
  with pytest.raises(ValueError, match='cannot pad'):
    T.pad(_image(20, 20), None, (16, 16))


def test_flip_flips_label_with_image():
  label = np.tile(np.arange(20, dtype=np.uint8), (6, 1))
  img = np.stack([label] * 3, -1)
  out, lab = T.random_flip(np.random.default_rng(0), img, label, prob=1.0)
  np.testing.assert_array_equal(lab, label[:, ::-1])
  np.testing.assert_array_equal(out[..., 1], lab)
  out, lab = T.random_flip(np.random.default_rng(0), img, label, prob=0.0)
  np.testing.assert_array_equal(lab, label)
  flips = [
      T.random_flip(np.random.default_rng(s), img, label)[1][0, 0] == 19 for s in range(40)
  ]
  assert 5 < sum(flips) < 35  # probability 1/2


def _mmseg_photometric(rng, img):
  # mmseg 1.x PhotoMetricDistortion as mmseg writes it (float32 convert, mmcv's cv2 HSV),
  # on RGB instead of BGR (the same HSV), drawing from `rng` in the same order.
  def convert(x, alpha=1, beta=0):
    return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

  def contrast(x):
    return convert(x, alpha=rng.uniform(0.5, 1.5)) if rng.integers(2) else x

  if rng.integers(2):
    img = convert(img, beta=rng.uniform(-32, 32))
  mode = rng.integers(2)
  if mode == 1:
    img = contrast(img)
  if rng.integers(2):
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
    hsv[:, :, 1] = convert(hsv[:, :, 1], alpha=rng.uniform(0.5, 1.5))
    img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
  if rng.integers(2):
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
    hsv[:, :, 0] = (hsv[:, :, 0].astype(int) + rng.integers(-18, 18)) % 180
    img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
  if mode == 0:
    img = contrast(img)
  return img


def test_photometric_distortion_equals_mmseg():
  # The lookup tables give exactly mmseg's truncated float arithmetic, every branch taken.
  img = _image(16, 24)
  for seed in range(24):
    np.testing.assert_array_equal(
        T.photometric_distortion(np.random.default_rng(seed), img),
        _mmseg_photometric(np.random.default_rng(seed), img))


def test_photometric_distortion_contract():
  img = _image(12, 14)
  out = T.photometric_distortion(np.random.default_rng(1), img)
  assert out.shape == img.shape and out.dtype == np.uint8
  np.testing.assert_array_equal(out, T.photometric_distortion(np.random.default_rng(1), img))
  changed = [
      not np.array_equal(T.photometric_distortion(np.random.default_rng(s), img), img)
      for s in range(8)
  ]
  assert sum(changed) >= 6
  # Grey stays grey: saturation and hue act on colour only.
  grey = np.repeat(_image(12, 14)[..., :1], 3, -1)
  for s in range(8):
    g = T.photometric_distortion(np.random.default_rng(s), grey)
    np.testing.assert_array_equal(g[..., 0], g[..., 1])
    np.testing.assert_array_equal(g[..., 0], g[..., 2])
  with pytest.raises(TypeError, match='uint8'):
    T.photometric_distortion(np.random.default_rng(1), img.astype(np.float32))


def test_normalize_uses_imagenet_statistics():
  mean_img = np.broadcast_to(np.array(T.IMAGENET_MEAN, np.float32), (4, 4, 3))
  np.testing.assert_allclose(T.normalize(mean_img), 0, atol=1e-6)
  out = T.normalize(np.zeros((2, 2, 3), np.uint8))
  expected = -np.array(T.IMAGENET_MEAN) / np.array(T.IMAGENET_STD)
  np.testing.assert_allclose(out[0, 0], expected, rtol=1e-6)
  assert out.dtype == np.float32
  img = _image(16, 16)  # uint8 is looked up: the same float32 values as computed
  np.testing.assert_array_equal(T.normalize(img), T.normalize(img.astype(np.float32)))


def test_train_transform_contract():
  t = T.TrainTransform(crop_size=(24, 32), scale=(64, 16), cat_max_ratio=0.75)
  img, label = _image(30, 50), np.random.default_rng(0).integers(0, 4, (30, 50)).astype(np.uint8)
  for seed in range(5):
    x, y = t(img, label, np.random.default_rng(seed))
    assert x.shape == (24, 32, 3) and x.dtype == np.float32
    assert y.shape == (24, 32) and y.dtype == np.int32
    assert set(np.unique(y)) <= {0, 1, 2, 3, 255}
  a = t(img, label, np.random.default_rng(7))
  b = t(img, label, np.random.default_rng(7))
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  # A crop larger than the resized image is padded with 0 / 255.
  x, y = T.TrainTransform(crop_size=(64, 64), scale=None)(img, label, np.random.default_rng(0))
  assert (y[30:] == 255).all() and (x[30:] == 0).all() and (y[:30, :50] != 255).all()


@pytest.mark.parametrize('scale', [(64, 16), (200, 60), None])
def test_train_transform_equals_the_mmseg_chain(scale):
  # resize -> crop -> flip -> photometric -> normalize -> pad with the same draws.
  img = _image(30, 50)
  label = np.random.default_rng(1).integers(0, 4, (30, 50)).astype(np.uint8)
  t = T.TrainTransform(crop_size=(24, 32), scale=scale, cat_max_ratio=0.75)
  for seed in range(6):
    rng = np.random.default_rng(seed)
    x, y = img, label
    if scale is not None:
      x, y = T.random_resize(rng, x, y, scale)
    x, y = T.random_crop(rng, x, y, (24, 32), 0.75)
    x, y = T.random_flip(rng, x, y)
    x = T.normalize(T.photometric_distortion(rng, x))
    x, y = T.pad(x, y.astype(np.int32), (24, 32))
    got = t(img, label, np.random.default_rng(seed))
    np.testing.assert_array_equal(got[0], x)
    np.testing.assert_array_equal(got[1], y)


def test_eval_transform_resizes_image_only():
  img, label = _image(20, 40), np.ones((20, 40), np.uint8)
  x, y = T.EvalTransform(scale=(40, 10))(img, label)
  assert x.shape == (10, 20, 3) and x.dtype == np.float32
  assert y.shape == (20, 40) and y.dtype == np.int32
  x, _ = T.EvalTransform(scale=None)(img, label)
  assert x.shape == (20, 40, 3)


EXTREME_SIZES = [(12, 10000), (10000, 12), (1, 1)]


@pytest.mark.parametrize('size', EXTREME_SIZES)
def test_extreme_aspect_ratios_resize_to_at_least_one_pixel(size):
  # A keep-ratio resize of a 12x10000 strip into (64, 32) has 0.08 rows: clamped to 1
  # (the long side keeps its size), never a zero-sized array or a division by zero.
  scale = (64, 32)
  h, w = T.rescale_size(size, scale)
  assert min(h, w) >= 1 and max(h, w) <= 64
  img = _image(*size)
  label = np.random.default_rng(1).integers(0, 4, size).astype(np.uint8)
  for seed in range(4):
    x, y = T.TrainTransform(crop_size=(32, 32), scale=scale)(img, label,
                                                              np.random.default_rng(seed))
    assert x.shape == (32, 32, 3) and y.shape == (32, 32) and np.isfinite(x).all()
  x, y = T.EvalTransform(scale=scale)(img, label)
  assert x.shape[:2] == (h, w) and y.shape == size


@pytest.mark.parametrize('size', EXTREME_SIZES)
def test_extreme_aspect_ratios_in_detection_and_inference_resizes(size):
  from projects.cvt_detection.data import transforms as D
  from projects.cvt_segmentation.inference import scaled_size

  example = {'image': _image(*size), 'boxes': np.float32([[0, 0, size[1], size[0]]]),
             'labels': np.int32([0]), 'image_id': 1}
  out = D.DetectionTrainTransform(scale=(64, 32))(example, np.random.default_rng(0))
  assert min(out['image_size']) >= 1 and np.isfinite(out['boxes']).all()
  assert min(out['scale_factor']) > 0
  # Test-time scales: mmseg 1.x `Resize(scale_factor=ratio)` and a (long, short) test scale.
  for ratio in (0.03, 0.5):
    assert min(scaled_size(size, ratio)) >= 1
    assert min(scaled_size(size, ratio, (64, 32))) >= 1
