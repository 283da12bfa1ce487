"""Whole, sliding-window and test-time-augmented inference against mmseg's algorithms."""

import jax.numpy as jnp
import numpy as np
import pytest

from projects.cvt_segmentation import inference
from projects.cvt_segmentation.data import EvalLoader, EvalTransform, normalize, resize_image
from projects.training import datasets

from .test_inference_support import (
    ContextModel,
    ListSource,
    PointwiseModel,
    logits_fn_of,
    random_images,
)

K = 5


def _mmseg_slide(logits_fn, images, crop_size, stride):
  """mmseg EncoderDecoder.slide_inference, transcribed to NHWC numpy."""
  (h_crop, w_crop), (h_stride, w_stride) = crop_size, stride
  batch, h_img, w_img, _ = images.shape
  h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
  w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
  preds, count_mat = None, np.zeros((batch, h_img, w_img, 1))
  for h_idx in range(h_grids):
    for w_idx in range(w_grids):
      y1, x1 = h_idx * h_stride, w_idx * w_stride
      y2, x2 = min(y1 + h_crop, h_img), min(x1 + w_crop, w_img)
      y1, x1 = max(y2 - h_crop, 0), max(x2 - w_crop, 0)
      crop_logit = np.asarray(inference._as_logits(logits_fn(images[:, y1:y2, x1:x2])))
      if preds is None:
        preds = np.zeros((batch, h_img, w_img, crop_logit.shape[-1]))
      preds[:, y1:y2, x1:x2] += crop_logit
      count_mat[:, y1:y2, x1:x2] += 1
  assert (count_mat == 0).sum() == 0
  return preds / count_mat


@pytest.mark.parametrize(
    'size,crop,stride',
    [((37, 53), (16, 24), (10, 15)), ((16, 24), (16, 24), (8, 8)), ((10, 70), (16, 16), (11, 16)),
     ((64, 64), (32, 32), (32, 32)), ((5, 5), (16, 16), (8, 8))],
)
def test_slide_windows_follow_mmseg(size, crop, stride):
  windows = inference.slide_windows(size, crop, stride)
  h, w = size
  for y1, y2, x1, x2 in windows:
    assert 0 <= y1 < y2 <= h and 0 <= x1 < x2 <= w
    assert (y2 - y1, x2 - x1) == (min(h, crop[0]), min(w, crop[1]))  # one shape per image
  count = inference.slide_count(size, crop, stride)
  assert count.min() >= 1
  # Same windows as the transcription (its count map is the same).
  images = np.zeros((1, h, w, 1), np.float32)
  ones = _mmseg_slide(lambda x: np.ones(x.shape), images, crop, stride)
  assert np.all(ones == 1)


def test_slide_matches_mmseg_transcription_on_a_context_model():
  logits_fn = logits_fn_of(ContextModel(K))
  images = random_images(0, (2, 37, 53, 3))
  got = inference.slide_inference(logits_fn, images, (16, 24), (10, 15), K)
  want = _mmseg_slide(logits_fn, images, (16, 24), (10, 15))
  assert got.shape == (2, 37, 53, K) and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


@pytest.mark.parametrize('crop', [(20, 30), (64, 64)])
def test_slide_equals_whole_when_one_window_covers_the_image(crop):
  logits_fn = logits_fn_of(ContextModel(K))  # global context: any other window would differ
  images = random_images(1, (2, 20, 30, 3))
  whole = inference.whole_inference(logits_fn, images, num_classes=K)
  slide = inference.slide_inference(logits_fn, images, crop, (8, 8), K)
  np.testing.assert_array_equal(np.asarray(slide), np.asarray(whole))


def test_slide_within_1e5_of_whole_with_overlapping_windows_on_a_pointwise_model():
  logits_fn = logits_fn_of(PointwiseModel(K))
  images = random_images(2, (2, 37, 53, 3))
  assert inference.slide_count((37, 53), (16, 24), (10, 15)).max() > 1  # windows overlap
  whole = inference.whole_inference(logits_fn, images)
  slide = inference.slide_inference(logits_fn, images, (16, 24), (10, 15), K)
  np.testing.assert_allclose(np.asarray(slide), np.asarray(whole), atol=1e-5, rtol=0)


def test_pad_to_crop_pads_small_windows_and_crops_back():
  calls = []
  pointwise = logits_fn_of(PointwiseModel(K))

  def logits_fn(x):
    calls.append(x.shape)
    return pointwise(x)

  images = random_images(3, (1, 12, 40, 3))
  out = inference.slide_inference(logits_fn, images, (16, 16), (8, 8), K, pad_to_crop=True)
  assert {shape[1:3] for shape in calls} == {(16, 16)}
  np.testing.assert_allclose(np.asarray(out), np.asarray(pointwise(images)), atol=1e-5)


def test_repeated_sizes_do_not_recompile():
  logits_fn = logits_fn_of(PointwiseModel(K))
  images = random_images(4, (1, 30, 44, 3))
  inference.predict_labels(logits_fn, images, (33, 47), mode='slide', crop_size=16, stride=10)
  before = (inference._accumulate._cache_size(), inference._resize_argmax._cache_size())
  inference.predict_labels(logits_fn, images + 1, (33, 47), mode='slide', crop_size=16, stride=10)
  assert (inference._accumulate._cache_size(), inference._resize_argmax._cache_size()) == before


@pytest.mark.parametrize('in_size,out_size', [((13, 17), (41, 29)), ((40, 64), (17, 23)),
                                              ((9, 9), (9, 31))])
def test_resize_logits_matches_torch_bilinear(in_size, out_size):
  torch = pytest.importorskip('torch')
  x = random_images(5, (2, *in_size, K))
  want = torch.nn.functional.interpolate(
      torch.from_numpy(x).permute(0, 3, 1, 2), size=out_size, mode='bilinear',
      align_corners=False,
  ).permute(0, 2, 3, 1).numpy()
  got = inference.resize_logits(jnp.asarray(x), out_size)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_predict_probs_and_labels_on_one_image_and_a_batch():
  logits_fn = logits_fn_of(ContextModel(K))
  images = random_images(6, (2, 24, 32, 3))
  probs = inference.predict_probs(logits_fn, images, (50, 61))
  assert probs.shape == (2, 50, 61, K)
  np.testing.assert_allclose(np.asarray(probs.sum(-1)), 1.0, atol=1e-5)
  labels = inference.predict_labels(logits_fn, images, (50, 61))
  assert labels.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(labels), np.asarray(probs.argmax(-1)))
  one = inference.predict_labels(logits_fn, images[1], (50, 61))
  np.testing.assert_array_equal(np.asarray(one), np.asarray(labels[1]))


def test_single_scale_tta_is_the_eval_pipeline():
  logits_fn = logits_fn_of(ContextModel(K))
  image = np.random.default_rng(7).integers(0, 256, (30, 45, 3), dtype=np.uint8)
  label = np.zeros((30, 45), np.int32)
  x, _ = EvalTransform(scale=(40, 20))(image, label)  # keep-ratio resize, then normalize
  assert x.shape[:2] == (20, 30)
  want = inference.predict_probs(logits_fn, x, (30, 45))
  got = inference.aug_inference(logits_fn, image, test_scale=(40, 20))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
  labels = inference.segment_image(logits_fn, image, test_scale=(40, 20))
  want_labels = inference.predict_labels(logits_fn, x, (30, 45))
  np.testing.assert_array_equal(labels, np.asarray(want_labels))


def test_tta_averages_softmax_at_the_original_size():
  logits_fn = logits_fn_of(ContextModel(K))
  image = np.random.default_rng(8).integers(0, 256, (30, 45, 3), dtype=np.uint8)
  scales = (0.5, 1.25)
  want = []
  for ratio in scales:  # mmseg 0.x MultiScaleFlipAug(img_scale=(40, 20), img_ratios=...)
    size = inference.scaled_size((30, 45), ratio, (40, 20))
    x = normalize(resize_image(image, size))
    want.append(inference.predict_probs(logits_fn, x, (30, 45)))
    flipped = inference.predict_probs(logits_fn, x[:, ::-1], (30, 45))
    want.append(flipped[:, ::-1])
  got = inference.aug_inference(logits_fn, image, scales=scales, flip=True, test_scale=(40, 20))
  np.testing.assert_allclose(np.asarray(got), np.mean(want, axis=0), atol=1e-6)
  assert inference.scaled_size((30, 45), 0.5, (40, 20)) == (10, 15)
  assert inference.scaled_size((30, 45), 1.5, None) == (45, 68)  # mmseg 1.x scale_factor


@pytest.mark.parametrize('mode', ['whole', 'slide'])
def test_flip_tta_of_a_symmetric_input_is_symmetric(mode):
  logits_fn = logits_fn_of(ContextModel(K))
  half = random_images(9, (24, 17, 3))
  image = np.concatenate([half, half[:, ::-1]], axis=1)  # 24 x 34, mirror-symmetric
  kwargs = dict(mode=mode, crop_size=(16, 16), stride=(9, 9), mean=None,
                scales=(0.75, 1.0, 1.5))
  plain = np.asarray(inference.aug_inference(logits_fn, image, flip=False, **kwargs))
  assert np.abs(plain - plain[:, ::-1]).max() > 1e-3  # the model itself is not symmetric
  probs = np.asarray(inference.aug_inference(logits_fn, image, flip=True, **kwargs))
  np.testing.assert_allclose(probs, probs[:, ::-1], atol=1e-6)
  labels = probs.argmax(-1)
  top2 = np.sort(probs, -1)[..., -2:]
  clear = (top2[..., 1] - top2[..., 0]) > 1e-4
  assert np.all((labels == labels[:, ::-1])[clear & clear[:, ::-1]])


def _alone(logits_fn, item, transform, **kwargs):
  x, label = transform(item['image'], item['label'])
  return np.asarray(inference.predict_labels(logits_fn, x, label.shape, **kwargs))


@pytest.mark.parametrize('kwargs', [dict(mode='whole'),
                                    dict(mode='slide', crop_size=(12, 12), stride=(8, 8))])
def test_padding_inside_a_batch_does_not_change_predictions(kwargs):
  logits_fn = logits_fn_of(ContextModel(K))
  source = ListSource([(20, 28), (33, 17), (20, 28), (12, 40)], K, seed=1)
  transform = EvalTransform(scale=(24, 16))  # inputs smaller than labels: resized back
  loader = EvalLoader(source, transform, batch_size=3, size_divisor=32, num_threads=0)
  preds = []
  for batch in loader:
    assert batch['inputs'].shape[1:3] == (32, 32)  # padded
    preds += [p for p in inference.predict_batch(logits_fn, batch, **kwargs) if p is not None]
  assert len(preds) == len(source)
  for item, pred in zip(source.items, preds, strict=True):
    np.testing.assert_array_equal(pred, _alone(logits_fn, item, transform, **kwargs))
  # Inferring the padded batch at once instead lets a global-context model see the padding.
  batch = loader.batch(0)
  padded = inference.predict_batch(logits_fn, batch, exact=False, **kwargs)
  assert any(not np.array_equal(p, _alone(logits_fn, it, transform, **kwargs))
             for p, it in zip(padded, source.items[:3], strict=True))


def test_pmap_layout_batches_are_flattened():
  logits_fn = logits_fn_of(PointwiseModel(K))
  source = ListSource([(20, 28), (33, 17), (20, 28)], K, seed=2)
  flat = EvalLoader(source, EvalTransform(), batch_size=4, size_divisor=8, num_threads=0)
  a = inference.predict_batch(logits_fn, flat.batch(0))
  b = inference.predict_batch(logits_fn, datasets.shard(flat.batch(0), 2))
  assert a[3] is None and b[3] is None
  for x, y in zip(a[:3], b[:3], strict=True):
    np.testing.assert_array_equal(x, y)


def test_tiny_and_elongated_images_are_padded_to_min_size():
  pointwise = logits_fn_of(PointwiseModel(K))

  def needs_16(x):
    if min(x.shape[1:3]) < 16:
      raise ValueError(f'image too small: {x.shape}')
    return pointwise(x)

  image = random_images(10, (5, 90, 3))
  with pytest.raises(ValueError, match='too small'):
    inference.predict_labels(needs_16, image)
  labels = inference.predict_labels(needs_16, image, min_size=inference.DEFAULT_MIN_SIZE)
  assert labels.shape == (5, 90)
  np.testing.assert_array_equal(np.asarray(labels),
                                np.asarray(inference.predict_labels(pointwise, image)))
  slide = inference.predict_labels(needs_16, image, mode='slide', crop_size=32, stride=16,
                                   min_size=16)
  assert slide.shape == (5, 90)


def test_errors_are_clear():
  logits_fn = logits_fn_of(PointwiseModel(K))
  images = random_images(11, (1, 16, 16, 3))
  with pytest.raises(ValueError, match='predicts 5 classes but 7 were expected'):
    inference.whole_inference(logits_fn, images, num_classes=7)
  with pytest.raises(ValueError, match='at the size of its input'):
    inference.whole_inference(lambda x: x[:, ::2], images)
  with pytest.raises(ValueError, match='needs crop_size and stride'):
    inference.infer_logits(logits_fn, images, mode='slide')
  with pytest.raises(ValueError, match='unknown inference mode'):
    inference.infer_logits(logits_fn, images, mode='sliding')
  with pytest.raises(ValueError, match='leaves pixels uncovered'):
    inference.slide_windows((40, 40), (16, 16), (20, 8))
