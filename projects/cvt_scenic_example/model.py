"""A Scenic user's own segmentation model around the CvT backbone: the few lines it takes.

A plain Scenic `SegmentationModel` (its loss and metrics unchanged) whose flax model is
built by `build_backbone`; the `PretrainedBackboneInit` mixin makes `init` load `pretrained`,
so Scenic's `classification_trainer` (which only calls `init`) starts from those weights.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from scenic.model_lib.base_models import segmentation_model

from cvt_backbone import CvTBackbone, PretrainedBackboneInit, build_backbone, pretrained_settings


class CvTLinearSegmenter(PretrainedBackboneInit, nn.Module):
  """CvT stride-4 features -> 1x1 classifier -> bilinear resize to the input size."""

  backbone: CvTBackbone
  num_classes: int
  pretrained: str = ''

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False, debug: bool = False) -> jax.Array:
    """`[B, H, W, 3]` images -> `[B, H, W, num_classes]` logits."""
    del debug
    features = self.backbone(images, train=train)['stage1']
    logits = nn.Conv(self.num_classes, (1, 1), name='classifier')(features.astype(jnp.float32))
    return jax.image.resize(logits, images.shape[:3] + (self.num_classes,), 'bilinear')


class CvTLinearSegmentationModel(segmentation_model.SegmentationModel):
  """Scenic segmentation model: `config.model.backbone` is any CvT backbone config block."""

  def build_flax_model(self) -> nn.Module:
    pretrained, _ = pretrained_settings(self.config.model.backbone)
    return CvTLinearSegmenter(backbone=build_backbone(self.config.model.backbone),
                              num_classes=self.dataset_meta_data['num_classes'],
                              pretrained=pretrained)

  def default_flax_model_config(self) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({'backbone': {'variant': 'cvt-13', 'pretrained': ''}})
