"""Feature Pyramid Network neck (Lin et al. 2017, arXiv 1612.03144) and the P3-P7 detection neck.

1x1 laterals, a top-down pass adding each coarser lateral resized to the exact shape of the
finer one (backbone maps are ceil-sized: 62/31/16 for 250 px), a 3x3 conv on each sum, and
mmdet's optional extra levels (max-pool, or stride-2 convs as RetinaNet's P6/P7). Outputs are
named by stride, detectron2 style: `'p2'` is stride 4.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax

from heads.conv_module import NORMS, ConvModule
from heads.features import check_per_level, select_features, stride_level
from heads.resampling import resize_bilinear, resize_nearest

UPSAMPLE_MODES = ('nearest', 'bilinear')
EXTRA_TYPES = ('maxpool', 'conv')
EXTRA_SOURCES = ('output', 'input')
# Pyramid of FCOS, ATSS and RetinaNet: P3-P7, strides 8-128.
PYRAMID_FEATURES = ('p3', 'p4', 'p5', 'p6', 'p7')
PYRAMID_STRIDES = (8, 16, 32, 64, 128)


class FPN(nn.Module):
  """`{level: [N, H_i, W_i, C_i]}` -> `{'p<k>': [N, H_i, W_i, out_channels]}`, fine to coarse.

  Extra levels, each at twice the stride and `ceil(H / 2)` of the one before, are a 1x1
  stride-2 max-pool of the coarsest output (Faster R-CNN's P6) or 3x3 stride-2 convs
  (RetinaNet's P6/P7), the first reading the coarsest output or input (`extra_source`), the
  others the previous level (after a ReLU with `relu_before_extra_convs`, RetinaNet's P7).
  """

  in_features: Sequence[str] = ('stage1', 'stage2', 'stage3')
  in_strides: Sequence[int] = (4, 8, 16)  # name the outputs
  in_channels: Sequence[int] | None = None
  out_channels: int = 256  # the paper's
  norm: str = 'none'  # after lateral and output convs; none in the paper
  axis_name: str | None = None
  num_groups: int = 32
  # 'nearest' as the paper, mmdet and detectron2 (PyTorch's legacy indexing) or 'bilinear'.
  upsample_mode: str = 'nearest'
  num_extra_levels: int = 0
  extra_type: str = 'maxpool'  # or 'conv'
  extra_source: str = 'output'  # or 'input'
  relu_before_extra_convs: bool = False

  @property
  def out_strides(self) -> tuple[int, ...]:
    strides = tuple(int(s) for s in self.in_strides)
    return strides + tuple(strides[-1] * 2 ** (i + 1) for i in range(self.num_extra_levels))

  @property
  def out_features(self) -> tuple[str, ...]:
    return tuple(f'p{stride_level(s)}' for s in self.out_strides)

  @property
  def feature_info(self) -> list[dict[str, Any]]:
    return [{'name': name, 'num_chs': self.out_channels, 'reduction': stride}
            for name, stride in zip(self.out_features, self.out_strides, strict=True)]

  def _check_config(self) -> None:
    owner = type(self).__name__
    check_per_level(owner, 'in_strides', self.in_strides, self.in_features)
    for field, allowed in (('norm', NORMS), ('upsample_mode', UPSAMPLE_MODES),
                           ('extra_type', EXTRA_TYPES), ('extra_source', EXTRA_SOURCES)):
      if getattr(self, field) not in allowed:
        raise ValueError(f'{owner}: unknown {field} {getattr(self, field)!r}; expected one of '
                         f'{allowed}.')
    if self.num_extra_levels and self.extra_type == 'maxpool' and self.extra_source == 'input':
      raise ValueError(
          f"{owner}: extra_type='maxpool' pools the coarsest FPN output; pooling the input "
          f"would give maps with the backbone's channels. Use extra_type='conv' with "
          f"extra_source='input'.")
    self.out_features  # noqa: B018  (validates that the strides are powers of two)

  @nn.compact
  def __call__(self, features: Mapping[str, jax.Array], *,
               train: bool = False) -> dict[str, jax.Array]:
    self._check_config()
    inputs = select_features(features, self.in_features, self.in_channels,
                             owner=type(self).__name__)
    conv = dict(norm=self.norm, axis_name=self.axis_name, num_groups=self.num_groups,
                activation=False)
    laterals = [ConvModule(self.out_channels, 1, name=f'lateral_convs_{i}', **conv)(
        x, train=train) for i, x in enumerate(inputs)]
    for i in range(len(laterals) - 1, 0, -1):
      size = laterals[i - 1].shape[1:3]
      if self.upsample_mode == 'nearest':
        up = resize_nearest(laterals[i], size)
      else:
        up = resize_bilinear(laterals[i], size)
      laterals[i - 1] = laterals[i - 1] + up
    outs = [ConvModule(self.out_channels, 3, name=f'fpn_convs_{i}', **conv)(x, train=train)
            for i, x in enumerate(laterals)]

    for j in range(self.num_extra_levels):
      if self.extra_type == 'maxpool':
        # A 1x1 window at stride 2 is a subsampling: ceil(H / 2) rows, as F.max_pool2d(x, 1, 2).
        outs.append(outs[-1][:, ::2, ::2, :])
        continue
      if j == 0:
        source = inputs[-1] if self.extra_source == 'input' else outs[-1]
      else:
        source = nn.relu(outs[-1]) if self.relu_before_extra_convs else outs[-1]
      outs.append(ConvModule(self.out_channels, 3, stride=2, padding=1,
                             name=f'extra_convs_{j}', **conv)(source, train=train))
    return dict(zip(self.out_features, outs, strict=True))


def detection_fpn(feature_info: Sequence[Mapping[str, Any]], *, out_channels: int = 256,
                  max_stride: int = PYRAMID_STRIDES[-1], **fpn_kwargs: Any) -> FPN:
  """The P3-P7 neck of FCOS/ATSS/RetinaNet: every backbone level from stride 8 up (strides
  doubling), then stride-2 3x3 convs up to `max_stride`. For CvT (strides 4/8/16): stage2 ->
  P3, stage3 -> P4, P5 on the stride-16 map (mmdet's `add_extra_convs='on_input'`, as
  RetinaNet's C5), P6 and P7 on the level before after a ReLU; on strides 8/16/32 it is
  mmdet's FCOS/ATSS neck. `fpn_kwargs` sets other `FPN` fields."""
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
