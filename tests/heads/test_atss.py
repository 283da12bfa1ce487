"""ATSS assignment against a plain NumPy transcription of the paper's Algorithm 1 (and mmdet's
`ATSSAssigner`), on random boxes and hand cases; points, anchors, padding, jit and vmap."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from heads.detection.atss import (
    anchor_boxes,
    anchor_points,
    assign_targets,
    atss_assign,
    level_sizes_of,
    point_strides,
)

STRIDES = (8, 16, 32)
# One compilation per input signature instead of an eager dispatch per op.
_assign = jax.jit(atss_assign, static_argnames=('level_sizes', 'topk'))


def _setup(height, width, strides=STRIDES):
  shapes = [(-(-height // s), -(-width // s)) for s in strides]
  points = anchor_points(shapes, strides)
  anchors = anchor_boxes(points, point_strides(shapes, strides))
  return np.asarray(anchors), np.asarray(points), level_sizes_of(shapes)


def _np_iou(a, b):
  w = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
  h = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
  return w * h / max(union, 1e-6)


def _reference_atss(anchors, points, level_sizes, gt_boxes, topk=9):
  """Algorithm 1 of Zhang et al. 2020 with mmdet's details, one gt and one point at a time."""
  anchors, points, gt_boxes = (np.asarray(x, np.float64) for x in (anchors, points, gt_boxes))
  num_points = len(points)
  ious = np.array([[_np_iou(g, a) for a in anchors] for g in gt_boxes]).reshape(-1, num_points)
  positive = np.zeros((len(gt_boxes), num_points), bool)
  for g, (x0, y0, x1, y1) in enumerate(gt_boxes):
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    candidates = []
    start = 0
    for size in level_sizes:
      dist = [(points[p, 0] - cx) ** 2 + (points[p, 1] - cy) ** 2
              for p in range(start, start + size)]
      nearest = np.argsort(dist, kind='stable')[:min(topk, size)]
      candidates.extend(start + int(i) for i in nearest)
      start += size
    values = ious[g, candidates]
    threshold = values.mean() + (values.std(ddof=1) if len(values) > 1 else 0.0)
    for p in candidates:
      x, y = points[p]
      inside = min(x - x0, y - y0, x1 - x, y1 - y) > 0.01
      if ious[g, p] >= threshold and inside:
        positive[g, p] = True
  assigned = np.full(num_points, -1)
  for p in range(num_points):
    for g in range(len(gt_boxes)):
      if positive[g, p] and (assigned[p] < 0 or ious[g, p] > ious[assigned[p], p]):
        assigned[p] = g
  return assigned


def _random_gts(rng, n, height, width):
  wh = rng.uniform(4, 0.7 * min(height, width), (n, 2))
  xy = rng.uniform(0, 1, (n, 2)) * (np.array([width, height]) - wh)
  return np.concatenate([xy, xy + wh], axis=-1).astype(np.float32)


def test_points_strides_and_anchors():
  shapes = [(2, 3), (1, 2)]
  points = anchor_points(shapes, (8, 16))
  np.testing.assert_array_equal(points, [[4, 4], [12, 4], [20, 4], [4, 12], [12, 12], [20, 12],
                                         [8, 8], [24, 8]])
  strides = point_strides(shapes, (8, 16))
  np.testing.assert_array_equal(strides, [8] * 6 + [16] * 2)
  assert level_sizes_of(shapes) == (6, 2)
  anchors = anchor_boxes(points, strides)
  np.testing.assert_array_equal(anchors[0], [-28, -28, 36, 36])  # side 8 * 8 around (4, 4)
  np.testing.assert_array_equal(anchors[-1], [-40, -56, 88, 72])  # side 8 * 16 around (24, 8)


@pytest.mark.parametrize('seed', [0, 1, 2, 3])
def test_matches_reference_on_random_boxes(seed):
  rng = np.random.default_rng(seed)
  height, width = 64, 96
  anchors, points, sizes = _setup(height, width)
  gts = _random_gts(rng, 5, height, width)
  assigned = _assign(anchors, points, sizes, gts, np.ones(5, bool))
  assert assigned.dtype == jnp.int32 and assigned.shape == (len(points),)
  np.testing.assert_array_equal(assigned, _reference_atss(anchors, points, sizes, gts))
  assert (assigned >= 0).any()


@pytest.mark.parametrize('topk', [1, 3, 9])
def test_matches_reference_for_topk_larger_than_a_level(topk):
  # The coarsest level has 2 points: k = min(topk, 2) there.
  rng = np.random.default_rng(7)
  anchors, points, sizes = _setup(40, 56)
  gts = _random_gts(rng, 4, 40, 56)
  assigned = _assign(anchors, points, sizes, gts, np.ones(4, bool), topk=topk)
  np.testing.assert_array_equal(assigned, _reference_atss(anchors, points, sizes, gts, topk))


def test_box_smaller_than_every_anchor_takes_the_point_inside_it():
  anchors, points, sizes = _setup(64, 64)  # anchors of 64, 128 and 256 px
  gts = np.array([[10, 10, 14, 14]], np.float32)  # 4 px, around the stride-8 point (12, 12)
  assigned = np.asarray(_assign(anchors, points, sizes, gts, np.ones(1, bool)))
  np.testing.assert_array_equal(assigned, _reference_atss(anchors, points, sizes, gts))
  # All nine stride-8 anchors contain the box (equal IoU, above the threshold); only one of
  # their points lies inside it.
  assert np.flatnonzero(assigned >= 0).tolist() == [1 * 8 + 1]


def test_boxes_sharing_points_take_the_highest_iou():
  anchors, points, sizes = _setup(64, 64)
  # Nested boxes around the same centre: every point inside the small one is inside both.
  gts = np.array([[4, 4, 60, 60], [16, 16, 48, 48]], np.float32)
  both = np.asarray(_assign(anchors, points, sizes, gts, np.ones(2, bool)))
  np.testing.assert_array_equal(both, _reference_atss(anchors, points, sizes, gts))
  alone = [np.asarray(_assign(anchors, points, sizes, gts, np.arange(2) == g))
           for g in range(2)]
  contested = (alone[0] >= 0) & (alone[1] >= 0)
  assert contested.any()
  ious = np.array([[_np_iou(g, a) for a in anchors] for g in gts.astype(np.float64)])
  np.testing.assert_array_equal(both[contested], np.argmax(ious[:, contested], axis=0))
  np.testing.assert_array_equal(both[~contested], np.maximum(alone[0], alone[1])[~contested])


def test_padded_boxes_never_match_and_change_nothing():
  rng = np.random.default_rng(11)
  anchors, points, sizes = _setup(64, 96)
  gts = _random_gts(rng, 3, 64, 96)
  expected = _assign(anchors, points, sizes, gts, np.ones(3, bool))
  # Padding rows: zeros, a copy of a real box, a large box over everything, a NaN box.
  pad = np.array([[0, 0, 0, 0], gts[0], [0, 0, 96, 64], [np.nan] * 4], np.float32)
  padded = np.stack([pad[0], gts[0], pad[1], gts[1], pad[2], gts[2], pad[3]])
  valid = np.array([False, True, False, True, False, True, False])
  assigned = _assign(anchors, points, sizes, padded, valid)
  remap = np.array([-1, 1, 3, 5])  # gt index in `gts` -> index in `padded`, -1 kept
  np.testing.assert_array_equal(assigned, remap[np.asarray(expected) + 1])


def test_image_without_valid_boxes_is_all_background():
  anchors, points, sizes = _setup(32, 32)
  gts = np.array([[0, 0, 20, 20], [4, 4, 30, 30]], np.float32)
  np.testing.assert_array_equal(_assign(anchors, points, sizes, gts, np.zeros(2, bool)), -1)
  np.testing.assert_array_equal(
      _assign(anchors, points, sizes, np.zeros((0, 4)), np.zeros(0, bool)), -1)


def test_assign_targets_batch_under_jit_matches_reference():
  rng = np.random.default_rng(5)
  anchors, points, sizes = _setup(64, 64)
  gts = np.stack([_random_gts(rng, 4, 64, 64) for _ in range(3)])
  labels = rng.integers(0, 7, (3, 4)).astype(np.int32)
  valid = np.array([[True, True, True, False], [False] * 4, [True, False, True, True]])
  fn = jax.jit(functools.partial(assign_targets, level_sizes=sizes))
  targets = fn(anchors, points, gt_boxes=gts, gt_labels=labels, gt_valid=valid)
  assert targets['cls_targets'].shape == (3, len(points))
  assert targets['box_targets'].shape == (3, len(points), 4)
  for b in range(3):
    kept = np.flatnonzero(valid[b])
    assigned = np.full(len(points), -1)
    if len(kept):
      local = _reference_atss(anchors, points, sizes, gts[b, kept])
      assigned = np.where(local >= 0, kept[local], -1)
    positive = assigned >= 0
    np.testing.assert_array_equal(targets['positive'][b], positive)
    np.testing.assert_array_equal(targets['cls_targets'][b],
                                  np.where(positive, labels[b][assigned], -1))
    np.testing.assert_array_equal(targets['box_targets'][b],
                                  np.where(positive[:, None], gts[b][assigned], 0))


def test_errors_name_the_mismatch():
  anchors, points, sizes = _setup(32, 32)
  with pytest.raises(ValueError, match='level_sizes'):
    atss_assign(anchors, points, sizes[:-1], np.zeros((1, 4)), np.ones(1, bool))
  with pytest.raises(ValueError, match=r'gt_boxes \[G, 4\] and gt_valid \[G\]'):
    atss_assign(anchors, points, sizes, np.zeros((2, 4)), np.ones(3, bool))
  with pytest.raises(ValueError, match='one \\(height, width\\) per stride'):
    anchor_points([(4, 4)], (8, 16))
