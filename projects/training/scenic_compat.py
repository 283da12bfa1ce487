"""Scenic-native when Scenic is importable, the same protocol without it.

google-research/scenic is not on PyPI (the PyPI `scenic` is unrelated): an optional extra.
With it the model classes subclass its base models and join its registries. Only modules
that import without big_vision are used (`scenic.app`, `scenic.model_lib`,
`scenic.dataset_lib`).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping
from typing import Any

# The axis Scenic's pmap-based trainers name, over which metrics are summed.
SCENIC_AXIS_NAME = 'batch'


def scenic_available() -> bool:
  """True when google-research/scenic is importable (the PyPI `scenic` is unrelated)."""
  try:
    return importlib.util.find_spec('scenic.model_lib') is not None
  except ModuleNotFoundError:
    return False


def segmentation_model_base() -> type:
  """Scenic's `SegmentationModel` when Scenic is importable, else `object`."""
  if not scenic_available():
    return object
  from scenic.model_lib.base_models.segmentation_model import SegmentationModel

  return SegmentationModel


def base_model_class() -> type:
  """Scenic's `BaseModel` when Scenic is importable, else `object`."""
  if not scenic_available():
    return object
  from scenic.model_lib.base_models.base_model import BaseModel

  return BaseModel


def psum_metrics(metrics: Mapping[str, tuple[Any, Any]],
                 axis_name: str | None) -> dict[str, tuple[Any, Any]]:
  """`{name: (sum, normalizer)}` summed over `axis_name` (Scenic's `psum_metric_normalizer`);
  None leaves them (under jit the arrays are already global)."""
  if axis_name is None:
    return dict(metrics)
  import jax

  return {k: jax.lax.psum(v, axis_name) for k, v in metrics.items()}


def register_models(models: Mapping[str, type], *, group: str = 'SEGMENTATION_MODELS') -> list[str]:
  """Adds model classes to Scenic's model registry (`get_model_cls(name)` finds them);
  returns their names, or [] without Scenic. Registering again is harmless; a name Scenic
  uses for another class is an error."""
  if not scenic_available():
    logging.info('Scenic is not installed; no models registered.')
    return []
  from scenic.model_lib import models as scenic_models

  registry = getattr(scenic_models, group, None)
  for name, cls in models.items():
    existing = scenic_models.ALL_MODELS.get(name)
    if existing is not None and existing is not cls:
      raise ValueError(f'Scenic already registers a model {name!r} ({existing.__module__}.'
                       f'{existing.__qualname__}); not replacing it with {cls.__qualname__}.')
    scenic_models.ALL_MODELS[name] = cls
    if registry is not None:
      registry[name] = cls
  return list(models)


def quiet_library_logs() -> None:
  """Library INFO logs (orbax, clu, Scenic's start-up) off unless `--verbosity` was given;
  call before `absl.app.run` (or `scenic.app.run`)."""
  from absl import app, flags
  from absl import logging as absl_logging

  def quiet() -> None:
    if 'verbosity' in flags.FLAGS and not flags.FLAGS['verbosity'].present:
      absl_logging.set_verbosity(absl_logging.WARNING)

  app.call_after_init(quiet)

