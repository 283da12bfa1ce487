"""Linear decode head: a per-pixel linear classifier on the concatenated levels.

For probing a frozen backbone: the levels are upsampled to the finest one (bilinear,
half-pixel), concatenated, normalised and classified by one 1x1 conv, like DINOv2's `BNHead`
(linear segmentation probe, Oquab et al. 2023). In eval mode BatchNorm is affine, so the head
stays linear in the features.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from heads.conv_module import apply_norm, check_norm, classify
from heads.features import select_features
from heads.resampling import resize_bilinear


class LinearHead(nn.Module):
  """Linear head: `{level: [N, H_i, W_i, C_i]}` -> `[N, H_0, W_0, K]`.

  Attributes:
    num_classes: K.
    in_features: level names, fine to coarse (one level is fine too).
    in_channels: declared channels per level; None to accept any.
    norm: norm of the concatenated features: 'batch' (as DINOv2), 'group', 'layer', 'none'.
    axis_name: mapped axis for cross-device BatchNorm statistics.
    num_groups: GroupNorm groups.
    dropout_rate: channel dropout before the classifier, train mode only.
  """

  num_classes: int
  in_features: Sequence[str] = ('stage1', 'stage2', 'stage3')
  in_channels: Sequence[int] | None = None
  norm: str = 'batch'
  axis_name: str | None = None
  num_groups: int = 32
  dropout_rate: float = 0.1

  @nn.compact
  def __call__(self, features: Mapping[str, jax.Array], *, train: bool = False) -> jax.Array:
    """Classifies every pixel of the finest level.

    Args:
      features: `{name: [N, H_i, W_i, C_i]}` containing every level of `in_features`.
      train: training mode (batch statistics, dropout with the 'dropout' rng).

    Returns:
      `[N, H_0, W_0, num_classes]` logits at the finest level's resolution.
    """
    owner = type(self).__name__
    check_norm(self.norm, owner)
    inputs = select_features(features, self.in_features, self.in_channels, owner=owner)
    size = inputs[0].shape[1:3]
    x = jnp.concatenate([resize_bilinear(x, size) for x in inputs], axis=-1)
    x = apply_norm(x, self.norm, train=train, axis_name=self.axis_name,
                   num_groups=self.num_groups)
    return classify(x, num_classes=self.num_classes, dropout_rate=self.dropout_rate,
                    train=train)
