"""Runs a project's `main(rng, config, workdir, writer)` as Scenic runs it.

Under `scenic.app` when Scenic is importable (its flags, logging and metric writer), and
with the same flags through absl when it is not (`--config=CONFIG.py[:ARGS]`,
`--workdir=DIR`, a clu metric writer). Both add the multi-process flags
`--coordinator_address`, `--num_processes`, `--process_id` (`projects.distributed`).
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

# TensorFlow (imported by clu's TensorBoard writer and Scenic) prints start-up
# notices; silence them before anything imports it.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # noqa: E402

from projects.scenic_compat import quiet_library_logs, scenic_available  # noqa: E402

MainFn = Callable[[jax.Array, Any, str, Any], Any]


def _user_errors_in_one_line(main: MainFn) -> MainFn:
  """`main` printing invalid data and missing files as `error: ...`, exit status 1.

  The message of these errors says what is wrong and where; a traceback would bury it.
  Other exceptions (bugs) keep their traceback.
  """
  from projects.training.datasets import DatasetError

  @functools.wraps(main)
  def run(*args: Any, **kwargs: Any) -> Any:  # scenic.app passes keywords
    try:
      return main(*args, **kwargs)
    except (DatasetError, FileNotFoundError) as error:
      print(f'error: {error}', file=sys.stderr, flush=True)
      sys.exit(1)

  return run


def _run_without_scenic(main: MainFn) -> None:
  """The same flags and setup as `scenic.app.run`, without Scenic."""
  from absl import app, flags
  from clu import metric_writers
  from ml_collections import config_flags

  config_flags.DEFINE_config_file('config', None, 'Training configuration.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Work unit directory.')
  flags.mark_flags_as_required(['config', 'workdir'])

  def run(argv):
    del argv
    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    writer = metric_writers.create_default_writer(
        workdir, just_logging=jax.process_index() > 0, asynchronous=True)
    main(jax.random.PRNGKey(config.rng_seed), config, workdir, writer)
    writer.close()

  app.run(run)


def _define_distributed_flags() -> None:
  """`--coordinator_address`, `--num_processes`, `--process_id`: a multi-process run."""
  from absl import app, flags

  from projects import distributed

  flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-process)')
  flags.DEFINE_integer('num_processes', None, 'processes in a multi-process run')
  flags.DEFINE_integer('process_id', None, 'this process in a multi-process run')

  def start() -> None:
    f = flags.FLAGS
    distributed.initialize(f.coordinator_address, f.num_processes, f.process_id)

  # After the flags are parsed and before anything uses a JAX device.
  app.call_after_init(start)


def run(main: MainFn) -> None:
  """Parses the flags and calls `main(rng, config, workdir, writer)`."""
  # The progress and evaluation lines are printed; library INFO logs (orbax, clu,
  # Scenic's start-up) are noise unless asked for with --verbosity=0.
  quiet_library_logs()
  _define_distributed_flags()
  main = _user_errors_in_one_line(main)
  if scenic_available():
    from scenic import app as scenic_app

    scenic_app.run(main)
  else:
    _run_without_scenic(main)
