"""ATSS target assignment with static shapes (Zhang et al. 2020, arXiv 1912.02424, Alg. 1).

mmdet's `ATSSAssigner` (mmdet/models/task_modules/assigners/atss_assigner.py) line by line, with
per-level `lax.top_k` instead of lists, masks instead of boolean indexing and gt boxes padded to
a fixed `G` with a `gt_valid` mask: jit-able with `level_sizes` and `topk` static. Points are
cell centres `((col + 0.5) * stride, (row + 0.5) * stride)` (mmdet's `MlvlPointGenerator`),
levels fine to coarse, each row-major; assignments are gt indices, -1 for negatives.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from heads.detection.boxes import check_level_sizes, encode_ltrb, pairwise_iou
from heads.features import as_size, is_symbolic

# Anchor side in strides: mmdet's ATSS config uses `octave_base_scale=8, scales_per_octave=1`
# (configs/atss/atss_r50_fpn_1x_coco.py), one square anchor per location.
ANCHOR_SCALE = 8.0
# Number of candidates per level and gt (the paper's k = 9, Sec. 3.2; mmdet `topk=9`).
TOPK = 9
# A positive's point must be farther than this from every side of its gt (mmdet's `> 0.01`).
MIN_INSIDE_DISTANCE = 0.01


def _check_levels(level_shapes: Sequence[tuple[int, int]], strides: Sequence[int]) -> None:
  if len(level_shapes) != len(strides):
    raise ValueError(
        f'{len(level_shapes)} level_shapes {tuple(level_shapes)} for {len(strides)} strides '
        f'{tuple(strides)}; expected one (height, width) per stride.')
  for shape in level_shapes:
    if len(shape) != 2:
      raise ValueError(f'Expected (height, width) level shapes, got {tuple(shape)}.')


def _xp(level_shapes: Sequence[tuple[int, int]]) -> Any:
  """numpy for static level shapes, jax.numpy for symbolic ones (a model exported for any size;
  the same values, exact in float32)."""
  return jnp if is_symbolic(*itertools.chain(*level_shapes)) else np


def anchor_points(level_shapes: Sequence[tuple[int, int]], strides: Sequence[int]) -> jax.Array:
  """`[P, 2]` float32 `(x, y)` cell centres of levels `(H_l, W_l)` with these strides."""
  _check_levels(level_shapes, strides)
  xp, points = _xp(level_shapes), []
  for (h, w), stride in zip(level_shapes, strides, strict=True):
    ys, xs = xp.meshgrid(xp.arange(h), xp.arange(w), indexing='ij')
    points.append(xp.stack([xs.ravel() + 0.5, ys.ravel() + 0.5], axis=-1) * stride)
  return jnp.asarray(xp.concatenate(points, axis=0), jnp.float32)


def point_strides(level_shapes: Sequence[tuple[int, int]], strides: Sequence[int]) -> jax.Array:
  """Stride of every point of `anchor_points(level_shapes, strides)`: `[P]` float32."""
  _check_levels(level_shapes, strides)
  xp = _xp(level_shapes)
  return jnp.asarray(xp.concatenate([
      xp.full((size,), stride, xp.float32)
      for size, stride in zip(level_sizes_of(level_shapes), strides, strict=True)]))


def level_sizes_of(level_shapes: Sequence[tuple[int, int]]) -> tuple[int, ...]:
  """Points per level, `H_l * W_l`, the `level_sizes` that `atss_assign` takes (static, or
  symbolic under `jax.export`)."""
  return tuple(as_size(h) * as_size(w) for h, w in level_shapes)


def level_slices(level_sizes: Sequence[int]) -> list[tuple[int, int]]:
  """`(start, size)` of each level on the point axis."""
  sizes = [as_size(size) for size in level_sizes]
  return list(zip(itertools.accumulate(sizes[:-1], initial=0), sizes, strict=True))


def anchor_boxes(points: jax.Array, strides: jax.Array, scale: float = ANCHOR_SCALE) -> jax.Array:
  """`[P, 4]` xyxy square anchors of side `scale * stride` centred on `[P, 2]` points."""
  points, strides = jnp.asarray(points), jnp.asarray(strides)
  if points.ndim != 2 or points.shape[-1] != 2 or strides.shape != points.shape[:1]:
    raise ValueError(f'anchor_boxes expects points [P, 2] and strides [P], got '
                     f'{tuple(points.shape)} and {tuple(strides.shape)}.')
  half = (0.5 * scale * strides)[:, None]
  return jnp.concatenate([points - half, points + half], axis=-1)


def atss_assign(anchors: jax.Array, points: jax.Array, level_sizes: Sequence[int],
                gt_boxes: jax.Array, gt_valid: jax.Array, topk: int = TOPK) -> jax.Array:
  """`[P]` int32 index of each point's gt box (-1 for negatives), for one image.

  `anchors` `[P, 4]` and `points` `[P, 2]` come from `anchor_boxes` and `anchor_points`,
  `level_sizes` (static) are the points per level; `gt_boxes` `[G, 4]` are padded to a fixed
  `G`, `gt_valid` `[G]` False for padding. Per level and gt the `min(topk, level size)` points
  nearest the gt centre are candidates (ties: lower index); a gt's threshold is `mean + std`
  of its candidates' IoUs (`ddof=1` as `torch.std`; 0 for one candidate); candidates at or
  above it whose point is more than 0.01 px inside the gt are positives. A point positive for
  several gts takes the highest IoU (mmdet and the reference code; ties to the lower index),
  not the smallest area as FCOS. Padded gts never match and change nothing for the others.
  """
  anchors, points = jnp.asarray(anchors), jnp.asarray(points)
  gt_boxes, gt_valid = jnp.asarray(gt_boxes), jnp.asarray(gt_valid)
  level_sizes = tuple(int(n) for n in level_sizes)
  num_points = points.shape[0]
  if points.ndim != 2 or points.shape[-1] != 2 or anchors.shape != (num_points, 4):
    raise ValueError(f'atss_assign expects anchors [P, 4] and points [P, 2], got '
                     f'{tuple(anchors.shape)} and {tuple(points.shape)}.')
  check_level_sizes(level_sizes, num_points)
  if gt_boxes.ndim != 2 or gt_boxes.shape[-1] != 4 or gt_valid.shape != gt_boxes.shape[:1]:
    raise ValueError(f'atss_assign expects gt_boxes [G, 4] and gt_valid [G], got '
                     f'{tuple(gt_boxes.shape)} and {tuple(gt_valid.shape)}.')
  if topk < 1:
    raise ValueError(f'topk must be at least 1, got {topk}.')
  num_gt = gt_boxes.shape[0]
  if num_gt == 0:
    return jnp.full((num_points,), -1, jnp.int32)

  gt_valid = gt_valid.astype(bool)
  ious = pairwise_iou(gt_boxes, anchors)  # [G, P]
  centres = 0.5 * (gt_boxes[:, :2] + gt_boxes[:, 2:])
  # Squared distance ranks the points as mmdet's Euclidean distance does.
  dist2 = jnp.sum(jnp.square(points[None, :, :] - centres[:, None, :]), axis=-1)  # [G, P]

  # [G, C], distinct within a row; lax.top_k puts the lower index first among equal values.
  candidates = jnp.concatenate(
      [jax.lax.top_k(-dist2[:, start:start + size], min(topk, size))[1] + start
       for start, size in level_slices(level_sizes)], axis=1)
  cand_ious = jnp.take_along_axis(ious, candidates, axis=1)
  num_candidates = candidates.shape[1]
  std = jnp.std(cand_ious, axis=1, ddof=1) if num_candidates > 1 else 0.0
  threshold = jnp.mean(cand_ious, axis=1) + std

  ltrb = encode_ltrb(points[candidates], gt_boxes[:, None, :])  # [G, C, 4]
  inside = jnp.min(ltrb, axis=-1) > MIN_INSIDE_DISTANCE
  cand_pos = (cand_ious >= threshold[:, None]) & inside & gt_valid[:, None]

  # Scatter the positives' IoUs into a [G, P] map, -inf elsewhere (candidates are distinct
  # within a row, so `set` has no collisions); every point then takes its highest-IoU gt.
  rows = jnp.broadcast_to(jnp.arange(num_gt)[:, None], candidates.shape)
  pos_ious = jnp.full((num_gt, num_points), -jnp.inf, ious.dtype).at[rows, candidates].set(
      jnp.where(cand_pos, cand_ious, -jnp.inf))
  best = jnp.argmax(pos_ious, axis=0).astype(jnp.int32)  # first gt among equal IoUs
  return jnp.where(jnp.max(pos_ious, axis=0) > -jnp.inf, best, -1)


def assign_targets(anchors: jax.Array, points: jax.Array, level_sizes: Sequence[int],
                   gt_boxes: jax.Array, gt_labels: jax.Array, gt_valid: jax.Array,
                   topk: int = TOPK) -> dict[str, jax.Array]:
  """ATSS targets of a batch (`gt_boxes` `[B, G, 4]`, `gt_labels` and `gt_valid` `[B, G]`)
  for `atss_losses`: `{'cls_targets': [B, P] int32 class (-1 for background), 'box_targets':
  [B, P, 4] xyxy gt (zeros for background), 'positive': [B, P] bool}`."""
  gt_boxes, gt_labels, gt_valid = (jnp.asarray(gt_boxes), jnp.asarray(gt_labels),
                                   jnp.asarray(gt_valid))
  if (gt_boxes.ndim != 3 or gt_boxes.shape[-1] != 4 or gt_labels.shape != gt_boxes.shape[:2]
      or gt_valid.shape != gt_boxes.shape[:2]):
    raise ValueError(
        f'assign_targets expects gt_boxes [B, G, 4], gt_labels [B, G] and gt_valid [B, G], got '
        f'{tuple(gt_boxes.shape)}, {tuple(gt_labels.shape)} and {tuple(gt_valid.shape)}.')
  if gt_boxes.shape[1] == 0:
    # Nothing to gather from: pad one invalid gt so the static gathers below have a source.
    gt_boxes = jnp.zeros((gt_boxes.shape[0], 1, 4), gt_boxes.dtype)
    gt_labels = jnp.zeros((gt_boxes.shape[0], 1), gt_labels.dtype)
    gt_valid = jnp.zeros((gt_boxes.shape[0], 1), bool)

  def one_image(boxes, labels, valid):
    assigned = atss_assign(anchors, points, level_sizes, boxes, valid, topk)
    positive = assigned >= 0
    safe = jnp.maximum(assigned, 0)
    cls_targets = jnp.where(positive, labels[safe].astype(jnp.int32), -1)
    box_targets = jnp.where(positive[:, None], boxes[safe], 0).astype(boxes.dtype)
    return {'cls_targets': cls_targets, 'box_targets': box_targets, 'positive': positive}

  return jax.vmap(one_image)(gt_boxes, gt_labels, gt_valid)
