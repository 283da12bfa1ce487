"""SegFormer all-MLP decode head (Xie et al. 2021, arXiv 2105.15203, Sec. 3.2): per-level
linear projections upsampled to the finest level, concatenated coarsest first, fused by a 1x1
conv + norm + ReLU and classified. Names mirror Hugging Face's `SegformerDecodeHead`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cvt_backbone.weights.convert import module_path, torch_to_flax
from heads.conv_module import DecodeHead, apply_norm
from heads.resampling import resize_bilinear


class SegFormerHead(DecodeHead):
  """All-MLP decode head; `norm` follows the fuse conv."""

  channels: int = 256  # decoder width: 256 for SegFormer-B0/B1, 768 for B2-B5

  @nn.compact
  def __call__(self, features: Mapping[str, jax.Array], *, train: bool = False) -> jax.Array:
    inputs = self.inputs(features)
    size = inputs[0].shape[1:3]
    # Project before upsampling: the same result as the other order, far cheaper.
    dense = lambda i, x: nn.Dense(self.channels, dtype=x.dtype, name=f'linear_projections_{i}')(x)
    projected = [resize_bilinear(dense(i, x), size) for i, x in enumerate(inputs)]
    # Coarsest first, as the reference concatenates `all_hidden_states[::-1]`.
    x = jnp.concatenate(projected[::-1], axis=-1)
    x = nn.Conv(self.channels, (1, 1), use_bias=self.norm == 'none', dtype=x.dtype,
                name='linear_fuse')(x)
    return self.classify(nn.relu(apply_norm(x, train=train, **self.norm_settings)), train=train)


def _hf_segformer_path(torch_path: str) -> str:
  # Hugging Face wraps each projection Linear in a `SegformerMLP` holding `proj`.
  return module_path(re.sub(r'^linear_projections\.(\d+)\.proj$', r'linear_projections.\1',
                            torch_path))


def convert_hf_segformer_head(state_dict: Mapping[str, Any],
                              prefix: str = 'decode_head.') -> dict[str, dict[str, Any]]:
  """Hugging Face `SegformerDecodeHead` weights (numpy, keyed as the state dict of
  `SegformerForSemanticSegmentation`; keys outside `prefix` ignored) -> `SegFormerHead`
  variables, for `merge_variables`."""
  sub = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
  return torch_to_flax(sub, _hf_segformer_path)
