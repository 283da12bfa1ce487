"""What the projects share to be Scenic-native when Scenic is importable, and to run without it.

google-research/scenic is not on PyPI (the PyPI package `scenic` is unrelated), so it is an
optional extra: with it, the model classes subclass Scenic's base models and are added to its
model registry, the datasets to its dataset registry, and `main.py` runs under `scenic.app`.
Without it the same classes follow the same protocol as plain Python classes.

Only Scenic modules that import without big_vision are used here (`scenic.app`,
`scenic.model_lib`, `scenic.dataset_lib`); never `scenic.main`, `scenic.train_lib.trainers`
or `pretrain_utils`.
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
  """`{name: (sum, normalizer)}` summed over `axis_name` (Scenic's `psum_metric_normalizer`).

  `axis_name=None` leaves them as they are (jit: the arrays are already global).
  """
  if axis_name is None:
    return dict(metrics)
  import jax

  return {k: jax.lax.psum(v, axis_name) for k, v in metrics.items()}


def register_models(models: Mapping[str, type], *, group: str = 'SEGMENTATION_MODELS') -> list[str]:
  """Adds model classes to Scenic's model registry (`scenic.model_lib.models`).

  Afterwards `scenic.model_lib.models.get_model_cls(name)` returns them, so a Scenic config
  with `model_name='cvt_upernet'` resolves. Registering again is harmless; a name that
  Scenic already uses for another class is an error.

  Returns:
    The registered names, or an empty list when Scenic is not importable.
  """
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
  """Library INFO logs (orbax, clu, Scenic's start-up) off unless `--verbosity` was given.

  Call before `absl.app.run` (or `scenic.app.run`): it acts once the flags are parsed,
  before `main` runs.
  """
  from absl import app, flags
  from absl import logging as absl_logging

  def quiet() -> None:
    if 'verbosity' in flags.FLAGS and not flags.FLAGS['verbosity'].present:
      absl_logging.set_verbosity(absl_logging.WARNING)

  app.call_after_init(quiet)

