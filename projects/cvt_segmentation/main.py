"""Fine-tunes a CvT segmentation model: the Scenic project's entry point.

  python -m projects.cvt_segmentation.main --config=CONFIG.py[:ARGS] --workdir=DIR

Under `scenic.app` when Scenic is importable (its flags, logging and metric
writer), and with the same flags through absl when it is not (`projects.training.app`).
Rerunning with the same --workdir resumes from the latest checkpoint.
"""

from __future__ import annotations

from typing import Any

import jax

from projects.cvt_segmentation import models, trainer
from projects.cvt_segmentation.configs import common
from projects.cvt_segmentation.data import builder
from projects.training import app, checkpoints


def build_dataset(config: Any, start_step: int = 0) -> builder.Dataset:
  """The config's dataset, its training stream starting at `start_step`."""
  return builder.get_dataset(
      config.dataset_name, batch_size=config.batch_size, eval_batch_size=config.eval_batch_size,
      seed=config.rng_seed, start_step=start_step,
      process_index=jax.process_index(), process_count=jax.process_count(),
      dtype_str=config.get('data_dtype_str', 'float32'), **config.dataset_configs.to_dict())


def main(rng: jax.Array, config: Any, workdir: str, writer: Any) -> dict[str, Any]:
  """Scenic's `main(rng, config, workdir, writer)`: builds the data and model, trains.

  Raises:
    ConfigKeyError: a key of `config` that the project does not read (a typo), before any
      work.
  """
  common.check_config(config)
  dataset = build_dataset(config, start_step=checkpoints.latest_step(workdir) or 0)
  model_cls = models.get_model_cls(config.model_name)
  _, summary = trainer.train(rng=rng, config=config, model_cls=model_cls, dataset=dataset,
                             workdir=workdir, writer=writer)
  if jax.process_index() > 0:
    return summary
  if summary:
    print(f'Final validation (%): {trainer.describe(summary)}')
  print(f'Checkpoints: {checkpoints.checkpoint_dir(workdir)}')
  print(f'TensorBoard logs: {workdir}  (tensorboard --logdir {workdir})')
  return summary


if __name__ == '__main__':
  app.run(main)
