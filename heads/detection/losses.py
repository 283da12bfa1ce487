"""Losses of the FCOS/ATSS family: sigmoid focal, GIoU and centerness BCE, in jnp.

`atss_losses` follows mmdet's `ATSSHead.loss_by_feat` with FCOS distance regression. Normalisers
are sums over the whole array, so under `jax.jit` with a sharded batch they are global (mmdet's
`reduce_mean` times the GPU count). Losses come back unweighted; mmdet's ATSS config weights
GIoU by 2.0 and the others by 1.0 (configs/atss/atss_r50_fpn_1x_coco.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from heads.detection.boxes import (
    centerness_targets,
    check_shapes,
    decode_ltrb,
    elementwise_giou,
    encode_ltrb,
)

# RetinaNet's focal loss settings (Lin et al. 2017, arXiv 1708.02002, Sec. 5.1), used by FCOS and
# ATSS (mmdet `FocalLoss(gamma=2.0, alpha=0.25)`).
FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0


def sigmoid_focal_loss(logits: jax.Array, targets: jax.Array, alpha: float = FOCAL_ALPHA,
                       gamma: float = FOCAL_GAMMA) -> jax.Array:
  """Elementwise `-alpha_t (1 - p_t)**gamma log(p_t)` of binary or soft `targets`, as optax's."""
  logits = jnp.asarray(logits)
  targets = jnp.asarray(targets, logits.dtype)
  log_p, log_q = jax.nn.log_sigmoid(logits), jax.nn.log_sigmoid(-logits)
  # log(1 - p_t) in log space, so (1 - p_t)**gamma stays finite for gamma < 2 at large logits.
  log_one_minus_p_t = jax.scipy.special.logsumexp(
      jnp.stack([log_p, log_q], axis=-1), axis=-1,
      b=jnp.stack([1 - targets, targets], axis=-1))
  loss = _binary_cross_entropy(log_p, log_q, targets) * jnp.exp(gamma * log_one_minus_p_t)
  return (alpha * targets + (1.0 - alpha) * (1.0 - targets)) * loss


def _binary_cross_entropy(log_p: jax.Array, log_q: jax.Array, targets: jax.Array) -> jax.Array:
  return -targets * log_p - (1.0 - targets) * log_q


def giou_loss(pred_boxes: jax.Array, target_boxes: jax.Array) -> jax.Array:
  """`1 - GIoU` of aligned `[..., 4]` xyxy boxes -> `[...]` (mmdet `GIoULoss`, unreduced)."""
  return 1.0 - elementwise_giou(pred_boxes, target_boxes)


def centerness_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Binary cross-entropy with logits of centerness predictions, `[...]` -> `[...]`."""
  logits = jnp.asarray(logits)
  return _binary_cross_entropy(jax.nn.log_sigmoid(logits), jax.nn.log_sigmoid(-logits),
                               jnp.asarray(targets, logits.dtype))


def atss_losses(cls_logits: jax.Array, box_distances: jax.Array, centerness_logits: jax.Array,
                points: jax.Array, cls_targets: jax.Array, box_targets: jax.Array,
                positive: jax.Array, num_classes: int,
                image_mask: jax.Array | None = None) -> dict[str, jax.Array]:
  """ATSS losses of dense predictions (`[B, P, K]` class logits, `[B, P, 4]` `(l, t, r, b)`
  pixel distances, `[B, P]` centerness logits at `[P, 2]` points) against `assign_targets`
  targets; `image_mask` `[B]` is 0 for padded batch entries, which contribute nothing.

  Returns float32 scalars: `loss_cls` (focal over all points and classes / max(num_pos, 1)),
  `loss_box` (GIoU loss of positives weighted by their centerness targets / max(sum of the
  weights, 1), mmdet's `bbox_avg_factor`), `loss_centerness` (BCE of positives / max(num_pos,
  1)) and `num_pos`.
  """
  cls_logits, box_distances, centerness_logits, points, box_targets = (
      jnp.asarray(x, jnp.float32)
      for x in (cls_logits, box_distances, centerness_logits, points, box_targets))
  if cls_logits.ndim != 3 or cls_logits.shape[-1] != num_classes:
    raise ValueError(f'atss_losses expects cls_logits [B, P, {num_classes}], got '
                     f'{tuple(cls_logits.shape)}.')
  batch, num_points = cls_logits.shape[:2]
  expected = {
      'box_distances': (box_distances, (batch, num_points, 4)),
      'centerness_logits': (centerness_logits, (batch, num_points)),
      'points': (points, (num_points, 2)), 'cls_targets': (cls_targets, (batch, num_points)),
      'box_targets': (box_targets, (batch, num_points, 4)),
      'positive': (positive, (batch, num_points))}
  if image_mask is not None:
    expected['image_mask'] = (image_mask, (batch,))
  check_shapes('atss_losses', cls_logits, expected)

  positive = jnp.asarray(positive, bool)
  image_weight = (jnp.ones((batch,), jnp.float32) if image_mask is None
                  else jnp.asarray(image_mask, jnp.float32))
  positive = positive & (image_weight[:, None] > 0)
  num_pos = jnp.sum(positive.astype(jnp.float32))
  normaliser = jnp.maximum(num_pos, 1.0)

  labels = jnp.where(positive, jnp.asarray(cls_targets, jnp.int32), -1)
  one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)  # -1 gives all zeros.
  focal = sigmoid_focal_loss(cls_logits, one_hot)
  loss_cls = jnp.sum(focal * image_weight[:, None, None]) / normaliser

  pred_boxes = decode_ltrb(points, box_distances)
  ctr_targets = jnp.where(positive, centerness_targets(encode_ltrb(points, box_targets)), 0.0)
  # `where`, not a product, keeps background entries (zero boxes) out of values and gradients.
  box_loss = jnp.where(positive, giou_loss(pred_boxes, box_targets), 0.0)
  loss_box = jnp.sum(ctr_targets * box_loss) / jnp.maximum(jnp.sum(ctr_targets), 1.0)

  ctr_loss = jnp.where(positive, centerness_loss(centerness_logits, ctr_targets), 0.0)
  loss_centerness = jnp.sum(ctr_loss) / normaliser
  return {'loss_cls': loss_cls, 'loss_box': loss_box, 'loss_centerness': loss_centerness,
          'num_pos': num_pos}
