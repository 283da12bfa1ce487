"""The FCOS/ATSS detection head (Tian et al. 2019, arXiv 1904.01355; Zhang et al. 2020, arXiv
1912.02424): conv-norm-ReLU towers and 3x3 predictors shared by every pyramid level.

Like the segmentation heads it reads a feature dict by level names on any backbone, so it sits
with them; the targets, losses and NMS that read its output are in `heads.detection`. Names
and constants follow mmdet's `FCOSHead` (`norm_on_bbox`, `centerness_on_reg`, the ATSS paper's
point-based setting). Outputs put every point on one axis P, levels fine to coarse, each
row-major over `(h, w)`; `Detector.level_shapes` gives the static `(h_l, w_l)`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from heads.conv_module import apply_norm, check_norm
from heads.features import check_per_level, select_features
from heads.fpn import PYRAMID_FEATURES, PYRAMID_STRIDES

# mmdet FCOSHead/ATSSHead `init_cfg`: every conv of the head ~ Normal(0, 0.01), bias 0
# (`dict(type='Normal', layer='Conv2d', std=0.01)`).
HEAD_INIT_STD = 0.01
# Focal loss prior (RetinaNet, Lin et al. 2017, Sec. 4.1; FCOS and ATSS keep it): the
# classifier bias starts at -log((1 - pi) / pi) so every point scores pi at init.
PRIOR_PROB = 0.01


def prior_bias(prior_prob: float) -> float:
  """The classifier bias `-log((1 - p) / p)` whose sigmoid is `p` (mmcv `bias_init_with_prob`)."""
  if not 0.0 < prior_prob < 1.0:
    raise ValueError(f'prior_prob must be in (0, 1), got {prior_prob}.')
  return -math.log((1.0 - prior_prob) / prior_prob)


class Scale(nn.Module):
  """A learnable scalar (mmcv `Scale`): each level scales the shared regressor (FCOS Sec. 3.2)."""

  init_value: float = 1.0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param('scale', nn.initializers.constant(self.init_value), ())
    return x * scale.astype(x.dtype)


class TowerConv(nn.Module):
  """`ConvModule` (3x3, same parameter names) with the kernel drawn from Normal(0, `init_std`)."""

  features: int
  norm: str = 'group'
  axis_name: str | None = None
  num_groups: int = 32
  init_std: float = HEAD_INIT_STD

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    x = nn.Conv(self.features, (3, 3), padding=((1, 1), (1, 1)), use_bias=self.norm == 'none',
                kernel_init=nn.initializers.normal(self.init_std), dtype=x.dtype, name='conv')(x)
    x = apply_norm(x, self.norm, train=train, axis_name=self.axis_name,
                   num_groups=self.num_groups)
    return nn.relu(x)


class ATSSHead(nn.Module):
  """`{'p3': [N, h, w, C], ...}` -> `{'cls_logits': [N, P, K], 'box_distances': [N, P, 4],
  'centerness': [N, P]}`, float32.

  Box distances `(l, t, r, b)` are `relu(scale_l * raw) * stride_l`, in input pixels in both
  modes (mmdet divides the targets by the stride in training instead, the same for the
  scale-invariant GIoU loss). Classification is sigmoid, without a background logit.

  """

  num_classes: int
  in_features: Sequence[str] = PYRAMID_FEATURES
  strides: Sequence[int] = PYRAMID_STRIDES
  channels: int = 256  # mmdet `feat_channels`
  num_convs: int = 4  # per tower, mmdet `stacked_convs`
  norm: str = 'group'  # GroupNorm(32) as FCOS/ATSS
  num_groups: int = 32
  axis_name: str | None = None
  prior_prob: float = PRIOR_PROB
  init_std: float = HEAD_INIT_STD

  @nn.compact
  def __call__(self, features: Mapping[str, jax.Array], *,
               train: bool = False) -> dict[str, jax.Array]:
    owner = type(self).__name__
    check_norm(self.norm, owner)
    if isinstance(self.in_features, str):
      raise ValueError(f'{owner}.in_features must be a sequence of names, got '
                       f'{self.in_features!r}.')
    check_per_level(owner, 'strides', self.strides, self.in_features)
    if self.num_classes < 1:
      raise ValueError(f'{owner}.num_classes must be >= 1, got {self.num_classes}.')
    if self.num_convs < 0:
      raise ValueError(f'{owner}.num_convs must be >= 0, got {self.num_convs}.')
    prior_bias(self.prior_prob)
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
                                  kernel_init=nn.initializers.normal(self.init_std),
                                  dtype=levels[0].dtype)
    conv_cls = predictor(self.num_classes, name='conv_cls',
                         bias_init=nn.initializers.constant(prior_bias(self.prior_prob)))
    conv_reg = predictor(4, name='conv_reg')
    conv_centerness = predictor(1, name='conv_centerness')
    scales = [Scale(name=f'scales_{i}') for i in range(len(levels))]

    cls_logits, box_distances, centerness = [], [], []
    for x, stride, scale in zip(levels, self.strides, scales, strict=True):
      cls_feat, reg_feat = (functools.reduce(lambda y, conv: conv(y, train=train), convs, x)
                            for convs in (cls_convs, reg_convs))
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
  """`[N, h_l, w_l, C]` per level -> `[N, P, C]`, levels fine to coarse, each row-major."""
  if not per_level:
    raise ValueError('flatten_levels needs at least one level, got none.')
  flat = []
  for i, x in enumerate(per_level):
    if getattr(x, 'ndim', None) != 4:
      raise ValueError(f'flatten_levels: level {i} must be [N, h, w, C], got shape '
                       f'{getattr(x, "shape", None)}.')
    flat.append(x.reshape(x.shape[0], x.shape[1] * x.shape[2], x.shape[3]))
  return jnp.concatenate(flat, axis=1)


def split_levels(flat: jax.Array, level_shapes: Sequence[tuple[int, int]]) -> list[jax.Array]:
  """Inverse of `flatten_levels`: `[N, P, ...]` -> `[N, h_l, w_l, ...]` per `(h_l, w_l)`."""
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
