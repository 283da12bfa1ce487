"""Box utilities: IoU and GIoU against NumPy formulas, distance coding, clipping, centerness."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from heads.detection.boxes import (
    box_area,
    centerness_targets,
    clip_boxes,
    decode_ltrb,
    elementwise_giou,
    encode_ltrb,
    pairwise_iou,
)


def _random_boxes(rng, n, size=50.0):
  xy = rng.uniform(0, size, (n, 2))
  wh = rng.uniform(0, size / 2, (n, 2))
  return np.concatenate([xy, xy + wh], axis=-1).astype(np.float32)


def _np_iou(a, b):
  out = np.zeros((len(a), len(b)))
  for i, p in enumerate(a.astype(np.float64)):
    for j, q in enumerate(b.astype(np.float64)):
      w = max(min(p[2], q[2]) - max(p[0], q[0]), 0)
      h = max(min(p[3], q[3]) - max(p[1], q[1]), 0)
      union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - w * h
      out[i, j] = w * h / max(union, 1e-6)
  return out


def _np_giou(p, q):
  p, q = p.astype(np.float64), q.astype(np.float64)
  iw = np.maximum(np.minimum(p[..., 2], q[..., 2]) - np.maximum(p[..., 0], q[..., 0]), 0)
  ih = np.maximum(np.minimum(p[..., 3], q[..., 3]) - np.maximum(p[..., 1], q[..., 1]), 0)
  area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
  union = area(p) + area(q) - iw * ih
  enclose = ((np.maximum(p[..., 2], q[..., 2]) - np.minimum(p[..., 0], q[..., 0]))
             * (np.maximum(p[..., 3], q[..., 3]) - np.minimum(p[..., 1], q[..., 1])))
  return iw * ih / union - (enclose - union) / enclose


@pytest.mark.parametrize('seed', [0, 1])
def test_pairwise_iou_matches_numpy(seed):
  rng = np.random.default_rng(seed)
  a, b = _random_boxes(rng, 7), _random_boxes(rng, 5)
  np.testing.assert_allclose(pairwise_iou(a, b), _np_iou(a, b), atol=1e-6)
  np.testing.assert_allclose(pairwise_iou(a, a).diagonal(), 1.0, atol=1e-6)


def test_pairwise_iou_zero_area_boxes_are_finite():
  a = np.array([[0, 0, 0, 0], [5, 5, 5, 9], [0, 0, 4, 4]], np.float32)
  b = np.zeros((2, 4), np.float32)
  iou = pairwise_iou(a, b)
  assert iou.shape == (3, 2)
  np.testing.assert_array_equal(iou, 0.0)
  grad = jax.grad(lambda x: pairwise_iou(x, b).sum())(jnp.asarray(a))
  assert np.isfinite(grad).all()


@pytest.mark.parametrize('shape', [(6,), (2, 3)])
def test_elementwise_giou_matches_numpy(shape):
  rng = np.random.default_rng(3)
  n = int(np.prod(shape))
  a = _random_boxes(rng, n).reshape(*shape, 4)
  b = _random_boxes(rng, n).reshape(*shape, 4)
  giou = elementwise_giou(a, b)
  assert giou.shape == shape
  np.testing.assert_allclose(giou, _np_giou(a, b), atol=1e-6)
  np.testing.assert_allclose(elementwise_giou(a, a), 1.0, atol=1e-6)


def test_giou_of_degenerate_boxes_is_finite_with_finite_gradient():
  a = jnp.zeros((3, 4))
  b = jnp.array([[0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 2, 2]], jnp.float32)
  assert np.isfinite(elementwise_giou(a, b)).all()
  assert np.isfinite(jax.grad(lambda x: elementwise_giou(x, b).sum())(a)).all()


def test_encode_decode_round_trip_and_inside_sign():
  points = np.array([[5.0, 5.0], [20.0, 3.0]], np.float32)
  boxes = np.array([[[0, 0, 10, 20], [0, 0, 10, 20]]], np.float32)  # [1, P, 4]
  ltrb = encode_ltrb(points, boxes)
  np.testing.assert_allclose(ltrb, [[[5, 5, 5, 15], [20, 3, -10, 17]]])
  np.testing.assert_allclose(decode_ltrb(points, ltrb), boxes)


def test_box_area_clip_and_centerness():
  np.testing.assert_allclose(box_area(np.array([[0, 0, 2, 3], [4, 4, 2, 2]], np.float32)), [6, 0])
  boxes = np.array([[[-5, 2, 40, 70]], [[3, -1, 8, 9]]], np.float32)  # [B=2, 1, 4]
  hw = np.array([[[50, 30]], [[6, 5]]], np.float32)  # [B, 1, 2] (height, width)
  np.testing.assert_allclose(clip_boxes(boxes, hw), [[[0, 2, 30, 50]], [[3, 0, 5, 6]]])
  ltrb = np.array([[5, 5, 5, 5], [2, 1, 8, 4], [-1, 2, 3, 4], [0, 0, 0, 0]], np.float32)
  np.testing.assert_allclose(centerness_targets(ltrb), [1.0, np.sqrt(0.25 * 0.25), 0.0, 0.0],
                             atol=1e-7)


def test_shape_errors_name_what_was_expected():
  with pytest.raises(ValueError, match=r'\[N, 4\] and \[M, 4\]'):
    pairwise_iou(np.zeros((3, 5)), np.zeros((2, 4)))
  with pytest.raises(ValueError, match=r'\[\.\.\., 2\]'):
    decode_ltrb(np.zeros((3, 3)), np.zeros((3, 4)))
