"""Semantic FPN head (Kirillov et al. 2019, Panoptic FPN, arXiv 1901.02446, Fig. 3).

Each pyramid level goes through conv-norm-ReLU (+ upsampling) stages until it reaches the
finest level's resolution, the results are summed, and a 1x1 conv classifies: mmsegmentation's
`FPNHead`. Where mmseg upsamples by exactly 2x and resizes the sum at the end, this head
upsamples each stage to the exact size of the next finer level (backbone maps are ceil-sized:
62/31/16 for 250 px), so no map is ever shifted by a round-trip through a wrong size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax

from heads.conv_module import ConvModule, check_norm, classify
from heads.features import select_features, stride_level
from heads.resampling import resize_bilinear


class SemanticFPNHead(nn.Module):
  """Semantic FPN decode head: `{level: [N, H_i, W_i, C_i]}` -> `[N, H_0, W_0, K]`.

  Attributes:
    num_classes: K.
    in_features: level names, fine to coarse (defaults to the `FPN` outputs).
    in_strides: stride of each level; a level at `s * 2**k` of the finest stride `s` gets `k`
      conv-upsample stages (one conv and no upsampling for the finest).
    in_channels: declared channels per level; None to accept any.
    channels: width of the stages (128 in the paper).
    norm: 'group' (the paper), 'batch', 'layer' or 'none'.
    axis_name: mapped axis for cross-device BatchNorm statistics.
    num_groups: GroupNorm groups (32 in the paper).
    dropout_rate: channel dropout before the classifier, train mode only.
  """

  num_classes: int
  in_features: Sequence[str] = ('p2', 'p3', 'p4')
  in_strides: Sequence[int] = (4, 8, 16)
  in_channels: Sequence[int] | None = None
  channels: int = 128
  norm: str = 'group'
  axis_name: str | None = None
  num_groups: int = 32
  dropout_rate: float = 0.1

  @nn.compact
  def __call__(self, features: Mapping[str, jax.Array], *, train: bool = False) -> jax.Array:
    """Decodes a feature pyramid.

    Args:
      features: `{name: [N, H_i, W_i, C_i]}` containing every level of `in_features`.
      train: training mode (batch statistics, dropout with the 'dropout' rng).

    Returns:
      `[N, H_0, W_0, num_classes]` logits at the finest level's resolution.
    """
    owner = type(self).__name__
    check_norm(self.norm, owner)
    if len(self.in_strides) != len(self.in_features):
      raise ValueError(
          f'{owner}: {len(self.in_strides)} in_strides {tuple(self.in_strides)} for '
          f'{len(self.in_features)} in_features {tuple(self.in_features)}.')
    inputs = select_features(features, self.in_features, self.in_channels, owner=owner)
    levels = [stride_level(s) for s in self.in_strides]
    # Sizes to upsample through, by pyramid level: the inputs' own sizes where a level is
    # present, otherwise ceil-halving of the finest map (the backbones' convention).
    sizes = {level: x.shape[1:3] for level, x in zip(levels, inputs, strict=True)}
    finest_h, finest_w = inputs[0].shape[1:3]

    def size_at(level: int) -> tuple[int, int]:
      if level in sizes:
        return tuple(sizes[level])
      factor = 2 ** (level - levels[0])
      return -(-finest_h // factor), -(-finest_w // factor)

    conv = dict(norm=self.norm, axis_name=self.axis_name, num_groups=self.num_groups)
    output = None
    for i, (level, x) in enumerate(zip(levels, inputs, strict=True)):
      if level < levels[0]:
        raise ValueError(f'{owner}: in_strides must be ordered fine to coarse, got '
                         f'{tuple(self.in_strides)}.')
      for k in range(max(1, level - levels[0])):
        x = ConvModule(self.channels, 3, name=f'scale_heads_{i}_{k}', **conv)(x, train=train)
        if level > levels[0]:
          x = resize_bilinear(x, size_at(level - k - 1))
      output = x if output is None else output + x
    return classify(output, num_classes=self.num_classes, dropout_rate=self.dropout_rate,
                    train=train)
