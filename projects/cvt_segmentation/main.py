"""Fine-tunes a CvT segmentation model: the Scenic project's entry point.

  python -m projects.cvt_segmentation.main --config=CONFIG.py[:ARGS] --workdir=DIR

Under `scenic.app` when Scenic is importable (its flags, logging and metric
writer), and with the same flags through absl when it is not. Rerunning with
the same --workdir resumes from the latest checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

# TensorFlow (imported by clu's TensorBoard writer and Scenic) prints start-up
# notices; silence them before anything imports it.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # noqa: E402

from projects.cvt_segmentation import checkpoints, models, trainer  # noqa: E402
from projects.cvt_segmentation.data import builder  # noqa: E402
from projects.scenic_compat import quiet_library_logs, scenic_available  # noqa: E402, F401


def build_dataset(config: Any, start_step: int = 0) -> builder.Dataset:
  """The config's dataset, its training stream starting at `start_step`."""
  return builder.get_dataset(
      config.dataset_name, batch_size=config.batch_size, eval_batch_size=config.eval_batch_size,
      seed=config.rng_seed, start_step=start_step,
      process_index=jax.process_index(), process_count=jax.process_count(),
      dtype_str=config.get('data_dtype_str', 'float32'), **config.dataset_configs.to_dict())


def main(rng: jax.Array, config: Any, workdir: str, writer: Any) -> dict[str, Any]:
  """Scenic's `main(rng, config, workdir, writer)`: builds the data and model, trains."""
  dataset = build_dataset(config, start_step=checkpoints.latest_step(workdir) or 0)
  model_cls = models.get_model_cls(config.model_name)
  _, summary = trainer.train(rng=rng, config=config, model_cls=model_cls, dataset=dataset,
                             workdir=workdir, writer=writer)
  if jax.process_index() > 0:
    return summary
  if summary:
    print(f'Final validation: mIoU {summary["mIoU"]:.4f}  aAcc {summary["aAcc"]:.4f}  '
          f'mAcc {summary["mAcc"]:.4f}')
  print(f'Checkpoints: {checkpoints.checkpoint_dir(workdir)}')
  print(f'TensorBoard logs: {workdir}  (tensorboard --logdir {workdir})')
  return summary


def _run_without_scenic() -> None:
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


if __name__ == '__main__':
  # The progress and evaluation lines are printed; library INFO logs (orbax, clu,
  # Scenic's start-up) are noise unless asked for with --verbosity=0.
  quiet_library_logs()
  _define_distributed_flags()
  if scenic_available():
    from scenic import app as scenic_app

    scenic_app.run(main)
  else:
    _run_without_scenic()
