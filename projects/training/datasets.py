"""What both projects' datasets share: their errors, Scenic's `Dataset` and its registry.

A project's `build_loaders(name, batch_size=..., eval_batch_size=..., **kwargs)` returns
`(train_loader, eval_loader, meta_data)` (`step_loader` subclasses); `dataset_getter` makes
its `get_dataset`, returning Scenic's `Dataset(train_iter, valid_iter, test_iter,
meta_data)`, and `register_builders` adds it to Scenic's dataset registry.
"""

from __future__ import annotations

import collections
import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from projects.training.configs import as_dict
from projects.training.scenic_compat import scenic_available

# Same fields as scenic.dataset_lib.dataset_utils.Dataset.
Dataset = collections.namedtuple('Dataset', ['train_iter', 'valid_iter', 'test_iter', 'meta_data'])

GetDataset = Callable[..., Dataset]


class DatasetError(ValueError):
  """A dataset's files are invalid; the message names the file, the entries and the fix.

  Raised while a dataset is built, before training, or by a loader for an example it cannot
  load (`step_loader`); `main` prints it as one line and exits 1.
  """


class MissingFilesError(DatasetError, FileNotFoundError):
  """Files a dataset lists (images, masks) do not exist; the message lists them."""


def listing(lines: Sequence[str], shown: int) -> str:
  """The first `shown` lines, indented, and how many more there are."""
  text = '\n'.join(f'  {line}' for line in lines[:shown])
  if len(lines) > shown:
    text += f'\n  ... and {len(lines) - shown} more'
  return text


def dataset_getter(build_loaders: Callable[..., tuple[Any, Any, dict]]) -> GetDataset:
  """A project's `get_dataset(name, *, start_step=0, **kwargs)` from its `build_loaders`.

  Endless training batches from `start_step`, endless evaluation passes (Scenic's
  `valid_iter`; trainers take `meta_data['num_eval_batches']` of them); `test_iter` is None.
  `meta_data` gains the loaders, for trainers that resume at a step known only after
  restoring a checkpoint and for exact single evaluation passes.
  """

  def get_dataset(name: str, *, start_step: int = 0, **kwargs: Any) -> Dataset:
    train, evaluation, meta_data = build_loaders(name, **kwargs)
    meta_data = dict(meta_data, train_loader=train, eval_loader=evaluation,
                     train_start_step=start_step, num_eval_batches=evaluation.num_batches)
    return Dataset(train.iterate(start_step), evaluation.repeat(), None, meta_data)

  return get_dataset


def shard(batch: dict, num_shards: int) -> dict:
  """`[b, ...]` arrays -> `[num_shards, b // num_shards, ...]`, the layout Scenic's pmap takes."""
  b = len(next(iter(batch.values())))
  if b % num_shards:
    raise ValueError(f'per-process batch size {b} must be a multiple of num_shards={num_shards}')
  return {k: v.reshape((num_shards, -1) + v.shape[1:]) for k, v in batch.items()}


def register_builders(names: Sequence[str], get_dataset: GetDataset, *, prefix: str,
                      scenic_defaults: Mapping[str, Any] | None = None,
                      project: str = 'cvt') -> list[str]:
  """Registers `get_dataset(name, ...)` for each name in Scenic's registry as `prefix + name`.

  The builders take Scenic's arguments (`batch_size, eval_batch_size, num_shards, dtype_str,
  shuffle_seed, rng, dataset_configs, dataset_service_address`): batch sizes per host
  (Scenic's `train_utils.get_dataset` divides the config's by the process count), batches
  `[num_shards, ...]` for pmap, `dataset_configs` the keyword arguments of `build_loaders`
  (plus `start_step`) over `scenic_defaults`. Registering twice is harmless.

  Returns:
    The registered names, or an empty list when Scenic is not installed.
  """
  if not scenic_available():
    logging.info('Scenic is not installed; no datasets registered.')
    return []
  from scenic.dataset_lib import datasets as scenic_datasets

  registered = []
  for name in names:
    full = prefix + name
    if full not in scenic_datasets.DatasetRegistry.list():
      scenic_datasets.add_dataset(full)(
          _scenic_builder(name, get_dataset, dict(scenic_defaults or {}), project))
    registered.append(full)
  return registered


def _scenic_builder(name: str, get_dataset: GetDataset, defaults: dict[str, Any], project: str):
  def builder(*, batch_size: int, eval_batch_size: int, num_shards: int, dtype_str: str = 'float32',
              shuffle_seed: int | None = 0, rng=None, dataset_configs: Mapping | None = None,
              dataset_service_address: str | None = None) -> Dataset:
    import jax
    import jax.numpy as jnp

    del rng  # the data stream is keyed by shuffle_seed and the step
    if dataset_service_address:
      raise ValueError(f'tf.data service is not supported by the {project} datasets')
    ds = get_dataset(
        name, batch_size=batch_size * jax.process_count(),
        eval_batch_size=eval_batch_size * jax.process_count(),
        seed=0 if shuffle_seed is None else shuffle_seed, dtype_str=dtype_str,
        process_index=jax.process_index(), process_count=jax.process_count(),
        **{**defaults, **as_dict(dataset_configs)})
    # Only Scenic's pmap trainers take `[num_shards, b, ...]`; the loaders give `[b, ...]`.
    to_shards = functools.partial(shard, num_shards=num_shards)
    return ds._replace(train_iter=map(to_shards, ds.train_iter),
                       valid_iter=map(to_shards, ds.valid_iter),
                       meta_data=dict(ds.meta_data, input_dtype=getattr(jnp, dtype_str)))

  builder.__name__ = f'get_{name}_dataset'
  return builder
