"""CvT segmentation models: Scenic model classes, and their registry.

A model class is built as `Model(config, dataset_meta_data)` and offers
`build_flax_model`, `default_flax_model_config`, `loss_function(logits, batch,
model_params=None)`, `get_metrics_fn(split)` (pmap: sums over Scenic's 'batch' axis),
`get_metrics_fn_jit(split)`, `init_from_train_state` and `flax_model`. When Scenic is
importable the classes subclass Scenic's `SegmentationModel` (so its `get_global_metrics_fn`
and type checks apply); without it they are plain classes with the same protocol.
`register_with_scenic()` adds them to Scenic's model registry.

The flax model is a `heads.Segmentor` over a `CvTBackbone`, called as Scenic's trainers
call models (`apply(variables, x, train=..., debug=..., mutable=['batch_stats'],
rngs=...)`). It returns a dict, `{'logits': [B, H, W, K]}` plus `'aux_logits'` in training
when the model has an auxiliary head; `loss_function` and the metrics functions accept that
dict or a bare logits array. Its `init` loads `config.model.backbone.pretrained`, so any
trainer that initialises the model (Scenic's `classification_trainer` included) starts from
the converted weights.

Configured by:

  config.model_name                  'cvt_upernet', 'cvt_semantic_fpn', 'cvt_segformer', ...
  config.model.backbone              CvTBackbone settings + `pretrained` (converted checkpoint)
  config.model.neck                  FPN settings (models with a neck)
  config.model.decode_head           decode-head settings
  config.model.auxiliary_head        FCN settings (models with an auxiliary head)
  config.loss                        label_smoothing, aux_weight, avg_non_ignore
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

import heads
from cvt_backbone import CvTBackbone, PretrainedBackboneInit, build_backbone, pretrained_settings
from heads.segmentation.loss import cross_entropy_sum
from projects.training import scenic_compat
from projects.training.configs import as_dict, backbone_config

IGNORE_INDEX = 255


def segmentation_loss(logits: jax.Array, labels: jax.Array, batch_mask: jax.Array | None = None,
                      *, label_smoothing: float = 0.0, avg_non_ignore: bool = True,
                      align_corners: bool = False) -> tuple[jax.Array, jax.Array]:
  """Per-pixel cross-entropy that ignores label 255 and padded examples.

  Args:
    logits: `[B, H, W, K]` at the labels' size, or a head's `[B, h, w, K]` at its own: those
      are upsampled bilinearly to the labels' size inside the loss (mmseg's resize before
      the loss), a block of rows at a time (`heads.segmentation.loss`).
    labels: `[B, H, W]` int, 255 = ignore.
    batch_mask: `[B]` (1 real, 0 padding) or `[B, H, W]`; None: all real.
    label_smoothing: mass spread uniformly over the K classes.
    avg_non_ignore: average over the valid pixels (mmseg `avg_non_ignore=True`);
      False divides by every pixel of the real examples, as mmseg's default.
    align_corners: PyTorch's `align_corners` of that resize.

  Returns:
    (mean loss, number of pixels it was averaged over).
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


class SegmentationModel(scenic_compat.segmentation_model_base()):
  """A CvT backbone with a decode head (and optionally a neck and auxiliary head).

  A subclass of Scenic's `SegmentationModel` when Scenic is importable. Subclasses set
  `DECODE_HEAD`, `NECK` and `AUXILIARY_HEAD` (registered head names of the `heads`
  package, or None) and their default settings.
  """

  DECODE_HEAD: str = 'upernet'
  DECODE_HEAD_DEFAULTS: dict[str, Any] = {}
  NECK: str | None = None
  NECK_DEFAULTS: dict[str, Any] = {}
  AUXILIARY_HEAD: str | None = None
  AUXILIARY_HEAD_DEFAULTS: dict[str, Any] = {}

  def __init__(self, config: ml_collections.ConfigDict | None,
               dataset_meta_data: dict[str, Any]):
    if config is None:
      config = ml_collections.ConfigDict({'model': self.default_flax_model_config()})
    self.config = config
    self.dataset_meta_data = dataset_meta_data
    self.flax_model = self.build_flax_model()

  # --- configuration ---------------------------------------------------------

  @classmethod
  def default_model_config(cls) -> ml_collections.ConfigDict:
    """The `config.model` of this model with every default (one place for them)."""
    model = {'decode_head': dict(cls.DECODE_HEAD_DEFAULTS)}
    if cls.NECK:
      model['neck'] = dict(cls.NECK_DEFAULTS)
    if cls.AUXILIARY_HEAD:
      model['auxiliary_head'] = dict(cls.AUXILIARY_HEAD_DEFAULTS)
    config = ml_collections.ConfigDict(model)
    config.backbone = backbone_config()
    return config

  def default_flax_model_config(self) -> ml_collections.ConfigDict:
    return self.default_model_config()

  @property
  def num_classes(self) -> int:
    return int(self.dataset_meta_data['num_classes'])

  def _model_config(self, key: str) -> dict[str, Any]:
    return as_dict(self.config.model.get(key))

  # --- the flax model ---------------------------------------------------------

  def build_backbone(self) -> CvTBackbone:
    return build_backbone(self._model_config('backbone'))

  def build_flax_model(self) -> nn.Module:
    backbone = self.build_backbone()
    features = list(backbone.feature_info)
    neck = None
    if self.NECK:
      neck = heads.build_head(self.NECK, feature_info=features, **self._model_config('neck'))
      features = list(neck.feature_info)
    decode_head = heads.build_head(self.DECODE_HEAD, feature_info=features,
                                   num_classes=self.num_classes,
                                   **self._model_config('decode_head'))
    auxiliary_head = None
    if self.AUXILIARY_HEAD:
      aux = self._model_config('auxiliary_head')
      in_feature = aux.pop('in_feature', 'stage3')
      info = [f for f in backbone.feature_info if f['name'] == in_feature]
      if not info:
        raise ValueError(f'config.model.auxiliary_head.in_feature {in_feature!r} is not a '
                         f'backbone output; outputs: {backbone.out_names}.')
      auxiliary_head = heads.build_head(self.AUXILIARY_HEAD, feature_info=info,
                                        num_classes=self.num_classes, **aux)
    pretrained, keep_cls_token = pretrained_settings(self._model_config('backbone'))
    return PretrainedSegmentor(backbone=backbone, decode_head=decode_head, neck=neck,
                               auxiliary_head=auxiliary_head, pretrained=pretrained,
                               keep_cls_token=keep_cls_token)

  def init_variables(self, rng: jax.Array, input_shape: tuple[int, ...]) -> dict[str, Any]:
    """Fresh variables, with the backbone from `config.model.backbone.pretrained` if set."""
    dummy = jnp.zeros((1, *input_shape[1:]), jnp.float32)
    return dict(self.flax_model.init(rng, dummy, train=False))

  def init_from_train_state(self, train_state: Any, restored_train_state: Any = None,
                            restored_model_cfg: Any = None) -> Any:
    """Scenic project trainers' pretrained hook: the backbone of `train_state` loaded.

    Args:
      train_state: a Scenic `TrainState` (`params`, `model_state`) of this model.
      restored_train_state: a restored Scenic `TrainState` whose params hold a CvT
        backbone: this model's (`params['backbone']`), a `CvTBackbone`'s or a `CvT`
        classifier's. None: load `config.model.backbone.pretrained` instead.
      restored_model_cfg: unused (the architecture is checked from the weights).

    Returns:
      `train_state` with the backbone's params and batch statistics replaced, checked
      strictly (variant and every shape); unchanged when there is nothing to load.

    Raises:
      FileNotFoundError: `pretrained` is set but no such file exists.
      CheckpointMismatchError: weights of another variant or shape.
    """
    del restored_model_cfg
    return self.flax_model.load_into_train_state(train_state, restored_train_state)

  # --- loss and metrics -------------------------------------------------------

  def loss_function(self, logits: Any, batch: dict[str, jax.Array],
                    model_params: Any = None) -> jax.Array:
    """Cross-entropy of the decode head plus `aux_weight` times that of the auxiliary head.

    A training output's `'head_logits'` (and `'aux_head_logits'`), the heads' logits before
    the Segmentor's resize, are used when present: `segmentation_loss` upsamples them block
    by block, the same loss without the full-size logits and their gradient in memory (the
    full-size outputs are then unused, and jit drops them).

    Args:
      logits: the Segmentor's output dict (`'logits'`, optional `'aux_logits'`,
        `'head_logits'`, `'aux_head_logits'`) or a `[B, H, W, K]` array.
      batch: `'label'` `[B, H, W]`, optional `'batch_mask'`.
      model_params: unused (weight decay is decoupled, in the optimizer).
    """
    del model_params
    loss_cfg = self.config.get('loss', ml_collections.ConfigDict())
    outputs = logits if isinstance(logits, dict) else {'logits': logits}
    kwargs = dict(label_smoothing=loss_cfg.get('label_smoothing', 0.0),
                  avg_non_ignore=loss_cfg.get('avg_non_ignore', True),
                  align_corners=getattr(self.flax_model, 'align_corners', False))
    mask = batch.get('batch_mask')
    loss, _ = segmentation_loss(outputs.get('head_logits', outputs['logits']), batch['label'],
                                mask, **kwargs)
    if 'aux_logits' in outputs:
      aux, _ = segmentation_loss(outputs.get('aux_head_logits', outputs['aux_logits']),
                                 batch['label'], mask, **kwargs)
      loss = loss + loss_cfg.get('aux_weight', 0.4) * aux
    return loss

  def get_metrics_fn(self, split: str | None = None):
    """`metrics_fn(logits, batch) -> {name: (sum, normalizer)}` for pmap-based trainers.

    Pixel accuracy and loss over the valid pixels (label not 255, `batch_mask` not 0) of
    the batch, summed over Scenic's `'batch'` axis as Scenic's metrics functions are, so
    every device holds the totals of the global batch. mIoU needs the whole split and is
    computed from a confusion matrix (`evaluate.py`, the project's trainer).
    """
    del split
    return self._metrics_fn(scenic_compat.SCENIC_AXIS_NAME)

  def get_metrics_fn_jit(self, split: str | None = None):
    """As `get_metrics_fn`, for jit-based trainers (global arrays: no cross-device sum)."""
    del split
    return self._metrics_fn(None)

  def _metrics_fn(self, axis_name: str | None):
    def metrics_fn(logits: Any, batch: dict[str, jax.Array]) -> dict[str, tuple]:
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

    return metrics_fn


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
  """Adds the model classes to Scenic's model registry (`model_name='cvt_upernet'`, ...).

  Returns:
    The registered names, or an empty list when Scenic is not importable.
  """
  return scenic_compat.register_models(MODELS)


def default_model_config(name: str) -> ml_collections.ConfigDict:
  """`config.model` defaults of a registered model, for config files."""
  return get_model_cls(name).default_model_config()


def restore_for_inference(config: Any, checkpoint: str, num_classes: int | None = None):
  """`(flax_model, variables)` of a trained segmentation checkpoint (`projects.training`)."""
  from projects.training import checkpoints

  return checkpoints.restore_for_inference(
      config, checkpoint, model_cls=get_model_cls(config.model_name), num_classes=num_classes)
