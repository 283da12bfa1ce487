"""SegFormer all-MLP decode head (Xie et al. 2021, arXiv 2105.15203, Sec. 3.2).

Each level is projected to `channels` by a per-pixel linear layer, upsampled to the finest
level's size, the levels are concatenated (coarsest first), fused by a 1x1 conv + norm + ReLU
and classified. Reference: Hugging Face `SegformerDecodeHead`
(transformers/models/segformer/modeling_segformer.py); sub-module names mirror it, see
`convert_hf_segformer_head`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cvt_backbone.weights.convert import module_path, torch_to_flax
from heads.conv_module import apply_norm, check_norm, classify
from heads.features import select_features
from heads.resampling import resize_bilinear


class SegFormerHead(nn.Module):
  """All-MLP decode head: `{level: [N, H_i, W_i, C_i]}` -> `[N, H_0, W_0, K]`.

  Attributes:
    num_classes: K.
    in_features: level names, fine to coarse.
    in_channels: declared channels per level; None to accept any.
    channels: the decoder width (256 for SegFormer-B0/B1, 768 for B2-B5).
    norm: norm after the fuse conv: 'batch' (reference), 'group', 'layer' or 'none'.
    axis_name: mapped axis for cross-device BatchNorm statistics.
    num_groups: GroupNorm groups.
    dropout_rate: channel dropout before the classifier, train mode only.
  """

  num_classes: int
  in_features: Sequence[str] = ('stage1', 'stage2', 'stage3')
  in_channels: Sequence[int] | None = None
  channels: int = 256
  norm: str = 'batch'
  axis_name: str | None = None
  num_groups: int = 32
  dropout_rate: float = 0.1

  @nn.compact
  def __call__(self, features: Mapping[str, jax.Array], *, train: bool = False) -> jax.Array:
    """Decodes the levels.

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
    # Project before upsampling: the same result as the other order, far cheaper.
    projected = [resize_bilinear(nn.Dense(self.channels, name=f'linear_projections_{i}')(x), size)
                 for i, x in enumerate(inputs)]
    # Coarsest first, as the reference concatenates `all_hidden_states[::-1]`.
    x = jnp.concatenate(projected[::-1], axis=-1)
    x = nn.Conv(self.channels, (1, 1), use_bias=self.norm == 'none', name='linear_fuse')(x)
    x = nn.relu(apply_norm(x, self.norm, train=train, axis_name=self.axis_name,
                           num_groups=self.num_groups))
    return classify(x, num_classes=self.num_classes, dropout_rate=self.dropout_rate,
                    train=train)


def _hf_segformer_path(torch_path: str) -> str:
  # Hugging Face wraps each projection Linear in a `SegformerMLP` holding `proj`.
  return module_path(re.sub(r'^linear_projections\.(\d+)\.proj$', r'linear_projections.\1',
                            torch_path))


def convert_hf_segformer_head(
    state_dict: Mapping[str, Any], prefix: str = 'decode_head.'
) -> dict[str, dict[str, Any]]:
  """Hugging Face `SegformerDecodeHead` weights -> `SegFormerHead` variables.

  Args:
    state_dict: numpy arrays keyed like `SegformerForSemanticSegmentation.state_dict()`;
      keys outside `prefix` are ignored.
    prefix: where the head sits ('decode_head.'; '' for a bare `SegformerDecodeHead`).

  Returns:
    `{'params': ..., 'batch_stats': ...}` for `SegFormerHead`; check it against an initialised
    model with `cvt_backbone.weights.convert.merge_variables`.
  """
  sub = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
  return torch_to_flax(sub, _hf_segformer_path)
