"""Non-maximum suppression and FCOS/ATSS post-processing with static shapes, for `jax.jit`.

Greedy NMS runs as a `lax.fori_loop` of `max_outputs` steps, each taking the best remaining
score and suppressing with one `[N]` IoU row: `O(N)` memory, no host round trip, and exactly
greedy NMS truncated to `max_outputs` (its first picks do not depend on later ones). Ties go
to the lower index; outputs are indices padded with -1, valid ones first by decreasing score.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp

from heads.detection.atss import level_slices
from heads.detection.boxes import (
  check_level_sizes,
  check_shapes,
  clip_boxes,
  decode_ltrb,
  pairwise_iou,
)
from heads.features import as_size, is_symbolic

# `postprocess`'s top k: `lax.top_k`, or a stable sort inside `sorted_top_k`.
_TOP_K = contextvars.ContextVar('nms_top_k', default=jax.lax.top_k)


def _sort_top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """`lax.top_k` as a stable descending sort: the same values and indices (the lower index
  first among equal values), about 100x slower on CPU."""
  indices = jnp.argsort(-x, axis=-1, stable=True)[..., :k]
  return jnp.take_along_axis(x, indices, axis=-1), indices


@contextlib.contextmanager
def sorted_top_k() -> Iterator[None]:
  """`postprocess` traced inside ranks candidates by a sort instead of `lax.top_k`, which
  TensorFlow 2.21 cannot run when jax 0.10 writes it into a SavedModel."""
  token = _TOP_K.set(_sort_top_k)
  try:
    yield
  finally:
    _TOP_K.reset(token)

# Test-time settings of mmdet's ATSS config (configs/atss/atss_r50_fpn_1x_coco.py `test_cfg`):
# nms_pre=1000, score_thr=0.05, nms iou_threshold=0.6, max_per_img=100.
PRE_NMS_TOPK = 1000
SCORE_THRESHOLD = 0.05
IOU_THRESHOLD = 0.6
MAX_DETECTIONS = 100


def nms(boxes: jax.Array, scores: jax.Array, iou_threshold: float, max_outputs: int,
        score_threshold: float = -float('inf'),
        classes: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Greedy NMS of `[N, 4]` xyxy boxes (torchvision's and mmcv's `nms`): `[max_outputs]` int32
  indices padded with -1 and their `valid` mask. Only `scores > score_threshold` can be kept;
  a box goes when its IoU with a kept one is above `iou_threshold`.

  With `[N]` `classes`, only within a class: `batched_nms`'s result, which offsets each class's
  boxes by `class * (max coordinate + 1)`, without the float32 rounding of 1e5 px offsets.
  """
  boxes, scores = jnp.asarray(boxes), jnp.asarray(scores)
  if boxes.ndim != 2 or boxes.shape[-1] != 4 or scores.shape != boxes.shape[:1]:
    raise ValueError(f'nms expects boxes [N, 4] and scores [N], got {tuple(boxes.shape)} and '
                     f'{tuple(scores.shape)}.')
  if classes is not None:
    classes = jnp.asarray(classes)
    if classes.shape != scores.shape:
      raise ValueError(f'nms expects classes [N] like scores {tuple(scores.shape)}, got '
                       f'{tuple(classes.shape)}.')
  if int(max_outputs) < 1:
    raise ValueError(f'max_outputs must be at least 1, got {max_outputs}.')
  max_outputs = int(max_outputs)
  if boxes.shape[0] == 0:
    return jnp.full((max_outputs,), -1, jnp.int32), jnp.zeros((max_outputs,), bool)

  # Entries at or below the score threshold (and NaN scores) are never selectable.
  remaining = jnp.where(scores > score_threshold, scores, -jnp.inf)

  # The step selects with masks rather than `x[best]` and `.at[i].set`: the same values, and
  # ONNX converters (jax2onnx) get gathers and scatters inside a vmapped loop wrong.
  def step(i, state):
    remaining, indices = state
    best = jnp.argmax(remaining)  # first index among equal scores
    found = remaining.max() > -jnp.inf
    is_best = jnp.arange(remaining.shape[0]) == best
    best_box = jnp.where(is_best[:, None], boxes, 0.0).sum(0)  # exact: one non-zero row
    overlaps = pairwise_iou(best_box[None], boxes)[0] > iou_threshold
    if classes is not None:
      overlaps &= classes == jnp.where(is_best, classes, 0).sum()
    suppress = found & (overlaps | is_best)
    remaining = jnp.where(suppress, -jnp.inf, remaining)
    best_or_none = jnp.where(found, best, -1).astype(jnp.int32)
    indices = jnp.where(jnp.arange(max_outputs) == i, best_or_none, indices)
    return remaining, indices

  init = (remaining, jnp.full((max_outputs,), -1, jnp.int32))
  _, indices = jax.lax.fori_loop(0, max_outputs, step, init)
  return indices, indices >= 0


def postprocess(cls_logits: jax.Array, box_distances: jax.Array, centerness_logits: jax.Array,
                points: jax.Array, level_sizes: Sequence[int], image_sizes: jax.Array,
                scale_factors: jax.Array, pre_nms_topk: int = PRE_NMS_TOPK,
                score_threshold: float = SCORE_THRESHOLD, iou_threshold: float = IOU_THRESHOLD,
                max_detections: int = MAX_DETECTIONS) -> dict[str, jax.Array]:
  """Detections from dense FCOS/ATSS outputs, as mmdet's `_predict_by_feat_single` + NMS.

  Per image and level the `pre_nms_topk` best (point, class) pairs by `sigmoid(cls_logits)`
  above `score_threshold`, scored times `sigmoid(centerness)`, decoded and clipped to the image
  (`image_sizes` `[B, 2]`, `(height, width)` before padding); then boxes mapped to the original
  image (`scale_factors` `[B, 2]`, resized / original `(height, width)`; before NMS, as mmdet's
  `_bbox_post_process`), class-aware NMS and the `max_detections` best. `box_distances` are in
  input pixels; `level_sizes` (static) are the points per level.

  Returns:
    `{'boxes': [B, D, 4] xyxy original-image pixels, 'scores': [B, D], 'classes': [B, D]
    int32, 'valid': [B, D]}`, `D = max_detections`, valid first by decreasing score; invalid
    entries have zero boxes and scores and class -1.
  """
  cls_logits, box_distances, centerness_logits, points, image_sizes, scale_factors = (
      jnp.asarray(x, jnp.float32) for x in (cls_logits, box_distances, centerness_logits,
                                            points, image_sizes, scale_factors))
  level_sizes = tuple(as_size(n) for n in level_sizes)
  if cls_logits.ndim != 3:
    raise ValueError(f'postprocess expects cls_logits [B, P, K], got {tuple(cls_logits.shape)}.')
  batch, num_points, num_classes = cls_logits.shape
  check_shapes('postprocess', cls_logits, {
      'box_distances': (box_distances, (batch, num_points, 4)),
      'centerness_logits': (centerness_logits, (batch, num_points)),
      'points': (points, (num_points, 2)), 'image_sizes': (image_sizes, (batch, 2)),
      'scale_factors': (scale_factors, (batch, 2))})
  check_level_sizes(level_sizes, num_points)
  if pre_nms_topk < 1 or max_detections < 1:
    raise ValueError(f'pre_nms_topk and max_detections must be at least 1, got {pre_nms_topk} '
                     f'and {max_detections}.')

  def one_image(logits, distances, ctr_logits, size, scale):
    point_idx, classes, probs = [], [], []
    for start, n in level_slices(level_sizes):
      # lax.slice: jnp indexing at a symbolic start is a gather, which jax2onnx cannot convert.
      level = jax.nn.sigmoid(jax.lax.slice_in_dim(logits, start, start + n)).reshape(-1)
      # Sigmoid is in [0, 1], so -1 ranks below every kept candidate.
      level = jnp.where(level > score_threshold, level, -1.0)
      if is_symbolic(n):
        # top_k needs a static k: pad to at least pre_nms_topk candidates at every size. The
        # padding ranks last and is never kept, so the detections are the static path's.
        level = jnp.concatenate([level, jnp.full((pre_nms_topk,), -1.0, level.dtype)])
        vals, flat = _TOP_K.get()(level, pre_nms_topk)
      else:
        vals, flat = _TOP_K.get()(level, min(pre_nms_topk, n * num_classes))
      point_idx.append(jnp.minimum(flat // num_classes, n - 1) + start)
      classes.append(flat % num_classes)
      probs.append(vals)
    point_idx, classes, probs = (jnp.concatenate(x) for x in (point_idx, classes, probs))
    scores = probs * jax.nn.sigmoid(ctr_logits[point_idx])
    scores = jnp.where(probs > score_threshold, scores, -jnp.inf)
    boxes = clip_boxes(decode_ltrb(points[point_idx], distances[point_idx]), size)
    boxes = boxes / jnp.concatenate([scale[::-1], scale[::-1]])  # (h, w) -> (x, y, x, y)
    keep, valid = nms(boxes, scores, iou_threshold, max_detections, classes=classes)
    safe = jnp.maximum(keep, 0)
    return {'boxes': jnp.where(valid[:, None], boxes[safe], 0.0),
            'scores': jnp.where(valid, scores[safe], 0.0),
            'classes': jnp.where(valid, classes[safe], -1).astype(jnp.int32),
            'valid': valid}

  return jax.vmap(one_image)(cls_logits, box_distances, centerness_logits, image_sizes,
                             scale_factors)
