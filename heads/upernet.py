"""UPerNet decode head (Xiao et al. 2018, arXiv 1807.10221): pyramid pooling (PSPNet, scales
1/2/3/6) on the coarsest level, an FPN top-down pass, all levels fused at the finest by a 3x3
conv. The FCN head (Long et al. 2015) is its auxiliary head (loss weight 0.4 in mmseg). Names
mirror Hugging Face's ports of mmseg's heads (`psp_modules.0.1.conv` -> `psp_modules_0/conv`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cvt_backbone.weights.convert import module_path, torch_to_flax
from heads.conv_module import ConvModule, DecodeHead
from heads.resampling import adaptive_avg_pool, resize_bilinear


class UPerNetHead(DecodeHead):
  """UPerNet decode head, the PPM on the last level; `dropout_rate` 0.1 as mmseg (Hugging
  Face's port has none, the same in eval)."""

  channels: int = 512  # every conv (mmseg and Hugging Face)
  pool_scales: Sequence[int] = (1, 2, 3, 6)  # PPM output sizes (PSPNet)

  @nn.compact
  def __call__(self, features: Mapping[str, jax.Array], *, train: bool = False) -> jax.Array:
    inputs = self.inputs(features)
    conv = functools.partial(ConvModule, self.channels, **self.norm_settings)

    # Pyramid pooling on the coarsest level: pool, 1x1 conv, upsample back, concat, 3x3 conv.
    top = inputs[-1]
    psp_outs = [top]
    for i, scale in enumerate(self.pool_scales):
      pooled = conv(1, name=f'psp_modules_{i}')(adaptive_avg_pool(top, scale), train=train)
      psp_outs.append(resize_bilinear(pooled, top.shape[1:3]))
    psp = conv(3, name='bottleneck')(jnp.concatenate(psp_outs, axis=-1), train=train)

    laterals = [conv(1, name=f'lateral_convs_{i}')(x, train=train)
                for i, x in enumerate(inputs[:-1])]
    laterals.append(psp)
    for i in range(len(laterals) - 1, 0, -1):
      laterals[i - 1] = laterals[i - 1] + resize_bilinear(laterals[i], laterals[i - 1].shape[1:3])
    outs = [conv(3, name=f'fpn_convs_{i}')(x, train=train) for i, x in enumerate(laterals[:-1])]
    outs.append(laterals[-1])
    size = outs[0].shape[1:3]
    fused = jnp.concatenate([outs[0]] + [resize_bilinear(x, size) for x in outs[1:]], axis=-1)
    return self.classify(conv(3, name='fpn_bottleneck')(fused, train=train), train=train)


class FCNHead(DecodeHead):
  """FCN head on one level (stage 3, stride 16, in mmseg's UPerNet configs); logits at that
  level's resolution. `concat_input` fuses the input and the convs' output with one more conv."""

  in_features: Sequence[str] = ('stage3',)
  channels: int = 256  # the auxiliary head's width
  num_convs: int = 1  # conv-norm-ReLU blocks; 0 classifies the input
  kernel_size: int = 3
  dilation: int = 1
  concat_input: bool = False

  @nn.compact
  def __call__(self, features: Mapping[str, jax.Array], *, train: bool = False) -> jax.Array:
    if len(self.in_features) != 1:
      raise ValueError(f'{type(self).__name__} reads exactly one level, got in_features '
                       f'{tuple(self.in_features)}.')
    (x,) = self.inputs(features)
    conv = functools.partial(ConvModule, self.channels, self.kernel_size, **self.norm_settings)
    out = x
    for i in range(self.num_convs):
      out = conv(dilation=self.dilation, name=f'convs_{i}')(out, train=train)
    if self.concat_input:
      # Padding kernel_size // 2 without dilation, as the reference (mmseg, Hugging Face).
      out = conv(padding=self.kernel_size // 2, name='conv_cat')(
          jnp.concatenate([x, out], axis=-1), train=train)
    return self.classify(out, train=train)


def _hf_upernet_path(torch_path: str) -> str:
  # `psp_modules.{i}` is a (pool, conv module) pair; the pool has no weights, so `.1` drops out.
  return module_path(re.sub(r'^psp_modules\.(\d+)\.1\.', r'psp_modules.\1.', torch_path))


def convert_hf_upernet_head(state_dict: Mapping[str, Any],
                            prefix: str = 'decode_head.') -> dict[str, dict[str, Any]]:
  """Hugging Face `UperNetHead` weights (numpy, keyed as `UperNetForSemanticSegmentation`'s
  state dict; keys outside `prefix` ignored) -> `UPerNetHead` variables, for `merge_variables`.
  """
  sub = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
  return torch_to_flax(sub, _hf_upernet_path)


def convert_hf_fcn_head(state_dict: Mapping[str, Any],
                        prefix: str = 'auxiliary_head.') -> dict[str, dict[str, Any]]:
  """Hugging Face `UperNetFCNHead` weights -> `FCNHead` variables (see the UPerNet one)."""
  sub = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
  return torch_to_flax(sub, module_path)
