"""`Detector`: backbone + neck + dense head, mmdet's `SingleStageDetector` in Flax."""

from __future__ import annotations

import functools
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from heads.features import check_images, select_features, with_neck


class Detector(nn.Module):
  """A one-stage dense detector: backbone + neck + head, mmdet's `SingleStageDetector`.

  Data flow: `backbone(images, train=...)` -> `{name: [N, H_i, W_i, C_i]}`; the neck (if
  any) adds pyramid levels to the same dict (e.g. `detection_fpn` adds `'p3'...'p7'`); the
  head picks its `in_features` from it and returns flattened per-point predictions (see the
  module docstring). Attribute names are the top-level keys of the variables.

  Call convention: Scenic's, `apply(variables, images, train=..., debug=...,
  mutable=['batch_stats'], rngs={'dropout': key})`. The returned dict has the same keys and
  shapes in both modes.

  Attributes:
    backbone: a module called as `backbone(images, train=...)` returning NHWC maps.
    head: the dense head (`ATSSHead`), called as `head(features, train=...)`.
    neck: optional module `neck(features, train=...)` returning more named maps.
  """

  backbone: nn.Module
  head: nn.Module
  neck: nn.Module | None = None

  def __call__(self, images: jax.Array, *, train: bool = False,
               debug: bool = False) -> dict[str, jax.Array]:
    """Detects in a batch of images.

    Args:
      images: `[N, H, W, C]` float images.
      train: training mode: batch statistics (pass `mutable=['batch_stats']`), dropout and
        drop path (pass `rngs={'dropout': key}`).
      debug: accepted for Scenic's trainers, which call every model with it; unused.

    Returns:
      The head's dict: `'cls_logits'` `[N, P, K]`, `'box_distances'` `[N, P, 4]` (ltrb,
      input pixels), `'centerness'` `[N, P]`; `P` points in `level_shapes(H, W)` order.
    """
    del debug
    return self.decode(self.backbone(check_images(images, 'Detector'), train=train), train=train)

  def decode(
      self, features: Mapping[str, jax.Array], *, train: bool = False
  ) -> dict[str, jax.Array]:
    """Neck and head on backbone features computed elsewhere (e.g. of a frozen backbone)."""
    return self.head(with_neck(self.neck, features, train=train), train=train)

  def pyramid(self, images: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
    """The head's input levels `{name: [N, h_l, w_l, C]}` for `images`, fine to coarse."""
    features = with_neck(
        self.neck, self.backbone(check_images(images, 'Detector'), train=train), train=train)
    levels = select_features(features, self.head.in_features, None, owner=type(self).__name__)
    return dict(zip(self.head.in_features, levels, strict=True))

  def level_shapes(self, height: int, width: int,
                   channels: int = 3) -> tuple[tuple[int, int], ...]:
    """Static `(h_l, w_l)` of every head level for an `height` x `width` input.

    Traced with `jax.eval_shape` (no FLOPs, no parameters) and cached per input size, so it
    can be called from data pipelines and inside jitted losses. Call it on the unbound module
    (`model.level_shapes(H, W)`).

    Args:
      height: input height H.
      width: input width W.
      channels: input channels.

    Returns:
      `((h_3, w_3), (h_4, w_4), ...)` in the order of the head's `in_features`.
    """
    module = self.clone(parent=None) if self.scope is not None else self
    try:
      hash(module)
    except TypeError:  # A field holds a list or dict: fine, just not cacheable.
      return _level_shapes(module, int(height), int(width), int(channels))
    return _cached_level_shapes(module, int(height), int(width), int(channels))


def _level_shapes(model: Detector, height: int, width: int,
                  channels: int) -> tuple[tuple[int, int], ...]:
  images = jax.ShapeDtypeStruct((1, height, width, channels), jnp.float32)
  init = functools.partial(model.init_with_output, method=Detector.pyramid, train=False)
  levels, _ = jax.eval_shape(init, jax.random.key(0), images)
  return tuple((int(levels[name].shape[1]), int(levels[name].shape[2]))
               for name in model.head.in_features)


_cached_level_shapes = functools.lru_cache(maxsize=64)(_level_shapes)
