"""Trains a CvT model with Scenic's own `classification_trainer`, models and dataset registry.

  python -m projects.cvt_scenic_example.main \
    --config=projects/cvt_scenic_example/configs/synthetic.py --workdir=workdirs/scenic_example

Needs google-research/scenic. Does what `scenic.main` does (it cannot be imported without
big_vision): registers the CvT models and datasets, looks them up in Scenic's registries
and hands them to the trainer.
"""

from __future__ import annotations

import os
import sys
from typing import Any

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from projects.training import xla_flags  # noqa: E402

# XLA's memory-minimising scheduler on CPU, before JAX creates its backend (README,
# "Training speed"): a Scenic main of your own can do the same.
xla_flags.set_training_flags()

import jax  # noqa: E402
from scenic import app  # noqa: E402
from scenic.model_lib import models as scenic_models  # noqa: E402
from scenic.train_lib import classification_trainer, train_utils  # noqa: E402

from projects.cvt_scenic_example.configs import common as configs_common  # noqa: E402
from projects.cvt_scenic_example.model import CvTLinearSegmentationModel  # noqa: E402
from projects.cvt_segmentation import models as segmentation_models  # noqa: E402
from projects.cvt_segmentation.data import register_with_scenic as register_datasets  # noqa: E402
from projects.training import configs, scenic_compat  # noqa: E402
from projects.training.app import check_config_flags, user_errors_in_one_line  # noqa: E402


def register() -> None:
  """Adds the CvT models and the project's datasets to Scenic's registries."""
  segmentation_models.register_with_scenic()
  scenic_compat.register_models({'cvt_linear_segmentation': CvTLinearSegmentationModel})
  register_datasets()


class EchoWriter:
  """A clu metric writer that also prints the summaries (Scenic logs them at INFO only)."""

  def __init__(self, writer: Any):
    self._writer = writer

  def write_scalars(self, step: int, scalars: dict[str, Any]) -> None:
    self._writer.write_scalars(step, scalars)
    if not any(k.startswith(('train_', 'valid_')) for k in scalars):
      return
    values = '  '.join(f'{k} {float(v):.4g}' for k, v in sorted(scalars.items()))
    print(f'step {step}: {values}', flush=True)

  def __getattr__(self, name: str) -> Any:
    return getattr(self._writer, name)


def main(rng: jax.Array, config: Any, workdir: str, writer: Any) -> tuple[Any, Any, Any]:
  """Scenic's `main(rng, config, workdir, writer)`: registries -> `classification_trainer`.

  A key of `config` that nothing reads (a typo) is a `ConfigKeyError` first: Scenic's
  configs are not locked and its trainer reads settings with defaults.
  """
  configs.check_config(config, configs_common.CONFIG_KEYS)
  register()
  writer = EchoWriter(writer)
  model_cls = scenic_models.get_model_cls(config.model_name)
  data_rng, rng = jax.random.split(rng)
  dataset = train_utils.get_dataset(config, data_rng)
  result = classification_trainer.train(rng=rng, config=config, model_cls=model_cls,
                                        dataset=dataset, workdir=workdir, writer=writer)
  eval_summary = result[2]
  print('Final validation: ' + '  '.join(f'{k} {float(v):.4f}'
                                          for k, v in sorted(eval_summary.items())))
  print(f'Checkpoints and TensorBoard logs: {workdir}')
  return result


if __name__ == '__main__':
  # A misspelled `--config.x` flag, invalid data or settings: one line, not tracebacks.
  check_config_flags(sys.argv)
  scenic_compat.quiet_library_logs()
  app.run(user_errors_in_one_line(main))  # bad data or settings: one `error:` line
