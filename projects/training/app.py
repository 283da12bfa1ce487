"""Runs a project's `main(rng, config, workdir, writer)` as Scenic runs it, and that main.

Under `scenic.app` when Scenic is importable, else with the same flags through absl
(`--config=CONFIG.py[:ARGS]`, `--workdir=DIR`, a TensorBoard writer without TensorFlow);
both add `--coordinator_address`, `--num_processes`, `--process_id` for several processes.
A user's mistake prints one line, `error: ...`: a `--config.x` flag naming no key (exit
status 2, before the flags are parsed); from `main`, an unknown config key, invalid data, a
missing file, a workdir in use, unusable checkpoints, a full disk or a diverging run (status 1).
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

# TensorFlow (imported by Scenic and its metric writer; runs without Scenic do not import
# it) prints start-up notices; silence them before anything imports it.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from projects.training import xla_flags  # noqa: E402

# Before JAX creates its backend, which reads them once.
xla_flags.set_training_flags()

import jax  # noqa: E402

from projects.training import checkpoints, configs  # noqa: E402
from projects.training.scenic_compat import quiet_library_logs, scenic_available  # noqa: E402

MainFn = Callable[[jax.Array, Any, str, Any], Any]


def build_dataset(get_dataset: Callable[..., Any], config: Any, start_step: int = 0) -> Any:
  """`get_dataset` (a project's `data.builder.get_dataset`) for `config`, from `start_step`."""
  return get_dataset(
      config.dataset_name, batch_size=config.batch_size, eval_batch_size=config.eval_batch_size,
      seed=config.rng_seed, start_step=start_step,
      process_index=jax.process_index(), process_count=jax.process_count(),
      dtype_str=config.get('data_dtype_str', 'float32'), **config.dataset_configs.to_dict())


def train_main(rng: jax.Array, config: Any, workdir: str, writer: Any,
               get_dataset: Callable[..., Any], get_model_cls: Callable[[str], Any],
               train: Callable[..., Any], report: Callable[[dict], str]) -> dict[str, Any]:
  """The body of a project's `main` for a checked `config`: builds data and model, trains.

  Resumes from the workdir's latest checkpoint; process 0 prints `report(summary)` of the
  last evaluation and where the checkpoints and logs are.
  """
  dataset = build_dataset(get_dataset, config, checkpoints.latest_step(workdir) or 0)
  _, summary = train(rng=rng, config=config, model_cls=get_model_cls(config.model_name),
                     dataset=dataset, workdir=workdir, writer=writer)
  if jax.process_index() > 0:
    return summary
  if summary:
    print(report(summary))
  print(f'Checkpoints: {checkpoints.checkpoint_dir(workdir)}')
  print(f'TensorBoard logs: {workdir}  (tensorboard --logdir {workdir})')
  return summary


def _config_file() -> str | None:
  """The `--config` file, once absl has parsed the flags."""
  from absl import flags
  from ml_collections import config_flags

  try:
    return config_flags.get_config_filename(flags.FLAGS['config'])
  except (KeyError, TypeError, AttributeError):
    return None


def user_errors_in_one_line(main: MainFn) -> MainFn:
  """`main` printing a user's mistakes as one line, `error: ...`, status 1.

  Their message says what is wrong and where; a traceback would bury it. Other exceptions
  (bugs) keep their traceback.
  """
  from projects.training.datasets import DatasetError
  from projects.training.workdir_lock import WorkdirInUseError

  one_line = (configs.ConfigError, DatasetError, FileNotFoundError, WorkdirInUseError,
              checkpoints.CheckpointMismatchError, checkpoints.CheckpointCorruptError,
              checkpoints.CheckpointWriteError, checkpoints.NonFiniteStateError)

  @functools.wraps(main)
  def run(*args: Any, **kwargs: Any) -> Any:  # scenic.app passes keywords
    try:
      return main(*args, **kwargs)
    except one_line as error:
      if isinstance(error, configs.ConfigError) and error.source is None and _config_file():
        error.source = f'config {_config_file()}'
      print(f'error: {error}', file=sys.stderr, flush=True)
      sys.exit(1)

  return run


def _config_spec(argv: list[str]) -> str | None:
  """The value of `--config` in `argv` (`--config=SPEC` or `--config SPEC`), if any."""
  for i, arg in enumerate(argv):
    name, eq, value = arg.partition('=')
    if name in ('--config', '-config'):
      if eq:
        return value
      return argv[i + 1] if i + 1 < len(argv) else None
  return None


def check_config_flags(argv: list[str]) -> None:
  """Exits with `error: unknown config key ...` (status 2) for a misspelled `--config.x`.

  ml_collections raises for it while absl parses the flags, a chain of three tracebacks;
  checked here first against the config file's keys. Anything else about the flags
  (a config file that fails to load, a bad value) is left to absl to report.
  """
  spec = _config_spec(argv)
  overrides = ('--config.', '--noconfig.', '-config.', '-noconfig.')
  if spec is None or not any(arg.startswith(overrides) for arg in argv):
    return
  try:
    config = configs.load_config(spec)
  except Exception:  # noqa: BLE001  (reported by absl's own parsing, as without this check)
    return
  try:
    configs.check_config_overrides(config, argv)
  except configs.ConfigKeyError as error:
    print(f'error: {error}', file=sys.stderr, flush=True)
    sys.exit(2)


def _run_without_scenic(main: MainFn) -> None:
  """The same flags and setup as `scenic.app.run`, without Scenic."""
  from absl import app, flags
  from ml_collections import config_flags

  # Not clu's default writer: it imports TensorFlow (seconds of start-up, its notices).
  from projects.training import metric_writer

  config_flags.DEFINE_config_file('config', None, 'Training configuration.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Work unit directory.')
  flags.mark_flags_as_required(['config', 'workdir'])

  def run(argv):
    del argv
    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    # Event files from process 0 only; the others log.
    writer = metric_writer.create_default_writer(
        workdir, just_logging=jax.process_index() > 0)
    main(jax.random.PRNGKey(config.rng_seed), config, workdir, writer)
    writer.close()

  app.run(run)


def _define_distributed_flags() -> None:
  """`--coordinator_address`, `--num_processes`, `--process_id`: a multi-process run."""
  from absl import app, flags

  from projects.training import launch

  flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-process)')
  flags.DEFINE_integer('num_processes', None, 'processes in a multi-process run')
  flags.DEFINE_integer('process_id', None, 'this process in a multi-process run')

  def start() -> None:
    f = flags.FLAGS
    try:
      launch.initialize(f.coordinator_address, f.num_processes, f.process_id)
    except ValueError as error:  # the run's settings, not a bug: one line
      print(f'error: {error}', file=sys.stderr, flush=True)
      sys.exit(1)

  # After the flags are parsed and before anything uses a JAX device.
  app.call_after_init(start)


def run(main: MainFn) -> None:
  """Parses the flags and calls `main(rng, config, workdir, writer)`."""
  check_config_flags(sys.argv)
  # The progress and evaluation lines are printed; library INFO logs (orbax, clu,
  # Scenic's start-up) are noise unless asked for with --verbosity=0.
  quiet_library_logs()
  _define_distributed_flags()
  main = user_errors_in_one_line(main)
  if scenic_available():
    from scenic import app as scenic_app

    scenic_app.run(main)
  else:
    _run_without_scenic(main)
