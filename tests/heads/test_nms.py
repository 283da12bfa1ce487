"""Jit NMS against a plain NumPy greedy NMS, and FCOS/ATSS post-processing on hand and random
cases against a NumPy transcription of mmdet's `_predict_by_feat_single` + `batched_nms`."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from heads.detection.nms import nms, postprocess


def _np_iou(a, b):
  w = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
  h = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
  return w * h / max(union, 1e-6)


def _reference_nms(boxes, scores, iou_threshold, max_outputs, classes=None,
                   score_threshold=-np.inf):
  """Greedy NMS: visit boxes by decreasing score (stable), keep those no kept box overlaps."""
  boxes = np.asarray(boxes, np.float64)
  kept = []
  for i in np.argsort(-np.asarray(scores), kind='stable'):
    if not scores[i] > score_threshold:
      continue
    if all(_np_iou(boxes[i], boxes[k]) <= iou_threshold
           or (classes is not None and classes[i] != classes[k]) for k in kept):
      kept.append(int(i))
  kept = kept[:max_outputs]
  return np.array(kept + [-1] * (max_outputs - len(kept)))


def _random_boxes(rng, n, size=60.0):
  # Clustered so that many boxes overlap: centres near a few spots.
  centres = rng.uniform(10, size - 10, (4, 2))[rng.integers(0, 4, n)] + rng.normal(0, 2, (n, 2))
  wh = rng.uniform(5, 25, (n, 2))
  return np.concatenate([centres - wh / 2, centres + wh / 2], -1).astype(np.float32)


_nms = jax.jit(nms, static_argnames='max_outputs')


@pytest.mark.parametrize('seed,iou_threshold,max_outputs', [
    (0, 0.5, 10), (1, 0.3, 40), (2, 0.7, 5), (3, 0.5, 60)])
def test_nms_matches_greedy_reference_under_jit(seed, iou_threshold, max_outputs):
  rng = np.random.default_rng(seed)
  boxes = _random_boxes(rng, 40)
  # Scores on a coarse grid, so ties are common: lower index goes first.
  scores = np.round(rng.uniform(size=40), 1).astype(np.float32)
  indices, valid = _nms(boxes, scores, iou_threshold, max_outputs=max_outputs)
  expected = _reference_nms(boxes, scores, iou_threshold, max_outputs)
  assert indices.shape == (max_outputs,) and indices.dtype == np.int32
  np.testing.assert_array_equal(indices, expected)
  np.testing.assert_array_equal(valid, expected >= 0)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_nms_with_classes_is_class_aware(seed):
  rng = np.random.default_rng(seed + 10)
  boxes = _random_boxes(rng, 40)
  scores = rng.uniform(size=40).astype(np.float32)
  classes = rng.integers(0, 3, 40).astype(np.int32)
  indices, valid = _nms(boxes, scores, 0.5, max_outputs=30, score_threshold=0.2,
                        classes=classes)
  expected = _reference_nms(boxes, scores, 0.5, 30, classes=classes, score_threshold=0.2)
  np.testing.assert_array_equal(indices, expected)
  np.testing.assert_array_equal(valid, expected >= 0)
  agnostic = _reference_nms(boxes, scores, 0.5, 30, score_threshold=0.2)
  assert (expected >= 0).sum() > (agnostic >= 0).sum()  # classes do keep more boxes


def test_nms_hand_case_and_padding():
  boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10],
                    [0, 0, 0, 0]], np.float32)
  scores = np.array([0.9, 0.95, 0.5, 0.9, -np.inf], np.float32)
  indices, valid = nms(boxes, scores, iou_threshold=0.5, max_outputs=4)
  np.testing.assert_array_equal(indices, [1, 2, -1, -1])
  np.testing.assert_array_equal(valid, [True, True, False, False])
  # Exact duplicates with equal scores: the lower index survives.
  indices, _ = nms(boxes[[0, 3]], scores[[0, 3]], iou_threshold=0.5, max_outputs=2)
  np.testing.assert_array_equal(indices, [0, -1])
  indices, valid = nms(np.zeros((0, 4)), np.zeros(0), 0.5, 3)
  np.testing.assert_array_equal(indices, -1)
  assert not valid.any()


def _np_sigmoid(x):
  return 1 / (1 + np.exp(-np.asarray(x, np.float64)))


def _reference_postprocess(cls_logits, box_distances, centerness_logits, points, level_sizes,
                           image_size, scale_factor, pre_nms_topk, score_threshold,
                           iou_threshold, max_detections):
  """mmdet `_predict_by_feat_single` with score factors, then `_bbox_post_process`, one image."""
  num_classes = cls_logits.shape[-1]
  boxes, scores, labels = [], [], []
  start = 0
  for n in level_sizes:
    probs = _np_sigmoid(cls_logits[start:start + n]).astype(np.float32).reshape(-1)
    candidates = np.flatnonzero(probs > score_threshold)  # filter_scores_and_topk
    candidates = candidates[np.argsort(-probs[candidates], kind='stable')][:pre_nms_topk]
    for flat in candidates:
      p, k = start + flat // num_classes, flat % num_classes
      (x, y), (left, top, right, bottom) = points[p], box_distances[p]
      h, w = image_size
      box = np.clip([x - left, y - top, x + right, y + bottom], 0, [w, h, w, h])
      boxes.append(box / np.array([scale_factor[1], scale_factor[0]] * 2))
      scores.append(probs[flat] * _np_sigmoid(centerness_logits[p]))
      labels.append(k)
    start += n
  scores, labels = np.array(scores), np.array(labels)
  keep = _reference_nms(np.array(boxes), scores, iou_threshold, max_detections, classes=labels)
  keep = keep[keep >= 0]
  return np.array(boxes)[keep].reshape(-1, 4), scores[keep], labels[keep]


LEVEL_SHAPES = ((4, 4), (2, 2))  # strides 8 and 16 over a 32x32 input
POINTS = np.array([[(x + 0.5) * s, (y + 0.5) * s]
                   for (h, w), s in zip(LEVEL_SHAPES, (8, 16), strict=True)
                   for y in range(h) for x in range(w)], np.float32)
LEVEL_SIZES = (16, 4)
_postprocess = jax.jit(postprocess, static_argnames=(
    'level_sizes', 'pre_nms_topk', 'max_detections'))


def _hand_case():
  cls_logits = np.full((2, 20, 3), -10.0, np.float32)  # sigmoid(-10) < 0.05: background
  distances = np.full((2, 20, 4), 4.0, np.float32)
  ctr_logits = np.zeros((2, 20), np.float32)
  # Point 5 (12, 12): the top box [2, 2, 22, 22], class 1.
  cls_logits[0, 5, 1], distances[0, 5], ctr_logits[0, 5] = 3.0, (10, 10, 10, 10), 4.0
  # Point 6 (20, 12): the same box, class 1, lower score: a duplicate to suppress.
  cls_logits[0, 6, 1], distances[0, 6] = 2.0, (18, 10, 2, 10)
  # The same box in class 2 survives class-aware NMS.
  cls_logits[0, 6, 2] = 1.0
  # Point 17 (24, 8) on the stride-16 level, class 0: a box past the right edge, clipped.
  cls_logits[0, 17, 0], distances[0, 17] = 0.0, (4, 4, 30, 4)
  return cls_logits, distances, ctr_logits


def test_postprocess_hand_case():
  cls_logits, distances, ctr_logits = _hand_case()
  image_sizes = np.array([[32, 28], [32, 32]], np.float32)  # (h, w) before padding
  scale_factors = np.array([[0.5, 2.0], [1.0, 1.0]], np.float32)  # resized / original, (h, w)
  out = _postprocess(cls_logits, distances, ctr_logits, POINTS, LEVEL_SIZES, image_sizes,
                     scale_factors, max_detections=5)
  assert {k: v.shape for k, v in out.items()} == {
      'boxes': (2, 5, 4), 'scores': (2, 5), 'classes': (2, 5), 'valid': (2, 5)}
  np.testing.assert_array_equal(out['valid'], [[True] * 3 + [False] * 2, [False] * 5])
  np.testing.assert_array_equal(out['classes'], [[1, 2, 0, -1, -1], [-1] * 5])
  sig = lambda x: float(_np_sigmoid(x))
  np.testing.assert_allclose(out['scores'][0, :3],
                             [sig(3) * sig(4), sig(1) * sig(0), sig(0) * sig(0)], rtol=1e-6)
  # x / 2 and y / 0.5 back in the original image; the last box clipped at x = 28 first.
  np.testing.assert_allclose(out['boxes'][0, :3], [[1, 4, 11, 44], [1, 4, 11, 44],
                                                   [10, 8, 14, 24]])
  np.testing.assert_array_equal(out['boxes'][0, 3:], 0)
  np.testing.assert_array_equal(out['scores'][1], 0)


def test_postprocess_pre_nms_topk_is_per_level():
  cls_logits, distances, ctr_logits = _hand_case()
  out = _postprocess(cls_logits[:1], distances[:1], ctr_logits[:1], POINTS, LEVEL_SIZES,
                     np.array([[32, 32]]), np.ones((1, 2)), pre_nms_topk=1, max_detections=4)
  # One candidate per level: the class-1 box at point 5 and the stride-16 box.
  np.testing.assert_array_equal(out['classes'][0], [1, 0, -1, -1])


@pytest.mark.parametrize('seed', [0, 1])
def test_postprocess_matches_mmdet_reference_on_random_outputs(seed):
  rng = np.random.default_rng(seed)
  cls_logits = rng.normal(-2.5, 1.5, (2, 20, 3)).astype(np.float32)
  distances = rng.uniform(2, 20, (2, 20, 4)).astype(np.float32)
  ctr_logits = rng.normal(size=(2, 20)).astype(np.float32)
  image_sizes = np.array([[30, 32], [32, 27]], np.float32)
  scale_factors = np.array([[1.5, 1.5], [0.8, 1.25]], np.float32)
  settings = dict(pre_nms_topk=6, score_threshold=0.05, iou_threshold=0.5, max_detections=8)
  out = _postprocess(cls_logits, distances, ctr_logits, POINTS, LEVEL_SIZES, image_sizes,
                     scale_factors, **settings)
  for b in range(2):
    boxes, scores, labels = _reference_postprocess(
        cls_logits[b], distances[b], ctr_logits[b], POINTS, LEVEL_SIZES, image_sizes[b],
        scale_factors[b], **settings)
    n = len(scores)
    assert 0 < n and out['valid'][b].sum() == n
    np.testing.assert_array_equal(out['classes'][b, :n], labels)
    np.testing.assert_allclose(out['scores'][b, :n], scores, rtol=1e-5)
    np.testing.assert_allclose(out['boxes'][b, :n], boxes, rtol=1e-5, atol=1e-4)


def test_postprocess_shape_errors():
  cls_logits, distances, ctr_logits = _hand_case()
  call = functools.partial(postprocess, cls_logits, distances, ctr_logits, POINTS)
  with pytest.raises(ValueError, match='level_sizes'):
    call((16, 3), np.ones((2, 2)), np.ones((2, 2)))
  with pytest.raises(ValueError, match=r'scale_factors of shape \[2, 2\]'):
    call(LEVEL_SIZES, np.ones((2, 2)), np.ones((2,)))
