"""Linear decode head: a per-pixel linear classifier on the concatenated levels.

For probing a frozen backbone: the levels are upsampled to the finest one (bilinear,
half-pixel), concatenated, normalised and classified by one 1x1 conv, like DINOv2's `BNHead`
(linear segmentation probe, Oquab et al. 2023). In eval mode BatchNorm is affine, so the head
stays linear in the features.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from heads.conv_module import DecodeHead, apply_norm
from heads.resampling import resize_bilinear


class LinearHead(DecodeHead):
  """Linear head: BatchNorm (as DINOv2; any `norm`) and a 1x1 classifier on the levels
  upsampled to the finest and concatenated (one level is fine too)."""

  @nn.compact
  def __call__(self, features: Mapping[str, jax.Array], *, train: bool = False) -> jax.Array:
    inputs = self.inputs(features)
    size = inputs[0].shape[1:3]
    x = jnp.concatenate([resize_bilinear(x, size) for x in inputs], axis=-1)
    return self.classify(apply_norm(x, train=train, **self.norm_settings), train=train)
