"""Linear head for probing a frozen backbone, like DINOv2's `BNHead` (Oquab et al. 2023): the
levels upsampled to the finest, concatenated, normalised and classified by one 1x1 conv (in eval
mode BatchNorm is affine, so the head is linear in the features).
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from heads.conv_module import DecodeHead, apply_norm
from heads.resampling import resize_bilinear


class LinearHead(DecodeHead):
  """Norm (BatchNorm, as DINOv2) and 1x1 classifier on the concatenated levels (or one)."""

  @nn.compact
  def __call__(self, features: Mapping[str, jax.Array], *, train: bool = False) -> jax.Array:
    inputs = self.inputs(features)
    size = inputs[0].shape[1:3]
    x = jnp.concatenate([resize_bilinear(x, size) for x in inputs], axis=-1)
    return self.classify(apply_norm(x, train=train, **self.norm_settings), train=train)
