"""Segmentor: backbone + optional neck + decode head (+ auxiliary head) in one Flax module.

mmsegmentation's `EncoderDecoder` in Flax. The backbone and heads are built elsewhere and
passed in (heads never build backbones); their attribute names (`backbone`, `neck`,
`decode_head`, `auxiliary_head`, as in Hugging Face's `UperNetForSemanticSegmentation`) are the
top-level keys of the variables, so checkpoints stay loadable as long as these names do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax

from heads.features import check_images, with_neck
from heads.resampling import resize_bilinear


class Segmentor(nn.Module):
  """Per-pixel logits at the input size from any backbone returning a dict of NHWC maps.

  Data flow: `backbone(images, train=...)` -> `{name: [N, H_i, W_i, C_i]}`; the neck (if any)
  maps those to more levels, which are merged into the same dict (neck names win on a clash;
  e.g. `FPN` adds `'p2'...` next to `'stage1'...`), so each head picks its own levels by name:
  a decode head on the FPN outputs and an auxiliary FCN head on `'stage3'` coexist. Head
  logits are resized to the input size with bilinear interpolation (half-pixel centres, no
  antialiasing, unless `align_corners`).

  Call convention: Scenic's, `apply(variables, images, train=..., debug=...,
  mutable=['batch_stats'], rngs={'dropout': key})`.

  Return convention: always a dict, the same type in both modes,
    - `'logits'`: `[N, H, W, K]`, always;
    - `'aux_logits'`: `[N, H, W, K_aux]`, only when `train=True` and there is an auxiliary
      head (mmseg uses it only for the training loss, weight 0.4);
    - `'head_logits'` (and `'aux_head_logits'`): in train mode, the heads' logits before the
      resize, at their own resolution, for a loss that resizes them itself
      (`heads.segmentation.loss`: the same loss in a fraction of the memory). A jitted step
      that only uses these never computes the full-size ones.
  The auxiliary head is also run by `init` in eval mode, so the variable tree is the same
  whichever mode initialised it.

  Attributes:
    backbone: a module called as `backbone(images, train=...)` returning NHWC maps.
    decode_head: a head called as `head(features, train=...)` returning `[N, h, w, K]`.
    neck: optional module `neck(features, train=...)` returning more named maps (e.g. `FPN`).
    auxiliary_head: optional head like `decode_head`, for an auxiliary training loss.
    align_corners: PyTorch's `align_corners` for the final resize.
  """

  backbone: nn.Module
  decode_head: nn.Module
  neck: nn.Module | None = None
  auxiliary_head: nn.Module | None = None
  align_corners: bool = False

  def __call__(self, images: jax.Array, *, train: bool = False,
               debug: bool = False) -> dict[str, jax.Array]:
    """Segments a batch of images.

    Args:
      images: `[N, H, W, C]` float images.
      train: training mode: batch statistics (pass `mutable=['batch_stats']`), dropout and
        drop path (pass `rngs={'dropout': key}`), auxiliary logits.
      debug: accepted for Scenic's trainers, which call every model with it; unused.

    Returns:
      `{'logits': [N, H, W, K]}`; in train mode also `'head_logits'` (the decode head's,
      before the resize) and, with an auxiliary head, `'aux_logits': [N, H, W, K_aux]` and
      `'aux_head_logits'`.
    """
    del debug
    features = self.backbone(check_images(images, 'Segmentor'), train=train)
    return self.decode(features, images.shape[1:3], train=train)

  def decode(
      self, features: Mapping[str, jax.Array], size: Sequence[int], *, train: bool = False
  ) -> dict[str, jax.Array]:
    """Neck and heads on backbone features computed elsewhere, logits resized to `size`.

    `__call__` is `decode(backbone(images), images.shape[1:3])`. Called on its own (e.g.
    `model.apply(variables, features, size, method=Segmentor.decode)`) it trains or evaluates
    the heads on cached features of a frozen backbone; backbone variables are not needed.

    Args:
      features: the backbone's `{name: [N, H_i, W_i, C_i]}` maps.
      size: the input `(H, W)` the logits are resized to.
      train: training mode, as in `__call__`.

    Returns:
      The same dict as `__call__`.
    """
    features = with_neck(self.neck, features, train=train)
    logits = self.decode_head(features, train=train)
    outputs: dict[str, Any] = {
        'logits': resize_bilinear(logits, size, align_corners=self.align_corners)}
    if train:
      outputs['head_logits'] = logits
    if self.auxiliary_head is not None and (train or self.is_initializing()):
      aux = self.auxiliary_head(features, train=train)
      if train:
        outputs['aux_logits'] = resize_bilinear(aux, size, align_corners=self.align_corners)
        outputs['aux_head_logits'] = aux
    return outputs
