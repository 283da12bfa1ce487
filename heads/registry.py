"""Necks and decode heads by name, for configs: `{'name': 'upernet', 'num_classes': 150}`
(backbones are built by their own package and handed to the model)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn

from cvt_backbone.cvt import check_keys
from heads.features import feature_kwargs
from heads.fpn import FPN
from heads.linear import LinearHead
from heads.segformer import SegFormerHead
from heads.semantic_fpn import SemanticFPNHead
from heads.upernet import FCNHead, UPerNetHead

HEADS: dict[str, type[nn.Module]] = {
    'fpn': FPN, 'semantic_fpn': SemanticFPNHead, 'upernet': UPerNetHead, 'fcn': FCNHead,
    'segformer': SegFormerHead, 'linear': LinearHead}

# Flax's own dataclass fields, not settings.
_RESERVED_FIELDS = ('parent', 'name')


def register_head(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
  """Class decorator adding a head (or neck) to `HEADS` under `name`."""

  def register(cls: type[nn.Module]) -> type[nn.Module]:
    if name in HEADS and HEADS[name] is not cls:
      raise ValueError(f'Head name {name!r} is already registered to {HEADS[name].__name__}.')
    HEADS[name] = cls
    return cls

  return register


def head_fields(cls: type[nn.Module]) -> tuple[str, ...]:
  """The settings a head class accepts."""
  return tuple(f.name for f in dataclasses.fields(cls) if f.name not in _RESERVED_FIELDS)


def build_head(config: str | Mapping[str, Any], *,
               feature_info: Sequence[Mapping[str, Any]] | None = None,
               **overrides: Any) -> nn.Module:
  """The unbound head or neck of a registered name, or of a mapping (or ConfigDict) with a
  'name' key and the head's settings, e.g. `build_head('upernet', num_classes=150)`.

  `feature_info` (a backbone's or `FPN.feature_info`) fills `in_features` (all levels unless
  set), `in_channels` and `in_strides` where the head has them; `overrides` replace settings.
  Unknown names and settings the head does not have raise ValueError (typos are not swallowed).
  """
  if hasattr(config, 'to_dict'):
    config = config.to_dict()
  if isinstance(config, str):
    name, settings = config, {}
  elif isinstance(config, Mapping):
    if 'name' not in config:
      raise ValueError(f"A head config needs a 'name' key, got keys {sorted(config)}.")
    settings = {k: v for k, v in config.items() if k != 'name'}
    name = config['name']
  else:
    raise ValueError(f'A head config is a name or a mapping, got {type(config).__name__}.')
  if name not in HEADS:
    raise ValueError(f'Unknown head {name!r}; registered heads: {sorted(HEADS)}.')
  cls = HEADS[name]
  fields = head_fields(cls)
  settings.update(overrides)
  if feature_info is not None:
    derived = feature_kwargs(feature_info, settings.get('in_features'))
    for key, value in derived.items():
      if key in fields:
        settings.setdefault(key, value)
  check_keys(settings, fields, f'{cls.__name__} ({name!r})')
  for key, value in settings.items():
    # Config files give lists; module fields are hashable tuples.
    if isinstance(value, list):
      settings[key] = tuple(value)
  return cls(**settings)
