"""CvT detection models: Scenic model classes, their losses and detections, and the registry.

The flax model is a `heads.Detector` (CvT backbone, P3-P7 FPN, ATSS head) returning
per-point predictions (`'cls_logits'` `[B, P, K]`, `'box_distances'` `[B, P, 4]`,
`'centerness'` `[B, P]`); `loss_function` assigns targets with ATSS and returns mmdet's ATSS
loss, `detect` turns predictions into `max_detections` boxes per image under jit.

Batches (`data.builder`): `'inputs'` `[B, H, W, 3]`, `'boxes'` `[B, M, 4]` xyxy in input
pixels, `'labels'` `[B, M]` (-1 padding), `'box_mask'` `[B, M]`, `'batch_mask'` `[B]`; for
detection also `'image_size'` `[B, 2]` and `'scale_factor'` `[B, 2]`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from cvt_backbone import PretrainedBackboneInit
from heads import ATSSHead, Detector, detection_fpn
from heads.atss_head import PRIOR_PROB
from heads.detection import atss, nms
from heads.detection import losses as detection_losses
from projects.training import scenic_compat
from projects.training.configs import backbone_config
from projects.training.model import CvTModel

# mmdet configs/atss/atss_r50_fpn_1x_coco.py: loss_cls FocalLoss(gamma=2, alpha=0.25,
# loss_weight=1), loss_bbox GIoULoss(loss_weight=2), loss_centerness CE(loss_weight=1).
LOSS_DEFAULTS = dict(cls_weight=1.0, box_weight=2.0, centerness_weight=1.0)
# Its test_cfg: nms_pre=1000, score_thr=0.05, nms iou 0.6, max_per_img=100.
DETECT_DEFAULTS = dict(pre_nms_topk=nms.PRE_NMS_TOPK, score_threshold=nms.SCORE_THRESHOLD,
                       iou_threshold=nms.IOU_THRESHOLD, max_detections=nms.MAX_DETECTIONS)


class PretrainedDetector(PretrainedBackboneInit, Detector):
  """`heads.Detector` whose `init` loads `pretrained` (a converted CvT) into the backbone."""

  pretrained: str = ''
  keep_cls_token: bool = True


class DetectionModel(CvTModel, scenic_compat.base_model_class()):
  """A CvT backbone with a P3-P7 FPN and an ATSS head (FCOS-style, point-based)."""

  @classmethod
  def default_model_config(cls) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict({
        # mmdet's FCOS/ATSS neck: 256 channels, no norm (heads.fpn.detection_fpn).
        'neck': dict(out_channels=256, norm='none'),
        'head': dict(channels=256, num_convs=4, norm='group', prior_prob=PRIOR_PROB),
    })
    config.backbone = backbone_config()
    return config

  def build_flax_model(self) -> nn.Module:
    backbone = self.build_backbone()
    neck = detection_fpn(backbone.feature_info, **self.model_config('neck'))
    head = ATSSHead(num_classes=self.num_classes, **self.model_config('head'))
    return PretrainedDetector(backbone=backbone, neck=neck, head=head, **self.pretrained_fields())

  def points(self, height: int, width: int) -> tuple[jax.Array, jax.Array, tuple[int, ...]]:
    """`(points [P, 2] (x, y), strides [P], points per level)` for an `H x W` input."""
    shapes = self.flax_model.level_shapes(height, width)
    strides = self.flax_model.head.strides
    return (atss.anchor_points(shapes, strides), atss.point_strides(shapes, strides),
            atss.level_sizes_of(shapes))

  def loss_and_metrics(self, outputs: dict[str, jax.Array],
                       batch: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """mmdet's ATSS loss of a batch and its parts (`loss_cls`, `loss_box`, ..., `num_pos`).

    Targets are assigned per image by ATSS (`heads.detection.atss`) from the padded boxes; padded
    boxes and padded batch entries (`batch_mask` 0) never match.
    """
    weights = self.settings('loss', LOSS_DEFAULTS)
    points, strides, level_sizes = self.points(*batch['inputs'].shape[1:3])
    image_mask = batch.get('batch_mask')
    valid = batch['box_mask'].astype(bool)
    if image_mask is not None:
      valid = valid & (image_mask[:, None] > 0)
    targets = atss.assign_targets(atss.anchor_boxes(points, strides), points, level_sizes,
                                  batch['boxes'], jnp.maximum(batch['labels'], 0), valid)
    parts = detection_losses.atss_losses(
        outputs['cls_logits'], outputs['box_distances'], outputs['centerness'], points,
        targets['cls_targets'], targets['box_targets'], targets['positive'],
        self.num_classes, image_mask=image_mask)
    loss = (weights['cls_weight'] * parts['loss_cls'] + weights['box_weight'] * parts['loss_box']
            + weights['centerness_weight'] * parts['loss_centerness'])
    return loss, parts

  def loss_function(self, outputs: dict[str, jax.Array], batch: dict[str, jax.Array],
                    model_params: Any = None) -> jax.Array:
    """The ATSS loss (Scenic's signature; weight decay is decoupled, in the optimizer)."""
    del model_params
    return self.loss_and_metrics(outputs, batch)[0]

  def metrics(self, outputs: dict[str, jax.Array], batch: dict[str, jax.Array], *,
              axis_name: str | None) -> dict[str, tuple]:
    """The loss and its parts per image, and positives per image (COCO AP needs the split)."""
    loss, parts = self.loss_and_metrics(outputs, batch)
    images = jnp.sum(batch.get('batch_mask', jnp.ones(batch['inputs'].shape[:1])))
    metrics = {'loss': (loss * images, images), 'num_pos': (parts['num_pos'], images)}
    metrics.update({k: (v * images, images) for k, v in parts.items() if k != 'num_pos'})
    return scenic_compat.psum_metrics(metrics, axis_name)

  def detect(self, outputs: dict[str, jax.Array], image_hw: tuple[int, int],
             image_size: jax.Array, scale_factor: jax.Array) -> dict[str, jax.Array]:
    """Boxes in original-image pixels from the model's outputs, under jit (`heads.detection.nms`).

    Args:
      outputs: the flax model's dict for inputs of size `image_hw`.
      image_hw: the (padded) input `(H, W)`.
      image_size: `[B, 2]` resized image `(h, w)` before padding (boxes are clipped to it).
      scale_factor: `[B, 2]` resized / original `(h, w)`.

    Returns:
      `{'boxes' [B, D, 4], 'scores' [B, D], 'classes' [B, D], 'valid' [B, D]}`, D =
      `config.eval.max_detections`.
    """
    settings = self.settings('eval', DETECT_DEFAULTS)
    points, _, level_sizes = self.points(*image_hw)
    return nms.postprocess(outputs['cls_logits'], outputs['box_distances'],
                           outputs['centerness'], points, level_sizes, image_size,
                           scale_factor, **settings)

  def predict_fn(self):
    """`predict(variables, images, image_size, scale_factor) -> detections`, jitted."""

    def predict(variables, images, image_size, scale_factor):
      outputs = self.flax_model.apply(variables, images, train=False)
      return self.detect(outputs, images.shape[1:3], image_size, scale_factor)

    return jax.jit(predict)


class CvTATSS(DetectionModel):
  """CvT + P3-P7 FPN + ATSS head (Zhang et al. 2020), mmdet's `atss_r50_fpn_1x` recipe."""


MODELS: dict[str, type[DetectionModel]] = {'cvt_atss': CvTATSS}


def get_model_cls(name: str) -> type[DetectionModel]:
  if name not in MODELS:
    raise ValueError(f'Unknown detection model {name!r}; known: {sorted(MODELS)}.')
  return MODELS[name]


def register_with_scenic() -> list[str]:
  """Adds the models to Scenic's `ALL_MODELS` (no-op without Scenic)."""
  return scenic_compat.register_models(MODELS, group='ALL_MODELS')


def restore_for_inference(config: Any, checkpoint: str, num_classes: int | None = None):
  """`(flax_model, variables)` of a trained detection checkpoint (`projects.training`)."""
  from projects.training import checkpoints

  return checkpoints.restore_for_inference(
      config, checkpoint, model_cls=get_model_cls(config.model_name), num_classes=num_classes)
