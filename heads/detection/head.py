"""Dense one-stage detection: the FCOS/ATSS head, its pyramid neck, and `Detector`.

FCOS (Tian et al. 2019, arXiv 1904.01355) and ATSS (Zhang et al. 2020, arXiv 1912.02424)
share one head: on every pyramid level, a classification tower and a regression tower
(`num_convs` x conv3x3-GroupNorm-ReLU, weights shared across levels) followed by a 3x3
classifier (K logits per point), a 3x3 box regressor (distances from the point to the left,
top, right and bottom box sides) and a 3x3 centerness logit on the regression tower. Constants
and parameter names follow mmdetection's `mmdet/models/dense_heads/fcos_head.py` (FCOS with
`norm_on_bbox=True` and `centerness_on_reg=True`, the ATSS paper's point-based setting): towers
`cls_convs_{i}`/`reg_convs_{i}`, predictors `conv_cls`/`conv_reg`/`conv_centerness`, one
learnable scalar `scales_{l}` per level.

Output convention (`ATSSHead.__call__`, and therefore `Detector.__call__`): a dict of arrays
with every pyramid point on one axis P, levels concatenated fine to coarse (the order of
`in_features`) and each level row-major over `(h, w)`:
  - `'cls_logits'`: `[N, P, K]` sigmoid logits (focal loss; no background class);
  - `'box_distances'`: `[N, P, 4]` `(left, top, right, bottom)` distances in input pixels,
    `>= 0`;
  - `'centerness'`: `[N, P]` centerness logits.
`P = sum_l h_l * w_l`. The per-level `(h_l, w_l)` are static (they depend only on the input
size), so they are not returned by `apply`: `Detector.level_shapes(H, W)` computes them once
per input size with `jax.eval_shape` (no FLOPs, cached); `heads.detection.atss.anchor_points` turns them
into point coordinates in the same order, and `split_levels` undoes the flattening.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from heads.conv_module import apply_norm, check_norm
from heads.features import select_features, stride_level
from heads.fpn import FPN

# mmdet FCOSHead/ATSSHead `init_cfg`: every conv of the head ~ Normal(0, 0.01), bias 0
# (`dict(type='Normal', layer='Conv2d', std=0.01)`).
HEAD_INIT_STD = 0.01
# Focal loss prior (RetinaNet, Lin et al. 2017, Sec. 4.1; FCOS and ATSS keep it): the
# classifier bias starts at -log((1 - pi) / pi) so every point scores pi at init.
PRIOR_PROB = 0.01
# Pyramid of FCOS, ATSS and RetinaNet: P3-P7, strides 8-128.
PYRAMID_FEATURES = ('p3', 'p4', 'p5', 'p6', 'p7')
PYRAMID_STRIDES = (8, 16, 32, 64, 128)


def prior_bias(prior_prob: float) -> float:
  """The classifier bias `-log((1 - p) / p)` whose sigmoid is `p` (mmcv `bias_init_with_prob`)."""
  if not 0.0 < prior_prob < 1.0:
    raise ValueError(f'prior_prob must be in (0, 1), got {prior_prob}.')
  return -math.log((1.0 - prior_prob) / prior_prob)


class Scale(nn.Module):
  """A learnable scalar multiplier (mmcv `Scale`), one per pyramid level in FCOS/ATSS.

  The regression predictor is shared by all levels; the per-level scale lets each level pick
  its own output range (FCOS Sec. 3.2 replaces `exp(x)` with `exp(s_i x)`).

  Attributes:
    init_value: initial value of the `scale` parameter (shape `()`).
  """

  init_value: float = 1.0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param('scale', nn.initializers.constant(self.init_value), ())
    return x * scale


class TowerConv(nn.Module):
  """conv3x3 (no bias before a norm) -> norm -> ReLU, initialised as mmdet's dense heads.

  `ConvModule` with the conv kernel drawn from Normal(0, `init_std`) instead of Flax's LeCun
  default; parameter names are the same (`conv`, `group_norm`/`batch_norm`/`layer_norm`).

  Attributes:
    features: output channels.
    norm: 'group' (FCOS/ATSS), 'batch', 'layer' or 'none' (a conv bias is used only then).
    axis_name: mapped axis for cross-device BatchNorm statistics.
    num_groups: GroupNorm groups (reduced to a divisor of `features` when needed).
    init_std: standard deviation of the conv kernel init.
  """

  features: int
  norm: str = 'group'
  axis_name: str | None = None
  num_groups: int = 32
  init_std: float = HEAD_INIT_STD

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """Maps `[N, H, W, C_in]` to `[N, H, W, features]`."""
    x = nn.Conv(self.features, (3, 3), padding=((1, 1), (1, 1)), use_bias=self.norm == 'none',
                kernel_init=nn.initializers.normal(self.init_std), name='conv')(x)
    x = apply_norm(x, self.norm, train=train, axis_name=self.axis_name,
                   num_groups=self.num_groups)
    return nn.relu(x)


class ATSSHead(nn.Module):
  """The FCOS/ATSS head: `{'p3': [N, h, w, C], ...}` -> flattened per-point predictions.

  One set of towers and predictors is built and applied to every level (shared weights, as
  in FCOS/ATSS/RetinaNet); only the `Scale` of the box distances is per level, so the number
  of parameters grows by one scalar per level.

  Box distances are `relu(scale_l * raw) * stride_l` (mmdet FCOSHead with `norm_on_bbox`:
  the regressor predicts distances in units of the level's stride; mmdet clamps at 0 and
  multiplies by the stride at test time and divides the targets by it at train time, which
  for the scale-invariant GIoU loss is the same). Here the stride is applied in both modes,
  so the output is always in input pixels.

  Attributes:
    num_classes: K, foreground classes (sigmoid classification, no background logit).
    in_features: pyramid level names, fine to coarse.
    strides: stride of each level in input pixels.
    channels: tower width (mmdet `feat_channels`).
    num_convs: convs per tower (mmdet `stacked_convs`).
    norm: tower norm: 'group' (GroupNorm(32), FCOS/ATSS), 'batch', 'layer' or 'none'.
    num_groups: GroupNorm groups.
    axis_name: mapped axis for cross-device BatchNorm statistics.
    prior_prob: initial foreground probability of every point (classifier bias).
    init_std: standard deviation of every conv kernel init.
  """

  num_classes: int
  in_features: Sequence[str] = PYRAMID_FEATURES
  strides: Sequence[int] = PYRAMID_STRIDES
  channels: int = 256
  num_convs: int = 4
  norm: str = 'group'
  num_groups: int = 32
  axis_name: str | None = None
  prior_prob: float = PRIOR_PROB
  init_std: float = HEAD_INIT_STD

  def _check_config(self) -> None:
    owner = type(self).__name__
    check_norm(self.norm, owner)
    if isinstance(self.in_features, str):
      raise ValueError(f'{owner}.in_features must be a sequence of names, got '
                       f'{self.in_features!r}.')
    if len(self.strides) != len(self.in_features):
      raise ValueError(
          f'{owner}: {len(self.strides)} strides {tuple(self.strides)} for '
          f'{len(self.in_features)} in_features {tuple(self.in_features)}.')
    if self.num_classes < 1:
      raise ValueError(f'{owner}.num_classes must be >= 1, got {self.num_classes}.')
    if self.num_convs < 0:
      raise ValueError(f'{owner}.num_convs must be >= 0, got {self.num_convs}.')
    prior_bias(self.prior_prob)

  @nn.compact
  def __call__(
      self, features: Mapping[str, jax.Array], *, train: bool = False
  ) -> dict[str, jax.Array]:
    """Predicts classes, boxes and centerness at every point of every level.

    Args:
      features: `{name: [N, h_l, w_l, C]}` containing every level of `in_features` (all
        with the same C, since the towers are shared).
      train: training mode (batch statistics when `norm='batch'`).

    Returns:
      `{'cls_logits': [N, P, K], 'box_distances': [N, P, 4], 'centerness': [N, P]}`, float32,
      with `P = sum_l h_l * w_l`, levels fine to coarse, each row-major over `(h_l, w_l)`.
    """
    self._check_config()
    owner = type(self).__name__
    levels = select_features(features, self.in_features, None, owner=owner)
    widths = {name: x.shape[-1] for name, x in zip(self.in_features, levels, strict=True)}
    if len(set(widths.values())) != 1:
      raise ValueError(
          f'{owner} shares its towers across levels, so every level needs the same channels; '
          f'got {widths}.')

    tower = dict(norm=self.norm, axis_name=self.axis_name, num_groups=self.num_groups,
                 init_std=self.init_std)
    # Built once and called on every level: Flax shares the parameters of a sub-module
    # across calls, as the single nn.ModuleList in mmdet is shared across levels.
    cls_convs = [TowerConv(self.channels, name=f'cls_convs_{i}', **tower)
                 for i in range(self.num_convs)]
    reg_convs = [TowerConv(self.channels, name=f'reg_convs_{i}', **tower)
                 for i in range(self.num_convs)]
    predictor = functools.partial(nn.Conv, kernel_size=(3, 3), padding=((1, 1), (1, 1)),
                                  kernel_init=nn.initializers.normal(self.init_std))
    conv_cls = predictor(self.num_classes, name='conv_cls',
                         bias_init=nn.initializers.constant(prior_bias(self.prior_prob)))
    conv_reg = predictor(4, name='conv_reg')
    conv_centerness = predictor(1, name='conv_centerness')
    scales = [Scale(name=f'scales_{i}') for i in range(len(levels))]

    cls_logits, box_distances, centerness = [], [], []
    for x, stride, scale in zip(levels, self.strides, scales, strict=True):
      cls_feat = reg_feat = x
      for conv in cls_convs:
        cls_feat = conv(cls_feat, train=train)
      for conv in reg_convs:
        reg_feat = conv(reg_feat, train=train)
      cls_logits.append(conv_cls(cls_feat))
      box_distances.append(nn.relu(scale(conv_reg(reg_feat))) * float(stride))
      # FCOS `centerness_on_reg=True`: the centerness branch reads the regression tower.
      centerness.append(conv_centerness(reg_feat))
    return {
        'cls_logits': flatten_levels(cls_logits).astype(jnp.float32),
        'box_distances': flatten_levels(box_distances).astype(jnp.float32),
        'centerness': flatten_levels(centerness)[..., 0].astype(jnp.float32),
    }


def flatten_levels(per_level: Sequence[jax.Array]) -> jax.Array:
  """Concatenates per-level maps into one point axis, fine to coarse, each level row-major.

  Args:
    per_level: `[N, h_l, w_l, C]` per level (same N and C).

  Returns:
    `[N, P, C]` with `P = sum_l h_l * w_l`.
  """
  if not per_level:
    raise ValueError('flatten_levels needs at least one level, got none.')
  flat = []
  for i, x in enumerate(per_level):
    if getattr(x, 'ndim', None) != 4:
      raise ValueError(f'flatten_levels: level {i} must be [N, h, w, C], got shape '
                       f'{getattr(x, "shape", None)}.')
    flat.append(x.reshape(x.shape[0], x.shape[1] * x.shape[2], x.shape[3]))
  return jnp.concatenate(flat, axis=1)


def split_levels(
    flat: jax.Array, level_shapes: Sequence[tuple[int, int]]
) -> list[jax.Array]:
  """Inverse of `flatten_levels`: `[N, P, ...]` -> `[N, h_l, w_l, ...]` per level.

  Args:
    flat: `[N, P, ...]`, points on axis 1 in `flatten_levels` order.
    level_shapes: `(h_l, w_l)` per level, fine to coarse (`Detector.level_shapes`).

  Returns:
    One `[N, h_l, w_l, ...]` array per level.
  """
  sizes = [int(h) * int(w) for h, w in level_shapes]
  if flat.ndim < 2 or flat.shape[1] != sum(sizes):
    raise ValueError(
        f'split_levels: level shapes {tuple(map(tuple, level_shapes))} hold {sum(sizes)} '
        f'points, but the array has shape {tuple(flat.shape)} (points on axis 1).')
  out, start = [], 0
  for (h, w), size in zip(level_shapes, sizes, strict=True):
    out.append(flat[:, start:start + size].reshape(flat.shape[0], h, w, *flat.shape[2:]))
    start += size
  return out


def detection_fpn(
    feature_info: Sequence[Mapping[str, Any]],
    *,
    out_channels: int = 256,
    max_stride: int = PYRAMID_STRIDES[-1],
    **fpn_kwargs: Any,
) -> FPN:
  """The P3-P7 neck of FCOS/ATSS/RetinaNet for a backbone described by `feature_info`.

  Uses every backbone level from stride 8 up (fine to coarse, each twice the stride of the
  one before) as an FPN input and adds stride-2 3x3 convs until `max_stride`. For CvT (strides
  4/8/16) that is `stage2` -> P3, `stage3` -> P4, then three extra convs: P5 reads the
  stride-16 backbone map (`extra_source='input'`, mmdet's `add_extra_convs='on_input'`, as
  RetinaNet reads C5), P6 and P7 read the previous extra level after a ReLU
  (`relu_before_extra_convs`, FCOS/ATSS). On a ResNet-like backbone (strides 8/16/32) the same
  call gives mmdet's FCOS/ATSS neck: C3-C5 -> P3-P5, P6 on C5, P7 on P6.

  Args:
    feature_info: the backbone's timm-style `[{'name', 'num_chs', 'reduction'}, ...]`.
    out_channels: width of every output level.
    max_stride: stride of the coarsest output (128: P7).
    **fpn_kwargs: other `FPN` fields (e.g. `norm`, `upsample_mode`).

  Returns:
    An `FPN` returning `{'p3': [N, h_3, w_3, out_channels], ..., 'p7': ...}`.
  """
  levels = sorted((info for info in feature_info if int(info['reduction']) >= 8),
                  key=lambda info: int(info['reduction']))
  strides = [int(info['reduction']) for info in levels]
  found = [(info['name'], int(info['reduction'])) for info in feature_info]
  if not strides or strides[0] != 8:
    raise ValueError(f'detection_fpn needs a stride-8 backbone level (P3); the backbone has '
                     f'(name, stride) {found}.')
  if any(b != 2 * a for a, b in itertools.pairwise(strides)):
    raise ValueError(f'detection_fpn needs backbone levels whose strides double from 8 '
                     f'(8, 16, ...); the backbone has (name, stride) {found}.')
  if max_stride < strides[-1] or not math.log2(max_stride).is_integer():
    raise ValueError(f'detection_fpn: max_stride must be a power of two >= the coarsest '
                     f'backbone stride {strides[-1]}, got {max_stride}.')
  num_extra = stride_level(max_stride) - stride_level(strides[-1])
  kwargs = dict(extra_type='conv', extra_source='input', relu_before_extra_convs=True)
  kwargs.update(fpn_kwargs)
  return FPN(
      in_features=tuple(info['name'] for info in levels), in_strides=tuple(strides),
      in_channels=tuple(int(info['num_chs']) for info in levels), out_channels=out_channels,
      num_extra_levels=num_extra, **kwargs)


class Detector(nn.Module):
  """A one-stage dense detector: backbone + neck + head, mmdet's `SingleStageDetector`.

  Data flow: `backbone(images, train=...)` -> `{name: [N, H_i, W_i, C_i]}`; the neck (if
  any) adds pyramid levels to the same dict (e.g. `detection_fpn` adds `'p3'...'p7'`); the
  head picks its `in_features` from it and returns flattened per-point predictions (see the
  module docstring). Attribute names are the top-level keys of the variables.

  Call convention: Scenic's, `apply(variables, images, train=..., debug=...,
  mutable=['batch_stats'], rngs={'dropout': key})`. The returned dict has the same keys and
  shapes in both modes.

  Attributes:
    backbone: a module called as `backbone(images, train=...)` returning NHWC maps.
    head: the dense head (`ATSSHead`), called as `head(features, train=...)`.
    neck: optional module `neck(features, train=...)` returning more named maps.
  """

  backbone: nn.Module
  head: nn.Module
  neck: nn.Module | None = None

  def __call__(self, images: jax.Array, *, train: bool = False,
               debug: bool = False) -> dict[str, jax.Array]:
    """Detects in a batch of images.

    Args:
      images: `[N, H, W, C]` float images.
      train: training mode: batch statistics (pass `mutable=['batch_stats']`), dropout and
        drop path (pass `rngs={'dropout': key}`).
      debug: accepted for Scenic's trainers, which call every model with it; unused.

    Returns:
      The head's dict: `'cls_logits'` `[N, P, K]`, `'box_distances'` `[N, P, 4]` (ltrb,
      input pixels), `'centerness'` `[N, P]`; `P` points in `level_shapes(H, W)` order.
    """
    del debug
    return self.decode(self.backbone(_check_images(images), train=train), train=train)

  def decode(
      self, features: Mapping[str, jax.Array], *, train: bool = False
  ) -> dict[str, jax.Array]:
    """Neck and head on backbone features computed elsewhere (e.g. of a frozen backbone)."""
    return self.head(self.pyramid_from_features(features, train=train), train=train)

  def pyramid_from_features(
      self, features: Mapping[str, jax.Array], *, train: bool = False
  ) -> dict[str, jax.Array]:
    """Backbone maps merged with the neck's levels (neck names win on a clash)."""
    features = dict(features)
    if self.neck is not None:
      features.update(self.neck(features, train=train))
    return features

  def pyramid(self, images: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
    """The head's input levels `{name: [N, h_l, w_l, C]}` for `images`, fine to coarse."""
    features = self.pyramid_from_features(
        self.backbone(_check_images(images), train=train), train=train)
    levels = select_features(features, self.head.in_features, None, owner=type(self).__name__)
    return dict(zip(self.head.in_features, levels, strict=True))

  def level_shapes(self, height: int, width: int,
                   channels: int = 3) -> tuple[tuple[int, int], ...]:
    """Static `(h_l, w_l)` of every head level for an `height` x `width` input.

    Traced with `jax.eval_shape` (no FLOPs, no parameters) and cached per input size, so it
    can be called from data pipelines and inside jitted losses. Call it on the unbound module
    (`model.level_shapes(H, W)`).

    Args:
      height: input height H.
      width: input width W.
      channels: input channels.

    Returns:
      `((h_3, w_3), (h_4, w_4), ...)` in the order of the head's `in_features`.
    """
    module = self.clone(parent=None) if self.scope is not None else self
    try:
      hash(module)
    except TypeError:  # A field holds a list or dict: fine, just not cacheable.
      return _level_shapes(module, int(height), int(width), int(channels))
    return _cached_level_shapes(module, int(height), int(width), int(channels))


def _level_shapes(model: Detector, height: int, width: int,
                  channels: int) -> tuple[tuple[int, int], ...]:
  images = jax.ShapeDtypeStruct((1, height, width, channels), jnp.float32)
  init = functools.partial(model.init_with_output, method=Detector.pyramid, train=False)
  levels, _ = jax.eval_shape(init, jax.random.key(0), images)
  return tuple((int(levels[name].shape[1]), int(levels[name].shape[2]))
               for name in model.head.in_features)


_cached_level_shapes = functools.lru_cache(maxsize=64)(_level_shapes)


def _check_images(images: jax.Array) -> jax.Array:
  if getattr(images, 'ndim', None) != 4:
    raise ValueError(
        f'Detector expects [N, H, W, C] images, got shape {getattr(images, "shape", None)}.')
  if images.shape[1] in (1, 3, 4) and images.shape[-1] not in (1, 3, 4):
    raise ValueError(
        f'Detector expects channels-last [N, H, W, C] images; shape {tuple(images.shape)} '
        f'looks channels-first ([N, C, H, W]). Transpose with x.transpose(0, 2, 3, 1).')
  return images
