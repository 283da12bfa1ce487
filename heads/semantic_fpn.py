"""Semantic FPN head (Kirillov et al. 2019, Panoptic FPN, arXiv 1901.02446, Fig. 3), mmseg's
`FPNHead`: conv-norm-ReLU (+ upsampling) stages take each level to the finest resolution, the
results are summed and classified. Each stage upsamples to the exact size of the next finer
level (ceil-sized maps: 62/31/16 for 250 px) where mmseg upsamples 2x and resizes at the end.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax

from heads.conv_module import ConvModule, DecodeHead
from heads.features import check_per_level, stride_level
from heads.resampling import resize_bilinear


class SemanticFPNHead(DecodeHead):
  """Semantic FPN decode head: a level at `s * 2**k` of the finest stride `s` gets `k`
  conv-upsample stages (the finest one conv); 128 channels and GroupNorm as the paper."""

  in_features: Sequence[str] = ('p2', 'p3', 'p4')
  norm: str = 'group'
  in_strides: Sequence[int] = (4, 8, 16)
  channels: int = 128

  @nn.compact
  def __call__(self, features: Mapping[str, jax.Array], *, train: bool = False) -> jax.Array:
    check_per_level(type(self).__name__, 'in_strides', self.in_strides, self.in_features)
    inputs = self.inputs(features)
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

    output = None
    for i, (level, x) in enumerate(zip(levels, inputs, strict=True)):
      if level < levels[0]:
        raise ValueError(f'{type(self).__name__}: in_strides must be ordered fine to coarse, '
                         f'got {tuple(self.in_strides)}.')
      for k in range(max(1, level - levels[0])):
        x = ConvModule(self.channels, 3, name=f'scale_heads_{i}_{k}', **self.norm_settings)(
            x, train=train)
        if level > levels[0]:
          x = resize_bilinear(x, size_at(level - k - 1))
      output = x if output is None else output + x
    return self.classify(output, train=train)
