"""CvT segmentation models: Scenic model classes and their registry.

The flax model is a `heads.Segmentor` over a `CvTBackbone`, returning `{'logits': [B, H, W,
K]}` (plus `'aux_logits'` in training with an auxiliary head). With Scenic importable the
classes subclass its `SegmentationModel`; `register_with_scenic()` adds them to its registry.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

import heads
from cvt_backbone import PretrainedBackboneInit
from heads.segmentation.loss import cross_entropy_sum
from projects.training import scenic_compat
from projects.training.configs import backbone_config
from projects.training.model import CvTModel

IGNORE_INDEX = 255
# mmseg's UPerNet configs: auxiliary FCN loss weight 0.4.
LOSS_DEFAULTS = dict(label_smoothing=0.0, aux_weight=0.4, avg_non_ignore=True)


def segmentation_loss(logits: jax.Array, labels: jax.Array, batch_mask: jax.Array | None = None,
                      *, label_smoothing: float = 0.0, avg_non_ignore: bool = True,
                      align_corners: bool = False) -> tuple[jax.Array, jax.Array]:
  """Per-pixel cross-entropy ignoring label 255 and padded examples: `(mean, pixel count)`.

  Args:
    logits: `[B, H, W, K]`, or a head's `[B, h, w, K]`: upsampled to the labels' size inside
      the loss, a block of rows at a time (mmseg's resize before the loss).
    labels: `[B, H, W]` int, 255 = ignore.
    batch_mask: `[B]` or `[B, H, W]` (1 real, 0 padding); None: all real.
    avg_non_ignore: average over the valid pixels (mmseg `avg_non_ignore=True`); False:
      over every pixel of the real examples (mmseg's default).
  """
  valid = labels != IGNORE_INDEX
  weights = valid.astype(jnp.float32)
  real = jnp.ones_like(weights)
  if batch_mask is not None:
    mask = batch_mask.astype(jnp.float32)
    mask = mask.reshape(mask.shape + (1,) * (weights.ndim - mask.ndim))
    weights, real = weights * mask, real * mask
  total = cross_entropy_sum(logits, jnp.where(valid, labels, 0), weights,
                            label_smoothing=label_smoothing, align_corners=align_corners)
  denominator = weights.sum() if avg_non_ignore else real.sum()
  denominator = jnp.maximum(denominator, 1.0)
  return total / denominator, denominator


class PretrainedSegmentor(PretrainedBackboneInit, heads.Segmentor):
  """`heads.Segmentor` whose `init` loads `pretrained` into the backbone (if set)."""

  pretrained: str = ''
  keep_cls_token: bool = True


class SegmentationModel(CvTModel, scenic_compat.segmentation_model_base()):
  """A CvT backbone with a decode head (and optionally a neck and auxiliary head).

  Subclasses name registered heads of the `heads` package (`DECODE_HEAD`, `NECK`,
  `AUXILIARY_HEAD`, or None) and their default settings.
  """

  DECODE_HEAD: str = 'upernet'
  DECODE_HEAD_DEFAULTS: dict[str, Any] = {}
  NECK: str | None = None
  NECK_DEFAULTS: dict[str, Any] = {}
  AUXILIARY_HEAD: str | None = None
  AUXILIARY_HEAD_DEFAULTS: dict[str, Any] = {}

  @classmethod
  def default_model_config(cls) -> ml_collections.ConfigDict:
    model = {'decode_head': dict(cls.DECODE_HEAD_DEFAULTS)}
    if cls.NECK:
      model['neck'] = dict(cls.NECK_DEFAULTS)
    if cls.AUXILIARY_HEAD:
      model['auxiliary_head'] = dict(cls.AUXILIARY_HEAD_DEFAULTS)
    config = ml_collections.ConfigDict(model)
    config.backbone = backbone_config()
    return config

  def build_flax_model(self) -> nn.Module:
    backbone = self.build_backbone()
    features = list(backbone.feature_info)
    neck = None
    if self.NECK:
      neck = heads.build_head(self.NECK, feature_info=features, **self.model_config('neck'))
      features = list(neck.feature_info)
    decode_head = heads.build_head(self.DECODE_HEAD, feature_info=features,
                                   num_classes=self.num_classes,
                                   **self.model_config('decode_head'))
    auxiliary_head = None
    if self.AUXILIARY_HEAD:
      aux = self.model_config('auxiliary_head')
      in_feature = aux.pop('in_feature', 'stage3')
      info = [f for f in backbone.feature_info if f['name'] == in_feature]
      if not info:
        raise ValueError(f'config.model.auxiliary_head.in_feature {in_feature!r} is not a '
                         f'backbone output; outputs: {backbone.out_names}.')
      auxiliary_head = heads.build_head(self.AUXILIARY_HEAD, feature_info=info,
                                        num_classes=self.num_classes, **aux)
    return PretrainedSegmentor(backbone=backbone, decode_head=decode_head, neck=neck,
                               auxiliary_head=auxiliary_head, **self.pretrained_fields())

  def loss_function(self, logits: Any, batch: dict[str, jax.Array],
                    model_params: Any = None) -> jax.Array:
    """Cross-entropy of the decode head plus `aux_weight` times that of the auxiliary head.

    Uses a training output's `'head_logits'` (`'aux_head_logits'`), the heads' logits before
    the Segmentor's resize, when present: `segmentation_loss` upsamples them block by block,
    so the full-size logits and their gradient are never in memory (jit drops them).

    Args:
      logits: the Segmentor's output dict or a `[B, H, W, K]` array.
      batch: `'label'` `[B, H, W]`, optional `'batch_mask'`.
      model_params: unused (weight decay is decoupled, in the optimizer).
    """
    del model_params
    loss_cfg = self.settings('loss', LOSS_DEFAULTS)
    outputs = logits if isinstance(logits, dict) else {'logits': logits}
    kwargs = dict(label_smoothing=loss_cfg['label_smoothing'],
                  avg_non_ignore=loss_cfg['avg_non_ignore'],
                  align_corners=getattr(self.flax_model, 'align_corners', False))
    mask = batch.get('batch_mask')
    loss, _ = segmentation_loss(outputs.get('head_logits', outputs['logits']), batch['label'],
                                mask, **kwargs)
    if 'aux_logits' in outputs:
      aux, _ = segmentation_loss(outputs.get('aux_head_logits', outputs['aux_logits']),
                                 batch['label'], mask, **kwargs)
      loss = loss + loss_cfg['aux_weight'] * aux
    return loss

  def metrics(self, logits: Any, batch: dict[str, jax.Array], *,
              axis_name: str | None) -> dict[str, tuple]:
    """Pixel accuracy and loss over the valid pixels (mIoU needs the whole split)."""
    logits = logits['logits'] if isinstance(logits, dict) else logits
    labels = batch['label']
    loss, count = segmentation_loss(logits, labels, batch.get('batch_mask'))
    valid = labels != IGNORE_INDEX
    if batch.get('batch_mask') is not None:
      mask = batch['batch_mask'].astype(bool)
      valid = valid & mask.reshape(mask.shape + (1,) * (valid.ndim - mask.ndim))
    correct = ((jnp.argmax(logits, -1) == labels) & valid).sum()
    return scenic_compat.psum_metrics(
        {'accuracy': (correct, valid.sum()), 'loss': (loss * count, count)}, axis_name)


class CvTUperNet(SegmentationModel):
  """CvT + UPerNet (PPM + FPN fuse, 512 channels) + FCN auxiliary head on stage 3."""

  DECODE_HEAD = 'upernet'
  DECODE_HEAD_DEFAULTS = dict(channels=512, dropout_rate=0.1, norm='batch')
  AUXILIARY_HEAD = 'fcn'
  AUXILIARY_HEAD_DEFAULTS = dict(in_feature='stage3', channels=256, dropout_rate=0.1,
                                 norm='batch')


class CvTSemanticFPN(SegmentationModel):
  """CvT + FPN neck (256 channels) + Semantic FPN head (128 channels, GroupNorm)."""

  NECK = 'fpn'
  NECK_DEFAULTS = dict(out_channels=256)
  DECODE_HEAD = 'semantic_fpn'
  DECODE_HEAD_DEFAULTS = dict(channels=128, dropout_rate=0.1, norm='group')


class CvTSegFormer(SegmentationModel):
  """CvT + SegFormer all-MLP head (256 channels)."""

  DECODE_HEAD = 'segformer'
  DECODE_HEAD_DEFAULTS = dict(channels=256, dropout_rate=0.1, norm='batch')


class CvTFPNLinear(SegmentationModel):
  """CvT + FPN neck + a linear classifier on the fused levels: the lightest head."""

  NECK = 'fpn'
  NECK_DEFAULTS = dict(out_channels=128)
  DECODE_HEAD = 'linear'
  DECODE_HEAD_DEFAULTS = dict(dropout_rate=0.1, norm='batch')


MODELS: dict[str, type[SegmentationModel]] = {
    'cvt_upernet': CvTUperNet,
    'cvt_semantic_fpn': CvTSemanticFPN,
    'cvt_segformer': CvTSegFormer,
    'cvt_fpn_linear': CvTFPNLinear,
}


def get_model_cls(name: str) -> type[SegmentationModel]:
  if name not in MODELS:
    raise ValueError(f'Unknown model {name!r}; expected one of {sorted(MODELS)}.')
  return MODELS[name]


def register_with_scenic() -> list[str]:
  """Adds the models to Scenic's registry; returns their names ([] without Scenic)."""
  return scenic_compat.register_models(MODELS)


def restore_for_inference(config: Any, checkpoint: str, num_classes: int | None = None):
  """`(flax_model, variables)` of a trained segmentation checkpoint (`projects.training`)."""
  from projects.training import checkpoints

  return checkpoints.restore_for_inference(
      config, checkpoint, model_cls=get_model_cls(config.model_name), num_classes=num_classes)
