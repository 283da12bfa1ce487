"""`Detector`: backbone + neck + dense head, mmdet's `SingleStageDetector` in Flax."""

from __future__ import annotations

import functools
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from heads.features import as_size, check_images, is_symbolic, select_features, with_neck


class Detector(nn.Module):
  """Backbone, optional neck (e.g. `detection_fpn`, adding `'p3'...'p7'` to the backbone's
  dict) and dense head (`ATSSHead`); the attribute names are the variables' top-level keys.

  Called as Scenic calls models (`train`, `debug`; `mutable=['batch_stats']` and
  `rngs={'dropout': key}` in train mode); the output has the same keys and shapes in both modes.
  """

  backbone: nn.Module
  head: nn.Module
  neck: nn.Module | None = None

  def __call__(self, images: jax.Array, *, train: bool = False,
               debug: bool = False) -> dict[str, jax.Array]:
    """`[N, H, W, C]` images -> the head's per-point outputs, in `level_shapes(H, W)` order."""
    del debug
    return self.decode(self.backbone(check_images(images, 'Detector'), train=train), train=train)

  def decode(self, features: Mapping[str, jax.Array], *,
             train: bool = False) -> dict[str, jax.Array]:
    """Neck and head on backbone features computed elsewhere (e.g. of a frozen backbone)."""
    return self.head(with_neck(self.neck, features, train=train), train=train)

  def pyramid(self, images: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
    """The head's input levels `{name: [N, h_l, w_l, C]}` for `images`, fine to coarse."""
    features = with_neck(
        self.neck, self.backbone(check_images(images, 'Detector'), train=train), train=train)
    levels = select_features(features, self.head.in_features, None, owner=type(self).__name__)
    return dict(zip(self.head.in_features, levels, strict=True))

  def level_shapes(self, height: int, width: int, channels: int = 3) -> tuple[tuple[int, int], ...]:
    """`(h_l, w_l)` of the head's levels for an input size, in `in_features` order: ints, or
    expressions of a symbolic size (`jax.export`).

    Traced with `jax.eval_shape` (no FLOPs) on the unbound module and cached per static size,
    so data pipelines and jitted losses can call it.
    """
    module = self.clone(parent=None) if self.scope is not None else self
    if is_symbolic(height, width):  # Belongs to one export: not cached.
      return _level_shapes(module, height, width, int(channels))
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
  return tuple((as_size(levels[name].shape[1]), as_size(levels[name].shape[2]))
               for name in model.head.in_features)


_cached_level_shapes = functools.lru_cache(maxsize=64)(_level_shapes)
