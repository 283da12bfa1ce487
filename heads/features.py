"""The contract between backbones (or necks) and heads, checked where a model's input enters.

A backbone returns `{name: [N, H, W, C]}` maps described, without init, by a timm-style
`feature_info` (`[{'name': 'stage1', 'num_chs': 64, 'reduction': 4}, ...]`); heads name the
levels they read (`in_features`, fine to coarse) and may declare their channels. Errors name
the level and the shapes instead of failing deep inside a conv.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax


def select_features(features: Mapping[str, jax.Array], in_features: Sequence[str],
                    in_channels: Sequence[int] | None, *, owner: str) -> list[jax.Array]:
  """The maps of `in_features`, in order, checked: present, 4-D, with the declared channels
  (None accepts any), one batch size, ordered fine to coarse. `owner` names the head."""
  if not isinstance(features, Mapping):
    raise ValueError(
        f'{owner} expects a dict of [N, H, W, C] feature maps, got {type(features).__name__}.')
  if isinstance(in_features, str):
    raise ValueError(f'{owner}.in_features must be a sequence of names, got {in_features!r}.')
  if not in_features:
    raise ValueError(f'{owner}.in_features is empty.')
  if in_channels is not None:
    check_per_level(owner, 'in_channels', in_channels, in_features)
  available = ', '.join(f'{k!r}: {_shape(v)}' for k, v in features.items())
  missing = [name for name in in_features if name not in features]
  if missing:
    raise ValueError(
        f'{owner} needs feature level(s) {missing} but the features have only '
        f'{{{available}}}.')
  selected = [features[name] for name in in_features]
  for i, (name, x) in enumerate(zip(in_features, selected, strict=True)):
    if getattr(x, 'ndim', None) != 4:
      raise ValueError(
          f'{owner}: feature level {name!r} must be an [N, H, W, C] (NHWC) array, '
          f'got shape {_shape(x)}.')
    if in_channels is not None and x.shape[-1] != in_channels[i]:
      raise ValueError(
          f'{owner}: feature level {name!r} should have {in_channels[i]} channels on the '
          f'last axis ([N, H, W, {in_channels[i]}], NHWC), got shape {_shape(x)}.')
  levels = list(zip(in_features, selected, strict=True))
  first, first_map = levels[0]
  for name, x in levels[1:]:
    if x.shape[0] != first_map.shape[0]:
      raise ValueError(
          f'{owner}: feature levels {first!r} {_shape(first_map)} and {name!r} {_shape(x)} '
          f'have different batch sizes.')
  for (fine_name, fine), (coarse_name, coarse) in itertools.pairwise(levels):
    if coarse.shape[1] > fine.shape[1] or coarse.shape[2] > fine.shape[2]:
      raise ValueError(
          f'{owner}.in_features must be ordered fine to coarse, but {coarse_name!r} '
          f'{_shape(coarse)} is larger than {fine_name!r} {_shape(fine)}.')
  return selected


def check_per_level(owner: str, name: str, values: Sequence[Any],
                    in_features: Sequence[str]) -> None:
  """Raises unless `values` (e.g. strides) has one entry per level of `in_features`."""
  if len(values) != len(in_features):
    raise ValueError(f'{owner}: {len(values)} {name} {tuple(values)} for {len(in_features)} '
                     f'in_features {tuple(in_features)}.')


def _shape(x: Any) -> tuple[int, ...] | str:
  shape = getattr(x, 'shape', None)
  return tuple(shape) if shape is not None else type(x).__name__


def feature_kwargs(feature_info: Sequence[Mapping[str, Any]],
                   names: Sequence[str] | None = None) -> dict[str, tuple[Any, ...]]:
  """`in_features`, `in_channels` and `in_strides` of the levels `names` (default: all) of a
  `feature_info`."""
  by_name = {info['name']: info for info in feature_info}
  if names is None:
    names = [info['name'] for info in feature_info]
  unknown = [name for name in names if name not in by_name]
  if unknown:
    raise ValueError(f'Levels {unknown} are not in feature_info {list(by_name)}.')
  return {
      'in_features': tuple(names),
      'in_channels': tuple(int(by_name[name]['num_chs']) for name in names),
      'in_strides': tuple(int(by_name[name]['reduction']) for name in names),
  }


def stride_level(stride: int) -> int:
  """Pyramid level of a stride (detectron2 naming: stride 4 is level 2, `'p2'`)."""
  level = math.log2(stride) if stride > 0 else float('nan')
  if not level.is_integer():
    raise ValueError(f'Strides must be powers of two to name pyramid levels, got {stride}.')
  return int(level)


def is_symbolic(*sizes: Any) -> bool:
  """Whether a size is a symbolic dimension of `jax.export` (a model exported for every size)."""
  return any(jax.export.is_symbolic_dim(s) for s in sizes)


def as_size(size: Any) -> Any:
  """`int(size)`, or `size` itself if it is symbolic."""
  return size if is_symbolic(size) else int(size)


def check_images(images: jax.Array, owner: str) -> jax.Array:
  """Returns `images` if they are `[N, H, W, C]`; raises on other ranks and on NCHW."""
  if getattr(images, 'ndim', None) != 4:
    raise ValueError(
        f'{owner} expects [N, H, W, C] images, got shape {getattr(images, "shape", None)}.')
  if images.shape[1] in (1, 3, 4) and images.shape[-1] not in (1, 3, 4):
    raise ValueError(
        f'{owner} expects channels-last [N, H, W, C] images; shape {tuple(images.shape)} '
        f'looks channels-first ([N, C, H, W]). Transpose with x.transpose(0, 2, 3, 1).')
  return images


def with_neck(neck: Any, features: Mapping[str, jax.Array], *,
              train: bool) -> dict[str, jax.Array]:
  """Backbone maps merged with the neck's levels, if there is a neck (its names win)."""
  features = dict(features)
  if neck is not None:
    features.update(neck(features, train=train))
  return features
