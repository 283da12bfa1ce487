"""`Segmentor`: backbone, optional neck, decode head and auxiliary head (mmseg's
`EncoderDecoder`); its attribute names, as in Hugging Face's `UperNetForSemanticSegmentation`,
are the variables' top-level keys, so checkpoints load as long as they stay."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax

from heads.features import check_images, with_neck
from heads.resampling import resize_bilinear


class Segmentor(nn.Module):
  """Per-pixel logits at the input size from any backbone returning a dict of NHWC maps.

  The neck's levels join the backbone's (e.g. `FPN`'s `'p2'...` next to `'stage1'...`), so
  each head picks its levels by name. Returns `{'logits': [N, H, W, K]}`; in train mode also
  the decode head's `'head_logits'` before the resize (for `heads.segmentation.loss`), and with
  an auxiliary head (mmseg's training-only loss, weight 0.4) `'aux_logits'` and
  `'aux_head_logits'`. `init` runs the auxiliary head in eval mode too, so the variables do not
  depend on the mode. Called as Scenic calls models.
  """

  backbone: nn.Module
  decode_head: nn.Module
  neck: nn.Module | None = None
  auxiliary_head: nn.Module | None = None
  align_corners: bool = False

  def __call__(self, images: jax.Array, *, train: bool = False,
               debug: bool = False) -> dict[str, jax.Array]:
    del debug
    features = self.backbone(check_images(images, 'Segmentor'), train=train)
    return self.decode(features, images.shape[1:3], train=train)

  def decode(self, features: Mapping[str, jax.Array], size: Sequence[int], *,
             train: bool = False) -> dict[str, jax.Array]:
    """Neck and heads on backbone features, logits resized to `size`; on its own (`method=
    Segmentor.decode`) it runs the heads on cached features without backbone variables."""
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
