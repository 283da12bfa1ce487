"""Reading configs: big_vision-style config arguments, ConfigDict-or-mapping access, key checks.

Configs are `get_config(arg=None)` functions returning a locked `ml_collections.ConfigDict`,
so a misspelled key is an error naming it instead of a silently ignored setting. A config
file may still add a key before it locks (or a Scenic user's config may not lock at all), so
where configs enter (`load_config`, each project's `main` and trainer) every key is also
checked against the settings the project reads (`check_config`): an unknown one is a
`ConfigKeyError` naming it by its dotted path and the closest known key.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Union

import ml_collections

from cvt_backbone.cvt import closest_key

# The settings a config may hold: {key: nested KnownKeys, or None for a value whose inside
# is not checked here (a leaf, or a section read by code that checks it itself)}.
KnownKeys = dict[str, Union['KnownKeys', None]]

# `config.optimizer`, as `projects.training.optim.make_optimizer` reads it.
OPTIMIZER_KEYS = ('base_lr', 'weight_decay', 'b1', 'b2', 'warmup_steps', 'warmup_ratio',
                  'schedule', 'power', 'min_lr', 'decay_steps', 'decay_factor', 'layer_decay',
                  'head_lr_mult', 'grad_clip_norm', 'accumulation_steps')

# Top-level keys Scenic reads when a Scenic user runs a project trainer from Scenic's own
# main (../shared/third_party/scenic): `workdir_suffix` (scenic/app.py), `trainer_name` and
# `checkpoint` (scenic/main.py), `shuffle_seed` (train_lib/train_utils.py get_dataset); and
# switches of Scenic's own trainers that such a config carries, no-ops for ours: `xprof`,
# `debug_train`, `debug_eval` (train_lib/classification_trainer.py), `count_flops`
# (train_utils.py), `write_summary` (projects/baselines/*/configs).
SCENIC_KEYS = ('workdir_suffix', 'trainer_name', 'checkpoint', 'shuffle_seed', 'xprof',
               'debug_train', 'debug_eval', 'count_flops', 'write_summary')

# Keys of other code bases whose meaning a project setting holds: suggested for them.
# Scenic's `init_from` (a checkpoint to start from; its project trainers) is the backbone's
# `pretrained` here.
_EQUIVALENTS = {'init_from': 'model.backbone.pretrained'}

# Modules that know a project's settings, registered by themselves when imported (a project's
# configs import them): `claims(config) -> bool` (the config is one of the project's: its
# model and dataset names) and `known_config_keys(config) -> KnownKeys`.
_FAMILIES: list[Any] = []


def register_config_family(family: Any) -> None:
  """Registers a project's settings (a module with `claims` and `known_config_keys`)."""
  if family not in _FAMILIES:
    _FAMILIES.append(family)


class ConfigKeyError(ValueError):
  """Config keys that no setting reads (typos): each by its dotted path, with a hint.

  Attributes:
    unknown: `(path, hint)` pairs; the hint is 'did you mean <closest key>?' or the keys
      known at that place.
    source: where the config came from (a file, a flag), or None.
  """

  def __init__(self, unknown: Sequence[tuple[str, str]], source: str | None = None):
    self.unknown = tuple(unknown)
    self.source = source
    super().__init__(self.unknown, source)  # args that rebuild it (pickling, copies)

  def __str__(self) -> str:
    keys = ', '.join(f'{path} ({hint})' for path, hint in self.unknown)
    plural = 's' if len(self.unknown) > 1 else ''
    prefix = f'{self.source}: ' if self.source else ''
    return f'{prefix}unknown config key{plural} {keys}'


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


def backbone_keys() -> KnownKeys:
  """`config.model.backbone`'s keys: every `CvTBackbone` field and the loading settings."""
  from cvt_backbone import CvTBackbone
  from cvt_backbone.weights.pretrained import LOADING_KEYS

  fields = [f.name for f in dataclasses.fields(CvTBackbone) if f.name not in ('parent', 'name')]
  return dict.fromkeys([*backbone_config().keys(), *fields, *LOADING_KEYS])


def _is_section(value: Any) -> bool:
  return isinstance(value, Mapping) or hasattr(value, 'to_dict')


def known_keys_of(config: Any) -> KnownKeys:
  """The keys of a config (e.g. a project's defaults) as `KnownKeys`, sections nested."""
  return {key: known_keys_of(value) if _is_section(value) else None
          for key, value in as_dict(config).items()}


def merge_known_keys(*known: KnownKeys | None) -> KnownKeys | None:
  """Keys known to any of `known`; a section unchecked (None) in one stays unchecked."""
  if any(k is None for k in known):
    return None
  merged: KnownKeys = {}
  for keys in known:
    for key, value in keys.items():
      merged[key] = merge_known_keys(merged[key], value) if key in merged else value
  return merged


def _paths(known: KnownKeys, prefix: str = '') -> list[str]:
  paths = []
  for key, value in known.items():
    paths.append(prefix + key)
    if value is not None:
      paths += _paths(value, f'{prefix}{key}.')
  return paths


def _hint(path: str, known_paths: Sequence[str]) -> str:
  """'did you mean <closest known key>?', else the keys known beside `path`."""
  parent, _, leaf = path.rpartition('.')
  siblings = {p.rpartition('.')[2]: p for p in known_paths if p.rpartition('.')[0] == parent}
  closest = _EQUIVALENTS.get(path) if _EQUIVALENTS.get(path) in known_paths else None
  if closest is None and (match := closest_key(leaf, siblings)):
    closest = siblings[match]
  if closest is None:
    # The right key in another section (`config.base_lr` for `config.optimizer.base_lr`).
    by_leaf: dict[str, str] = {}
    for p in sorted(known_paths, key=lambda p: p.count('.')):
      by_leaf.setdefault(p.rpartition('.')[2], p)
    if match := closest_key(leaf, by_leaf, cutoff=0.8):
      closest = by_leaf[match]
  if closest is not None:
    return f'did you mean {closest}?'
  return f'known there: {", ".join(sorted(siblings))}'


def unknown_config_keys(config: Any, known: KnownKeys) -> list[tuple[str, str]]:
  """`(dotted path, hint)` of each key of `config` that `known` lacks, in config order."""
  known_paths = _paths(known)
  unknown = []

  def walk(values: Mapping[str, Any], keys: KnownKeys, prefix: str) -> None:
    for key, value in values.items():
      path = prefix + str(key)
      if key not in keys:
        unknown.append((path, _hint(path, known_paths)))
      elif keys[key] is not None and _is_section(value):
        walk(as_dict(value), keys[key], path + '.')

  walk(as_dict(config), known, '')
  return unknown


def check_config_keys(config: Any, known: KnownKeys, source: str | None = None) -> None:
  """Raises `ConfigKeyError` naming every key of `config` that `known` lacks.

  Args:
    config: a ConfigDict or mapping, walked through every nested section.
    known: the settings that exist (`KnownKeys`).
    source: where the config came from (for the message), e.g. the config file.
  """
  unknown = unknown_config_keys(config, known)
  if unknown:
    raise ConfigKeyError(unknown, source)


def known_config_keys(config: Any) -> KnownKeys | None:
  """The settings of the project `config` belongs to (by its model and dataset names).

  A config no registered project claims (or several do, e.g. one without a model) is checked
  against the keys known to any of them; None when no project is registered (a config of
  another code base, which this package does not read).
  """
  claimed = [family for family in _FAMILIES if family.claims(config)] or _FAMILIES
  if not claimed:
    return None
  return merge_known_keys(*(family.known_config_keys(config) for family in claimed))


def dataset_keys_of(dataset_name: str | None, per_dataset: Mapping[str, Sequence[str]],
                    common: Sequence[str], scenic_prefix: str) -> tuple[str, ...] | None:
  """A dataset's `dataset_configs` keys: its own and `common`; None for an unknown dataset.

  `scenic_prefix + name` is the dataset in Scenic's registry, whose builders also take
  `start_step`; None stands for any of the datasets.
  """
  if dataset_name is None:
    return tuple(dict.fromkeys([*(k for keys in per_dataset.values() for k in keys), *common]))
  name = dataset_name.removeprefix(scenic_prefix)
  if name not in per_dataset:
    return None
  scenic = ('start_step',) if name != dataset_name else ()
  return (*per_dataset[name], *common, *scenic)


def names_project(config: Any, model_names: Iterable[str],
                  dataset_keys: Callable[[str], Any]) -> bool:
  """Whether `config`'s model and dataset (where set) are among a project's."""
  model_name = config_get(config, 'model_name')
  dataset_name = config_get(config, 'dataset_name')
  return ((model_name is None or model_name in model_names)
          and (dataset_name is None or dataset_keys(dataset_name) is not None))


def check_config(config: Any, source: str | None = None) -> None:
  """Raises `ConfigKeyError` for keys of `config` that its project does not read."""
  known = known_config_keys(config)
  if known is not None:
    check_config_keys(config, known, source)


# `--config.a.b=1`, `--config.a.b 1`, `--noconfig.a.b`: an override of config key `a.b`.
_OVERRIDE = re.compile(r'^--?(?:no)?config\.([^=]+)')


def check_config_overrides(config: Any, argv: Iterable[str]) -> None:
  """Raises `ConfigKeyError` for `--config.x` flags in `argv` that name no key of `config`.

  ml_collections sets only keys the config has; checked here first, its error would be a
  chain of tracebacks raised while absl parses the flags.
  """
  known = known_keys_of(config)
  known_paths = _paths(known)
  unknown = []
  for arg in argv:
    match = _OVERRIDE.match(arg)
    if not match:
      continue
    keys, path = known, match.group(1)
    parts = path.split('.')
    if not all(part.isidentifier() for part in parts):
      continue  # indexing syntax (`a[0]`): left to ml_collections
    for depth, part in enumerate(parts):
      if keys is None or part not in keys:
        missing = '.'.join(parts[:depth + 1])
        unknown.append((f'{missing} in {arg.split("=", 1)[0]}', _hint(missing, known_paths)))
        break
      keys = keys[part]
  if unknown:
    raise ConfigKeyError(unknown)


def _execute_config_file(spec: str) -> Any:
  """`get_config()` or `get_config(arg)` of `path/to/config.py[:arg]`, unchecked."""
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


def load_config(spec: str, check: bool = True) -> Any:
  """Loads `path/to/config.py[:arg]` by calling its `get_config()` or `get_config(arg)`.

  Args:
    spec: the config file and its optional argument.
    check: raise `ConfigKeyError` for keys its project does not read (`check_config`).
  """
  config = _execute_config_file(spec)
  if check:
    check_config(config, source=f'config {spec.partition(":")[0]}')
  return config
