"""Config files and their keys: big_vision-style arguments, reading, and the one key check.

Configs are `get_config(arg=None)` returning a locked ConfigDict. A key a config file adds
before locking (or an unlocked Scenic config) is caught where the config enters: the
project's `main` and tools pass their `ProjectKeys` to `check_config`, which names each
unknown key by its dotted path and the closest known one.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import numbers
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple, Union

import ml_collections

from cvt_backbone import CvTBackbone
from cvt_backbone.cvt import LOADING_KEYS, closest_key
from cvt_backbone.tools import is_int

# The settings a config may hold: {key: nested KnownKeys, or None for a value whose inside
# is not checked here (a leaf, or a section read by code that checks it itself)}.
KnownKeys = dict[str, Union['KnownKeys', None]]

# `config.optimizer`, as `projects.training.optim.make_optimizer` reads it.
OPTIMIZER_KEYS = ('base_lr', 'weight_decay', 'b1', 'b2', 'warmup_steps', 'warmup_ratio',
                  'schedule', 'power', 'min_lr', 'decay_steps', 'decay_factor', 'layer_decay',
                  'head_lr_mult', 'grad_clip_norm', 'accumulation_steps')

# Top-level keys Scenic reads when a Scenic user runs a project trainer from Scenic's own
# main: `workdir_suffix` (scenic/app.py), `trainer_name` and `checkpoint` (scenic/main.py),
# `shuffle_seed` (train_lib/train_utils.py); and switches of Scenic's own trainers that such
# a config carries, no-ops for ours: `xprof`, `debug_train`, `debug_eval`
# (classification_trainer.py), `count_flops` (train_utils.py), `write_summary`.
SCENIC_KEYS = ('workdir_suffix', 'trainer_name', 'checkpoint', 'shuffle_seed', 'xprof',
               'debug_train', 'debug_eval', 'count_flops', 'write_summary')

# Keys of other code bases whose meaning a project setting holds: Scenic's `init_from`.
_EQUIVALENTS = {'init_from': 'model.backbone.pretrained'}


class ConfigError(ValueError):
  """Config settings that are wrong: `(setting, hint)` pairs, and `source` (a file)."""

  what = 'config problem'

  def __init__(self, problems: Sequence[tuple[str, str]], source: str | None = None):
    self.problems = tuple(problems)
    self.source = source
    super().__init__(self.problems, source)  # args that rebuild it (pickling, copies)

  def __str__(self) -> str:
    items = ', '.join(f'{path} ({hint})' for path, hint in self.problems)
    plural = 's' if len(self.problems) > 1 else ''
    prefix = f'{self.source}: ' if self.source else ''
    return f'{prefix}{self.what}{plural} {items}'


class ConfigKeyError(ConfigError):
  """Config keys that no setting reads: `(dotted path, hint)` pairs."""

  what = 'unknown config key'


class ConfigValueError(ConfigError):
  """Config values a setting cannot take: `(path=value, what it must be)` pairs."""

  what = 'invalid config value'


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
  if hasattr(config, 'get'):  # a mapping or ConfigDict (also when locked)
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


# AdamW settings both projects' recipes share (mmseg and mmdet: betas 0.9/0.999, poly power
# 1, no clipping, no accumulation).
_OPTIMIZER_DEFAULTS = dict(b1=0.9, b2=0.999, power=1.0, min_lr=0.0, grad_clip_norm=0.0,
                           accumulation_steps=1)


def training_config(model_name: str, dataset_name: str, model: ml_collections.ConfigDict,
                    optimizer: dict[str, Any], **settings: Any) -> ml_collections.ConfigDict:
  """A project trainer's config: names, seed, `model`, `optimizer` over AdamW's defaults.

  `settings` are the other top-level keys (steps, batch sizes, `loss`, `eval`, ...).
  """
  config = ml_collections.ConfigDict(dict(
      experiment_name=f'{model_name}_{dataset_name}', rng_seed=0, model_name=model_name,
      dataset_name=dataset_name, dataset_configs={}, data_dtype_str='float32',
      log_summary_steps=50, max_checkpoints_to_keep=3,
      optimizer={**_OPTIMIZER_DEFAULTS, **optimizer}, **settings))
  config.model = model
  return config


def apply_runlocal(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a project config to a minutes-long check of the whole pipeline on a CPU."""
  config.model.backbone.update(variant='cvt-tiny', pretrained='')
  config.update(batch_size=2, num_training_steps=4, log_summary_steps=2, log_eval_steps=4,
                checkpoint_steps=2)
  config.optimizer.warmup_steps = 1
  return config


def backbone_config() -> ml_collections.ConfigDict:
  """`config.model.backbone`: `CvTBackbone` settings (the module's defaults) + loading keys.

  `drop_path_rate` 0.1 is the fine-tuning recipe's; the placeholders accept a value later
  (`--config.model.backbone.attention_chunk_size=1024`).
  """
  fields = {f.name: f.default for f in dataclasses.fields(CvTBackbone)}
  config = ml_collections.ConfigDict({k: fields[k] for k in (
      'variant', 'frozen_stages', 'norm_eval', 'attention', 'remat', 'activation', 'out_norm')})
  config.update(pretrained='', keep_cls_token=True, drop_path_rate=0.1, dtype='float32')
  config.attention_chunk_size = ml_collections.config_dict.placeholder(int)
  config.bn_axis_name = ml_collections.config_dict.placeholder(str)
  return config


def backbone_keys() -> KnownKeys:
  """`config.model.backbone`'s keys: every `CvTBackbone` field and the loading settings."""
  fields = [f.name for f in dataclasses.fields(CvTBackbone) if f.name not in ('parent', 'name')]
  return dict.fromkeys([*fields, *LOADING_KEYS])


def model_keys(defaults: ml_collections.ConfigDict, **sections: Iterable[str]) -> KnownKeys:
  """`config.model`'s keys: those of `defaults`, the backbone's and each section's fields."""
  # A head's `num_classes` comes from the dataset, not the config.
  return merge_known_keys(
      known_keys_of(defaults), {'backbone': backbone_keys()},
      {name: dict.fromkeys(k for k in fields if k != 'num_classes')
       for name, fields in sections.items()})


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


def _is_number(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _all(test: Callable[[Any], bool], length: int | None = None) -> Callable[[Any], bool]:
  """A test of a sequence (of `length` items, any if None) whose every item passes `test`."""
  return lambda v: (isinstance(v, Sequence) and not isinstance(v, str)
                    and (length is None or len(v) == length) and all(map(test, v)))


class ValueRule(NamedTuple):
  """What a setting must be (`expected`, in words) and its test; `allowed` pass as they are."""

  expected: str
  test: Callable[[Any], bool]
  allowed: tuple = (None,)


_positive = ValueRule('a positive integer', lambda v: is_int(v) and v >= 1)
_count = ValueRule('an integer >= 0', lambda v: is_int(v) and v >= 0)
_interval = ValueRule('an integer >= 0 (0: at the end only)', _count.test)
_rate = ValueRule('a number >= 0', lambda v: _is_number(v) and v >= 0)
_fraction = ValueRule('a number in [0, 1]', lambda v: _is_number(v) and 0 <= v <= 1)
_below_one = ValueRule('a number in [0, 1)', lambda v: _is_number(v) and 0 <= v < 1)
_share = ValueRule('a number in (0, 1]', lambda v: _is_number(v) and 0 < v <= 1)
_factor = ValueRule('a positive number', lambda v: _is_number(v) and v > 0)
_size = ValueRule('two positive integers', _all(_positive.test, 2))

# The count, size and rate settings of both projects: {dotted path: rule}. `check_config`
# checks those a config holds (None leaves a setting to its default, and a project adds or
# narrows rules in `project_keys`); the code that reads them may assume them.
VALUE_RULES: dict[str, ValueRule] = {
    **dict.fromkeys(('batch_size', 'eval_batch_size', 'num_training_steps', 'log_summary_steps',
                     'max_checkpoints_to_keep'), _positive),
    **dict.fromkeys(('log_eval_steps', 'checkpoint_steps'), _interval),
    **{f'dataset_configs.{key}': _positive for key in (
        'num_classes', 'num_train', 'num_eval', 'max_objects', 'max_boxes', 'eval_size_divisor')},
    **{f'dataset_configs.{key}': _count for key in ('num_threads', 'num_workers', 'prefetch')},
    **{f'dataset_configs.{key}': _size for key in (
        'image_size', 'crop_size', 'scale', 'eval_pad_shape', 'eval_label_pad_shape')},
    'dataset_configs.test_scale': _size._replace(allowed=(None, 'default')),
    'dataset_configs.canvas_sizes': ValueRule('a list of (h, w) pairs of positive integers',
                                              _all(_size.test)),
    'dataset_configs.ratio_range': ValueRule('(low, high): two positive numbers, low <= high',
                                             lambda v: _all(_factor.test, 2)(v) and v[0] <= v[1]),
    'dataset_configs.cat_max_ratio': _share,
    'dataset_configs.flip_prob': _fraction,
    **{f'optimizer.{key}': _rate for key in ('base_lr', 'weight_decay', 'power', 'min_lr',
                                             'head_lr_mult', 'grad_clip_norm')},
    **{f'optimizer.{key}': _below_one for key in ('b1', 'b2')},
    'optimizer.warmup_steps': _count,
    'optimizer.warmup_ratio': _fraction,
    'optimizer.decay_steps': ValueRule('a list of integers >= 0', _all(_count.test)),
    'optimizer.decay_factor': _rate,
    'optimizer.layer_decay': _factor,
    'optimizer.accumulation_steps': _positive,
    'loss.label_smoothing': _fraction,
    **{f'loss.{key}': _rate for key in ('aux_weight', 'cls_weight', 'box_weight',
                                        'centerness_weight')},
    **{f'eval.{key}': ValueRule('a positive integer or two',
                                lambda v: _positive.test(v) or _size.test(v))
       for key in ('crop_size', 'stride')},
    'eval.scales': ValueRule('a list of positive numbers', _all(_factor.test)),
    'eval.min_size': ValueRule('an integer >= 0 or two',
                               lambda v: _count.test(v) or _all(_count.test, 2)(v)),
    **{f'eval.{key}': _positive for key in ('pre_nms_topk', 'max_detections')},
    **{f'eval.{key}': _fraction for key in ('score_threshold', 'iou_threshold')},
    'model.backbone.drop_path_rate': _below_one,
    'model.backbone.frozen_stages': _count,
    'model.backbone.attention_chunk_size': _positive,
    **{f'model.{head}.channels': _positive for head in ('decode_head', 'auxiliary_head', 'head')},
    'model.neck.out_channels': _positive,
    'model.head.num_convs': _positive,
    'model.head.prior_prob': ValueRule('a number in (0, 1)',
                                       lambda v: _is_number(v) and 0 < v < 1),
    **{f'model.{head}.dropout_rate': _below_one for head in ('decode_head', 'auxiliary_head')},
}


def _invalid_values(config: Any, rules: Mapping[str, ValueRule]) -> list[tuple[str, str]]:
  """`(path=value, expected ...)` of each setting of `config` that breaks its rule."""
  invalid = []
  for path, rule in rules.items():
    value = config
    for key in path.split('.'):
      value = config_get(value, key) if value is not None else None
    if isinstance(value, list):
      value = tuple(value)  # as a config file writes it
    if not any(value is a or value == a for a in rule.allowed) and not rule.test(value):
      invalid.append((f'{path}={value!r}', f'expected {rule.expected}'))
  return invalid


@dataclasses.dataclass(frozen=True)
class ProjectKeys:
  """The settings a project's configs may hold, as data.

  `common` keys; `config.model`'s per model name; `config.dataset_configs`' per dataset name;
  the rules of their `values`.
  """

  common: KnownKeys
  models: Mapping[str, KnownKeys]
  datasets: Mapping[str, Sequence[str]]
  values: Mapping[str, ValueRule] = dataclasses.field(default_factory=lambda: VALUE_RULES)

  def of(self, config: Any) -> KnownKeys:
    """The keys of `config`: its model's and dataset's (any one's where it names none).

    An unknown model or dataset leaves its section unchecked (the builders reject it).
    """
    model_name = config_get(config, 'model_name')
    dataset_name = config_get(config, 'dataset_name')
    if dataset_name is None:
      names = dict.fromkeys(k for keys in self.datasets.values() for k in keys)
    else:
      names = self.datasets.get(dataset_name)
    return {**self.common,
            'model': (merge_known_keys(*self.models.values()) if model_name is None
                      else self.models.get(model_name)),
            'dataset_configs': None if names is None else dict.fromkeys(names)}


def project_keys(defaults: Any, models: Mapping[str, KnownKeys],
                 datasets: Mapping[str, Sequence[str]], common_dataset_keys: Sequence[str],
                 scenic_prefix: str, extra: KnownKeys | None = None,
                 values: Mapping[str, ValueRule] | None = None) -> ProjectKeys:
  """A project's `ProjectKeys`: the keys of `defaults` (a full config), Scenic's and `extra`.

  Each dataset also takes `common_dataset_keys`, and under its name in Scenic's registry
  (`scenic_prefix + name`) also `start_step`. `values` add to or replace `VALUE_RULES`.
  """
  per_dataset = {}
  for name, keys in datasets.items():
    per_dataset[name] = (*keys, *common_dataset_keys)
    per_dataset[scenic_prefix + name] = (*keys, *common_dataset_keys, 'start_step')
  common = merge_known_keys(known_keys_of(defaults), dict.fromkeys(SCENIC_KEYS), extra or {})
  return ProjectKeys(common, dict(models), per_dataset, {**VALUE_RULES, **(values or {})})


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


def check_config(config: Any, keys: ProjectKeys, source: str | None = None) -> None:
  """Raises `ConfigKeyError` naming every key of `config` (nested too) that `keys` lacks, then
  `ConfigValueError` naming every value that breaks its rule (`ProjectKeys.values`)."""
  known = keys.of(config)
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
  if unknown:
    raise ConfigKeyError(unknown, source)
  if invalid := _invalid_values(config, keys.values):
    raise ConfigValueError(invalid, source)


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


def load_config(spec: str, keys: ProjectKeys | None = None) -> Any:
  """`get_config()` or `get_config(arg)` of `path/to/config.py[:arg]`, checked against `keys`."""
  path, sep, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config file not found: {path}')
  name = 'cvt_seg_config_' + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise ValueError(f'config file {path} defines no get_config()')
  config = module.get_config(arg) if sep else module.get_config()
  if keys is not None:
    check_config(config, keys, source=f'config {path}')
  return config
