"""The training loop both projects run, with Scenic's trainer signature.

`jax.jit` over a mesh of every device: batches split on the 'data' axis, parameters and
optimizer state replicated (multi-host after `jax.distributed.initialize()`; BatchNorm
statistics are the global batch's). A resumed run repeats an uninterrupted one: batches and
dropout keys of step s are functions of (seed, s), and it restarts from the latest
checkpoint that verifies. A NaN or inf loss or gradient stops the run
(`checkpoints.NonFiniteStateError`, a `FloatingPointError`) before anything of that step is
saved or evaluated, naming the step. One run per workdir (`workdir_lock`). Each evaluation's numbers
are kept in `WORKDIR/validation.json` (`{"steps": {"500": {"mIoU": 92.03, ...}}}`), so a
rerun of a finished run returns them without training or evaluating again.

A project provides a model (`flax_model`, `init_variables(rng, input_shape)`,
`loss_function(outputs, batch)` or `loss_and_metrics(outputs, batch) -> (loss, {name:
scalar})`), a dataset (`meta_data` with `input_shape`, `num_classes` and `train_loader`)
and an `Evaluation`.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cvt_backbone.tools import write_json
from projects.training import checkpoints, optim, workdir_lock

log = logging.getLogger(__name__)


class Evaluation(Protocol):
  """A project's periodic evaluation: `__call__(variables)` scores the validation split (on
  process-local variables); `scalars` go to TensorBoard as `valid/<name>`; `describe` gives
  the line printed after `step N: validation `."""

  scalars: Sequence[str]

  def __call__(self, variables: dict[str, Any]) -> dict[str, Any]: ...

  def describe(self, summary: dict[str, Any]) -> str: ...


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  variables: dict[str, Any]  # {'params': ..., 'batch_stats': ...}
  opt_state: Any
  rng: jax.Array


def train_step(state: TrainState, batch: dict[str, jax.Array], *, flax_model: Any, loss_fn: Any,
               tx: optax.GradientTransformation,
               schedule: optax.Schedule) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer micro-step on a global batch; `loss_fn` returns the loss or `(loss,
  {name: scalar})`, logged next to it."""
  dropout_rng = jax.random.fold_in(state.rng, state.step)

  def compute_loss(params):
    outputs, mutated = flax_model.apply(
        {**state.variables, 'params': params}, batch['inputs'], train=True,
        mutable=['batch_stats'], rngs={'dropout': dropout_rng})
    loss = loss_fn(outputs, batch)
    loss, parts = loss if isinstance(loss, tuple) else (loss, {})
    return loss, (mutated, parts)

  params = state.variables['params']
  (loss, (mutated, parts)), grads = jax.value_and_grad(compute_loss, has_aux=True)(params)
  updates, opt_state = tx.update(grads, state.opt_state, params)
  params = optax.apply_updates(params, updates)
  variables = {**state.variables, **mutated, 'params': params}
  metrics = {'loss': loss, **parts, 'grad_norm': optax.global_norm(grads),
             'learning_rate': schedule(_update_count(opt_state, state.step))}
  return state.replace(step=state.step + 1, variables=variables, opt_state=opt_state), metrics


def jit_train_step(*, flax_model: Any, loss_fn: Any, tx: optax.GradientTransformation,
                   schedule: optax.Schedule, **jit_kwargs: Any) -> Any:
  """`train_step` jitted with the state donated, as `train` runs it."""
  return jax.jit(
      functools.partial(train_step, flax_model=flax_model, loss_fn=loss_fn, tx=tx,
                        schedule=schedule),
      donate_argnums=(0,), **jit_kwargs)


class CompiledSteps:
  """A jitted step compiled ahead of its first call, once per batch structure.

  The compiler's working memory (about 1 GB for CvT-13 + UPerNet) stays resident in the
  allocator's heap, unusable by the step's buffers; handing it back to the OS between
  compiling and running makes the process peak at the step's memory, not at both.
  """

  def __init__(self, step_fn: Any):
    self._step_fn = step_fn
    self._compiled: dict[Any, Any] = {}

  def __call__(self, state: Any, batch: Any) -> Any:
    key = jax.tree.structure(batch), tuple((x.shape, x.dtype) for x in jax.tree.leaves(batch))
    if key not in self._compiled:
      self._compiled[key] = self._step_fn.lower(state, batch).compile()
      release_freed_memory()
    return self._compiled[key](state, batch)


def release_freed_memory() -> None:
  """Returns the C heap's free pages to the OS (glibc's `malloc_trim`; elsewhere nothing)."""
  try:
    libc = ctypes.CDLL('libc.so.6')
  except OSError:
    return
  trim = getattr(libc, 'malloc_trim', None)
  if trim is not None:
    trim(0)


def _update_count(opt_state: Any, step: jax.Array) -> jax.Array:
  """The optimizer-update count (differs from the step with gradient accumulation)."""
  if isinstance(opt_state, optax.MultiStepsState):
    return opt_state.gradient_step
  return step


def put_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Process-local numpy batch -> global arrays sharded over the 'data' axis."""
  return jax.tree.map(
      lambda v: jax.make_array_from_process_local_data(sharding, np.asarray(v)), batch)


def local_variables(variables: Any) -> Any:
  """Process-local copies of replicated variables (each process scores its own slice)."""
  if jax.process_count() == 1:
    return variables
  return jax.tree.map(lambda x: x.addressable_data(0), variables)


def _train_batches(dataset: Any, start_step: int) -> Iterator[dict[str, np.ndarray]]:
  meta = dataset.meta_data
  if meta.get('train_start_step', 0) == start_step:
    return dataset.train_iter
  if 'train_loader' not in meta:
    raise ValueError(
        f'Resuming at step {start_step}, but the dataset iterator starts at step '
        f'{meta.get("train_start_step", 0)} and has no train_loader to restart it.')
  return meta['train_loader'].iterate(start_step)


def progress_line(step: int, total: int, start_step: int, started: float,
                  metrics: dict[str, float]) -> str:
  """`step 50/500 | 1.23 steps/s | ETA 0:06:05 | loss=... ...`."""
  elapsed = time.perf_counter() - started
  rate = (step - start_step) / max(elapsed, 1e-9)
  eta = (total - step) / max(rate, 1e-9)
  values = ' '.join(f'{k}={v:.4g}' for k, v in metrics.items())
  hours, rest = divmod(int(eta), 3600)
  return (f'step {step}/{total} | {rate:.2f} steps/s | ETA {hours}:{rest // 60:02d}:{rest % 60:02d}'
          f' | {values}')


def _loss_fn(model: Any) -> Any:
  return getattr(model, 'loss_and_metrics', None) or model.loss_function


def initial_state(config: Any, model: Any, meta: Any, rng: jax.Array) -> tuple[
    TrainState, optax.GradientTransformation, optax.Schedule]:
  """The step-0 state of a run, its optimizer and its learning-rate schedule."""
  init_rng, train_rng = jax.random.split(rng)
  variables = model.init_variables(init_rng, tuple(meta['input_shape']))
  tx, schedule = optim.make_optimizer(config, variables['params'], int(config.num_training_steps))
  state = TrainState(step=jnp.asarray(0, jnp.int32), variables=variables,
                     opt_state=tx.init(variables['params']), rng=train_rng)
  return state, tx, schedule


def train(*, rng: jax.Array, config: Any, model: Any, dataset: Any, workdir: str, writer: Any,
          evaluation: Evaluation) -> tuple[TrainState, dict[str, Any]]:
  """Trains `model` on `dataset` as `config` says; returns the final state and the last
  evaluation summary. Process 0 holds `workdir_lock` until the last checkpoint is complete.
  """
  # Process 0 holds the lock for the processes of its run, which share the workdir.
  lead = jax.process_index() == 0
  with workdir_lock.hold(workdir) if lead else contextlib.nullcontext():
    return _train(rng=rng, config=config, model=model, dataset=dataset, workdir=workdir,
                  writer=writer, evaluation=evaluation)


def _train(*, rng: jax.Array, config: Any, model: Any, dataset: Any, workdir: str, writer: Any,
           evaluation: Evaluation) -> tuple[TrainState, dict[str, Any]]:
  meta = dataset.meta_data
  flax_model = model.flax_model
  num_classes = int(meta['num_classes'])
  total_steps = int(config.num_training_steps)

  # Auto axes: XLA propagates the batch sharding through the model (GSPMD).
  mesh = jax.make_mesh((jax.device_count(),), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  replicated = NamedSharding(mesh, P())
  data_sharding = NamedSharding(mesh, P('data'))
  if config.batch_size % jax.device_count():
    raise ValueError(f'batch_size {config.batch_size} is not divisible by the '
                     f'{jax.device_count()} devices.')

  state, tx, schedule = initial_state(config, model, meta, rng)
  state = jax.device_put(state, replicated)

  metadata = checkpoints.model_metadata(config, num_classes, meta)
  mngr = checkpoints.manager(workdir, max_to_keep=config.get('max_checkpoints_to_keep', 3))
  try:
    # The newest checkpoint that restores and verifies (damaged ones are skipped).
    abstract = jax.tree.map(ocp_abstract(replicated), state)
    start_step, restored, skipped = checkpoints.restore_latest(mngr, abstract, metadata)
  except BaseException:
    mngr.close()
    raise
  lead = jax.process_index() == 0  # prints once, not once per process
  if restored is not None:
    state = restored
    if lead and start_step < total_steps:
      why = '; '.join(f'step {step} skipped: {reason}' for step, reason in skipped)
      print(f'Resuming from the checkpoint of step {start_step} in '
            f'{checkpoints.checkpoint_dir(workdir)}' + (f' ({why})' if why else ''), flush=True)
  if start_step >= total_steps:
    try:
      return state, _finished_run(workdir, start_step, total_steps, state, evaluation, writer,
                                  lead)
    finally:
      checkpoints.close(mngr)

  step_fn = CompiledSteps(jit_train_step(
      flax_model=flax_model, loss_fn=_loss_fn(model), tx=tx, schedule=schedule,
      in_shardings=(replicated, data_sharding), out_shardings=(replicated, replicated)))

  log_every = int(config.get('log_summary_steps', 50))
  eval_every = int(config.get('log_eval_steps', 0)) or total_steps
  ckpt_every = int(config.get('checkpoint_steps', 0)) or total_steps
  batches = _train_batches(dataset, start_step)
  started = time.perf_counter()
  summary: dict[str, Any] = {}
  pending: list[dict[str, jax.Array]] = []
  try:
    for step in range(start_step + 1, total_steps + 1):
      state, step_metrics = step_fn(state, put_batch(next(batches), data_sharding))
      pending.append(step_metrics)
      log_now, save_now, eval_now = (step % every == 0 or step == total_steps
                                     for every in (log_every, ckpt_every, eval_every))
      if log_now or save_now or eval_now:
        # One host transfer per summary, not per step; a diverged step is found before its
        # state is saved or evaluated.
        host = jax.device_get(pending)
        _check_finite(host, step - len(host) + 1, mngr)
      if log_now:
        scalars = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
        pending = []
        writer.write_scalars(step, {f'train/{k}': v for k, v in scalars.items()})
        if lead:
          print(progress_line(step, total_steps, start_step, started, scalars), flush=True)
      if save_now:
        # Before the evaluation, which the save overlaps (orbax writes in the
        # background): an evaluation that fails loses no training.
        checkpoints.save(mngr, step, state, metadata)
      if eval_now:
        summary = _evaluate(evaluation, state, step, workdir, writer, lead)
        if lead:
          print(f'step {step}: validation {evaluation.describe(summary)}', flush=True)
      writer.flush()
  except BaseException:
    # The checkpoint being written is completed before the error propagates; a failure
    # to write it is logged, not raised over the error that stopped the run.
    checkpoints.close(mngr, raise_errors=False)
    raise
  # Never return with a checkpoint half-written by the async saver.
  checkpoints.close(mngr)
  return state, summary


def _check_finite(host_metrics: list[dict[str, Any]], first_step: int, mngr: Any) -> None:
  """`NonFiniteStateError` naming the first of these steps whose loss or gradients are NaN or
  inf, and the checkpoint that is left."""
  for step, metrics in enumerate(host_metrics, first_step):
    if np.isfinite(metrics['loss']) and np.isfinite(metrics['grad_norm']):
      continue
    last = mngr.latest_step()
    kept = ('no earlier checkpoint exists' if last is None else
            f'the checkpoint of step {last} in {mngr.directory} is the last, kept')
    raise checkpoints.NonFiniteStateError(
        f'Training diverged at step {step}: the loss is {metrics["loss"]:.4g} and the gradient '
        f'norm {metrics["grad_norm"]:.4g} at learning rate {metrics["learning_rate"]:.4g}. '
        f'Nothing from step {step} on is saved; {kept}. A lower optimizer.base_lr or an '
        'optimizer.grad_clip_norm may help; another --workdir starts over.')


VALIDATION_FILE = 'validation.json'


def _evaluate(evaluation: Evaluation, state: TrainState, step: int, workdir: str, writer: Any,
              lead: bool) -> dict[str, Any]:
  """Runs `evaluation`, writes its scalars to TensorBoard and keeps them in the workdir."""
  summary = evaluation(local_variables(state.variables))
  writer.write_scalars(step, {f'valid/{k}': float(summary[k]) for k in evaluation.scalars})
  if lead:
    _record_validation(workdir, step, summary)
  return summary


def _jsonable(summary: dict[str, Any]) -> dict[str, Any]:
  """The entries of a summary worth keeping: numbers and flat dicts of numbers (per class)."""
  def number(v):
    return isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool)

  kept = {}
  for key, value in summary.items():
    if number(value) or (np.ndim(value) == 0 and isinstance(value, (np.ndarray, jax.Array))):
      kept[key] = float(value)
    elif isinstance(value, dict) and value and all(number(v) for v in value.values()):
      kept[key] = {str(k): float(v) for k, v in value.items()}
  return kept


def read_validation(workdir: str | os.PathLike) -> dict[int, dict[str, Any]]:
  """`{step: summary}` of the evaluations kept in `workdir` (empty when none or unreadable)."""
  try:
    with open(os.path.join(workdir, VALIDATION_FILE)) as f:
      steps = json.load(f)['steps']
    return {int(step): _none_to_nan(values) for step, values in steps.items()}
  except (OSError, ValueError, KeyError, TypeError, AttributeError):
    return {}


def _none_to_nan(value: Any) -> Any:
  """JSON's null (how NaN is written) back to NaN."""
  if isinstance(value, dict):
    return {k: _none_to_nan(v) for k, v in value.items()}
  return math.nan if value is None else value


def _record_validation(workdir: str, step: int, summary: dict[str, Any]) -> None:
  steps = {str(k): v for k, v in read_validation(workdir).items()}
  steps[str(step)] = _jsonable(summary)
  ordered = dict(sorted(steps.items(), key=lambda item: int(item[0])))
  write_json({'steps': ordered}, os.path.join(workdir, VALIDATION_FILE))


def _finished_run(workdir: str, step: int, total_steps: int, state: TrainState,
                  evaluation: Evaluation, writer: Any, lead: bool) -> dict[str, Any]:
  """A rerun of a finished run: says so, and returns the last step's validation numbers."""
  summary = read_validation(workdir).get(step)
  recorded = summary is not None and all(k in summary for k in evaluation.scalars)
  if lead:
    beyond = f' (num_training_steps is {total_steps})' if step > total_steps else ''
    where = (f'; its validation is recorded in {os.path.join(workdir, VALIDATION_FILE)}'
             if recorded else '')
    print(f'Already trained to step {step}{beyond}: the checkpoint in '
          f'{checkpoints.checkpoint_dir(workdir)}{where}. Nothing to train; use another '
          f'--workdir, or a larger num_training_steps to continue.', flush=True)
  if recorded:
    return summary
  if lead:
    print(f'No validation of step {step} is recorded; evaluating its checkpoint.', flush=True)
  summary = _evaluate(evaluation, state, step, workdir, writer, lead)
  if lead:
    print(f'step {step}: validation {evaluation.describe(summary)}', flush=True)
  writer.flush()
  return summary


def ocp_abstract(sharding: NamedSharding):
  """Leaf -> ShapeDtypeStruct with `sharding`, the target orbax restores into."""

  def to_abstract(leaf):
    leaf = jnp.asarray(leaf)
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

  return to_abstract
