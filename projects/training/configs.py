"""Reading configs: big_vision-style config arguments and ConfigDict-or-mapping access.

Configs are `get_config(arg=None)` functions returning a locked `ml_collections.ConfigDict`,
so a misspelled key is an error naming it instead of a silently ignored setting.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from typing import Any

import ml_collections


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses big_vision-style arguments: 'variant=21,runlocal' -> {variant: '21', runlocal: True}.

  Only keys present in `defaults` are accepted; values take the type of their default.
  """
  parsed = dict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, eq, value = item.partition('=')
    if key not in defaults:
      raise ValueError(f'Unknown config argument {key!r}; expected one of {sorted(defaults)}.')
    default = defaults[key]
    if not eq:
      parsed[key] = True
    elif isinstance(default, bool):
      parsed[key] = value.lower() in ('1', 'true', 'yes')
    elif default is not None:
      parsed[key] = type(default)(value)
    else:
      parsed[key] = value
  return ml_collections.ConfigDict(parsed)


def config_get(config: Any, key: str, default: Any = None) -> Any:
  """`config.key` for a ConfigDict, dict or object; `default` when absent or None."""
  if config is None:
    return default
  if isinstance(config, Mapping):
    value = config.get(key, default)
  elif hasattr(config, 'get'):  # ConfigDict, also when locked
    value = config.get(key, default)
  else:
    value = getattr(config, key, default)
  return default if value is None else value


def as_dict(config: Any) -> dict:
  """A ConfigDict or mapping as a plain dict (None -> {})."""
  if config is None:
    return {}
  if hasattr(config, 'to_dict'):
    return config.to_dict()
  return dict(config)


def backbone_config(**overrides: Any) -> ml_collections.ConfigDict:
  """`config.model.backbone` with every default: CvTBackbone settings + loading keys.

  `pretrained` is a converted checkpoint (`cvt-convert`) loaded by the model's `init`;
  settings whose default is None are placeholders, so they accept a value later
  (`--config.model.backbone.attention_chunk_size=1024`).
  """
  config = ml_collections.ConfigDict(dict(
      variant='cvt-13', pretrained='', keep_cls_token=True, drop_path_rate=0.1,
      frozen_stages=0, norm_eval=False, attention='auto', remat=False, dtype='float32',
      activation='quick_gelu', out_norm=False))
  config.attention_chunk_size = ml_collections.config_dict.placeholder(int)
  config.bn_axis_name = ml_collections.config_dict.placeholder(str)
  config.update(overrides)
  return config


def load_config(spec: str) -> Any:
  """Loads `path/to/config.py[:arg]` by calling its `get_config()` or `get_config(arg)`."""
  path, sep, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config file not found: {path}')
  name = 'cvt_seg_config_' + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise ValueError(f'config file {path} defines no get_config()')
  return module.get_config(arg) if sep else module.get_config()
