"""Shared pieces of the head tests: a tiny stand-in backbone with the backbone contract."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax

# Compiler options for tests that compile many small programs once each: XLA:CPU's LLVM
# optimisations take most of the compile time (4.5 s -> 1.4 s for a UPerNet train step) and
# do not matter for checking shapes, finiteness and gradients.
FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


class StandInBackbone(nn.Module):
  """Strided convs with CvT's sizes: stride 4/8/16 maps of `floor((n+1)/4)`, then ceil halving.

  Same contract as `cvt_backbone.CvTBackbone`: `(images [N, H, W, 3], *, train) ->
  {'stage1': [N, H1, W1, C1], 'stage2': ..., 'stage3': ...}` and a static `feature_info`.
  Channels are deliberately not multiples of 32 (GroupNorm must adapt its group count).
  """

  dims: Sequence[int] = (8, 12, 20)

  @property
  def feature_info(self) -> list[dict[str, Any]]:
    return [{'name': f'stage{i + 1}', 'num_chs': d, 'reduction': 4 * 2 ** i}
            for i, d in enumerate(self.dims)]

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
    # CvT's token embeddings: (kernel, stride, padding) = (7, 4, 2), then (3, 2, 1).
    x = nn.Conv(self.dims[0], (7, 7), strides=4, padding=((2, 2), (2, 2)), name='embed_0')(images)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name='norm_0')(x)
    out = {'stage1': x}
    for i, dim in enumerate(self.dims[1:], start=1):
      x = nn.Conv(dim, (3, 3), strides=2, padding=((1, 1), (1, 1)), name=f'embed_{i}')(nn.gelu(x))
      out[f'stage{i + 1}'] = x
    return out


def cvt_backbone_class() -> type[nn.Module] | None:
  """`cvt_backbone.CvTBackbone` once it exists, else None."""
  try:
    import cvt_backbone
  except ImportError:
    return None
  return getattr(cvt_backbone, 'CvTBackbone', None)
