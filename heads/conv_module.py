"""What every head shares: conv + norm + ReLU (`ConvModule`), the norms, and `DecodeHead`.

As mmcv's `ConvModule` and Hugging Face's `UperNetConvModule`, the conv has no bias before a
norm and the norm is named after its kind (`batch_norm`, `group_norm`, `layer_norm`), so
converted PyTorch weights land on the same names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax

from heads import dense_conv
from heads.features import select_features

NORMS = ('batch', 'group', 'layer', 'none')

# PyTorch's defaults (BatchNorm2d momentum 0.1 is Flax momentum 0.9; eps 1e-5 for all three):
# converted weights and running statistics only reproduce PyTorch logits with these.
BATCH_NORM_MOMENTUM = 0.9
NORM_EPSILON = 1e-5


def check_norm(norm: str, owner: str) -> None:
  if norm not in NORMS:
    raise ValueError(f'{owner}: unknown norm {norm!r}; expected one of {NORMS}.')


def group_count(channels: int, num_groups: int) -> int:
  """The largest divisor of `channels` up to `num_groups`: 32 groups do not divide the narrow
  widths of test and tiny variants (e.g. 48 or 20 channels)."""
  for groups in range(min(num_groups, channels), 0, -1):
    if channels % groups == 0:
      return groups
  return 1


def apply_norm(x: jax.Array, norm: str, *, train: bool, axis_name: str | None = None,
               num_groups: int = 32) -> jax.Array:
  """The norm named by `norm` over the channels of `[N, H, W, C]` (a sub-module of the calling
  compact method), output in `x`'s dtype (statistics in float32); 'batch' uses batch statistics
  in train mode, averaged over `axis_name`."""
  if norm == 'batch':
    return nn.BatchNorm(
        use_running_average=not train, momentum=BATCH_NORM_MOMENTUM, epsilon=NORM_EPSILON,
        axis_name=axis_name, dtype=x.dtype, name='batch_norm')(x)
  if norm == 'group':
    return nn.GroupNorm(
        num_groups=group_count(x.shape[-1], num_groups), epsilon=NORM_EPSILON,
        dtype=x.dtype, name='group_norm')(x)
  if norm == 'layer':
    return nn.LayerNorm(epsilon=NORM_EPSILON, dtype=x.dtype, name='layer_norm')(x)
  if norm == 'none':
    return x
  raise ValueError(f'Unknown norm {norm!r}; expected one of {NORMS}.')


class ConvModule(nn.Module):
  """Conv2d (`dense_conv`) with symmetric zero padding, then an optional norm and ReLU.

  `padding` None is `dilation * (kernel_size // 2)` (explicit, never 'SAME', so strided
  outputs match PyTorch); `use_bias` None means "only without a norm".
  """

  features: int
  kernel_size: int = 1
  stride: int = 1
  padding: int | None = None
  dilation: int = 1
  norm: str = 'batch'
  axis_name: str | None = None
  num_groups: int = 32
  activation: bool = True
  use_bias: bool | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    check_norm(self.norm, type(self).__name__)
    pad = self.dilation * (self.kernel_size // 2) if self.padding is None else self.padding
    use_bias = self.norm == 'none' if self.use_bias is None else self.use_bias
    x = dense_conv.Conv(
        self.features, self.kernel_size, stride=self.stride, padding=pad,
        dilation=self.dilation, use_bias=use_bias, name='conv')(x)
    x = apply_norm(x, self.norm, train=train, axis_name=self.axis_name,
                   num_groups=self.num_groups)
    return nn.relu(x) if self.activation else x


class DecodeHead(nn.Module):
  """Settings and steps of every decode head: `head(features, train=...)` maps
  `{level: [N, H_i, W_i, C_i]}` to `[N, H_0, W_0, num_classes]` logits at the finest level's
  resolution; `in_features` are ordered fine to coarse, `in_channels` None accepts any, and
  `dropout_rate` drops channels before the classifier in train mode ('dropout' rng).
  """

  num_classes: int
  in_features: Sequence[str] = ('stage1', 'stage2', 'stage3')
  in_channels: Sequence[int] | None = None
  norm: str = 'batch'
  axis_name: str | None = None
  num_groups: int = 32
  dropout_rate: float = 0.1

  @property
  def norm_settings(self) -> dict[str, Any]:
    return dict(norm=self.norm, axis_name=self.axis_name, num_groups=self.num_groups)

  def inputs(self, features: Mapping[str, jax.Array]) -> list[jax.Array]:
    """Checks the settings and picks the maps of `in_features` (`select_features`)."""
    owner = type(self).__name__
    check_norm(self.norm, owner)
    return select_features(features, self.in_features, self.in_channels, owner=owner)

  def classify(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Channel dropout (`Dropout2d`, as mmseg's `BaseDecodeHead`), then the 1x1 `classifier`."""
    if self.dropout_rate > 0:
      x = nn.Dropout(self.dropout_rate, broadcast_dims=(1, 2), deterministic=not train)(x)
    return dense_conv.Conv(self.num_classes, 1, name='classifier')(x)
