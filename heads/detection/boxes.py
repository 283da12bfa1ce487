"""Boxes for dense detection (IoU, GIoU, FCOS distance coding) and the detection shape checks.

Boxes are `[..., 4]` float `(x0, y0, x1, y1)` pixels (no `+1`, as mmdet and torchvision),
points `[..., 2]` `(x, y)`. Zero-area and inverted boxes (a static batch's padding) are safe:
extents clamp at 0 and divisions are guarded, so no NaN reaches a loss or its gradient.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from heads.features import is_symbolic

# Lower bound on union and enclosing areas, as mmdet's `bbox_overlaps(..., eps=1e-6)`
# (mmdet/structures/bbox/bbox_overlaps.py).
EPS = 1e-6


def _check_last_dim(x: jax.Array, size: int, what: str) -> None:
  if x.ndim == 0 or x.shape[-1] != size:
    raise ValueError(f'{what} expects an array of shape [..., {size}], got {tuple(x.shape)}.')


def check_shapes(owner: str, cls_logits: jax.Array,
                 expected: dict[str, tuple[Any, tuple[int, ...]]]) -> None:
  """Raises naming the first `name: (array, shape)` whose shape is not the expected one."""
  for name, (x, shape) in expected.items():
    if tuple(jnp.shape(x)) != shape:
      raise ValueError(f'{owner} expects {name} of shape {list(shape)} for cls_logits '
                       f'{list(cls_logits.shape)}, got {list(jnp.shape(x))}.')


def check_level_sizes(level_sizes: tuple[int, ...], num_points: int) -> None:
  # A symbolic size (jax.export) is positive; comparing it could be inconclusive.
  if (not level_sizes or sum(level_sizes) != num_points
      or not all(is_symbolic(n) or n > 0 for n in level_sizes)):
    raise ValueError(f'level_sizes {level_sizes} must be positive and sum to the {num_points} '
                     f'points.')


def box_area(boxes: jax.Array) -> jax.Array:
  """Areas of `[..., 4]` xyxy boxes -> `[...]`; inverted extents count as 0."""
  boxes = jnp.asarray(boxes)
  _check_last_dim(boxes, 4, 'box_area')
  w = jnp.maximum(boxes[..., 2] - boxes[..., 0], 0)
  h = jnp.maximum(boxes[..., 3] - boxes[..., 1], 0)
  return w * h


def _overlap_area(a: jax.Array, b: jax.Array, enclosing: bool = False) -> jax.Array:
  """Area of the intersection (or the enclosing box) of broadcast boxes."""
  lo, hi = (jnp.minimum, jnp.maximum) if enclosing else (jnp.maximum, jnp.minimum)
  return box_area(jnp.concatenate([lo(a[..., :2], b[..., :2]), hi(a[..., 2:], b[..., 2:])], -1))


def pairwise_iou(a: jax.Array, b: jax.Array, eps: float = EPS) -> jax.Array:
  """IoU of every box of `a` `[N, 4]` with every box of `b` `[M, 4]` -> `[N, M]`; the union
  is clamped to `eps` as mmdet's `BboxOverlaps2D` (two empty boxes have IoU 0, not NaN)."""
  a, b = jnp.asarray(a), jnp.asarray(b)
  if a.ndim != 2 or a.shape[-1] != 4 or b.ndim != 2 or b.shape[-1] != 4:
    raise ValueError(
        f'pairwise_iou expects boxes [N, 4] and [M, 4], got {tuple(a.shape)} and {tuple(b.shape)}.')
  inter = _overlap_area(a[:, None], b[None])
  union = box_area(a)[:, None] + box_area(b)[None, :] - inter
  return inter / jnp.maximum(union, eps)


def elementwise_giou(a: jax.Array, b: jax.Array, eps: float = EPS) -> jax.Array:
  """Generalized IoU (Rezatofighi et al. 2019, arXiv 1902.09630) of broadcast `[..., 4]` boxes
  -> `[...]` in `[-1, 1]`, as mmdet's `bbox_overlaps(mode='giou', is_aligned=True)` (union and
  enclosing area clamped to `eps`)."""
  a, b = jnp.asarray(a), jnp.asarray(b)
  _check_last_dim(a, 4, 'elementwise_giou')
  _check_last_dim(b, 4, 'elementwise_giou')
  inter = _overlap_area(a, b)
  union = jnp.maximum(box_area(a) + box_area(b) - inter, eps)
  enclose = jnp.maximum(_overlap_area(a, b, enclosing=True), eps)
  return inter / union - (enclose - union) / enclose


def encode_ltrb(points: jax.Array, boxes: jax.Array) -> jax.Array:
  """FCOS's regression targets: `[P, 2]` points, `[..., P, 4]` boxes -> `[..., P, 4]`
  `(x - x0, y - y0, x1 - x, y1 - y)`, all positive iff the point is inside."""
  points, boxes = jnp.asarray(points), jnp.asarray(boxes)
  _check_last_dim(points, 2, 'encode_ltrb points')
  _check_last_dim(boxes, 4, 'encode_ltrb boxes')
  x, y = points[..., 0], points[..., 1]
  return jnp.stack([x - boxes[..., 0], y - boxes[..., 1], boxes[..., 2] - x, boxes[..., 3] - y],
                   axis=-1)


def decode_ltrb(points: jax.Array, distances: jax.Array) -> jax.Array:
  """Inverse of `encode_ltrb`: `[P, 2]` points and `[..., P, 4]` distances -> `[..., P, 4]` xyxy."""
  points, distances = jnp.asarray(points), jnp.asarray(distances)
  _check_last_dim(points, 2, 'decode_ltrb points')
  _check_last_dim(distances, 4, 'decode_ltrb distances')
  x, y = points[..., 0], points[..., 1]
  return jnp.stack([x - distances[..., 0], y - distances[..., 1], x + distances[..., 2],
                    y + distances[..., 3]], axis=-1)


def clip_boxes(boxes: jax.Array, height_width: jax.Array) -> jax.Array:
  """Clamps `[..., 4]` boxes to `[0, width]` x `[0, height]` (mmdet's `distance2bbox(max_shape=)`);
  `height_width` `[..., 2]` broadcasts against `boxes[..., :2]` (`[2]`, or `[B, 1, 2]`)."""
  boxes, height_width = jnp.asarray(boxes), jnp.asarray(height_width)
  _check_last_dim(boxes, 4, 'clip_boxes boxes')
  _check_last_dim(height_width, 2, 'clip_boxes height_width')
  hw = height_width.astype(boxes.dtype)
  upper = jnp.stack([hw[..., 1], hw[..., 0], hw[..., 1], hw[..., 0]], axis=-1)
  return jnp.clip(boxes, 0, upper)


def centerness_targets(ltrb: jax.Array) -> jax.Array:
  """FCOS centerness `sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))` of `[..., 4]`
  distances -> `[...]`; negative minima clamp to 0 (mmdet's `centerness_target`) and an
  undefined ratio (maximum not positive) gives 0."""
  ltrb = jnp.asarray(ltrb)
  _check_last_dim(ltrb, 4, 'centerness_targets')

  def ratio(near, far):
    lo, hi = jnp.minimum(near, far), jnp.maximum(near, far)
    ok = hi > 0
    return jnp.where(ok, jnp.maximum(lo, 0) / jnp.where(ok, hi, 1), 0)

  return jnp.sqrt(ratio(ltrb[..., 0], ltrb[..., 2]) * ratio(ltrb[..., 1], ltrb[..., 3]))
