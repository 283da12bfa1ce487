"""Trains a CvT detector: the Scenic project's entry point.

  python -m projects.cvt_detection.main --config=CONFIG.py[:ARGS] --workdir=DIR

Rerunning with the same --workdir resumes from the latest checkpoint.
"""

from __future__ import annotations

from typing import Any

import jax

from projects.cvt_detection import coco_eval, models, trainer
from projects.cvt_detection.configs import common
from projects.cvt_detection.data import builder
from projects.training import app, configs


def _report(summary: dict[str, Any]) -> str:
  return 'Final validation (COCO box metrics, %):\n' + coco_eval.format_table(summary)


def main(rng: jax.Array, config: Any, workdir: str, writer: Any) -> dict[str, Any]:
  """Scenic's `main`: checks the config, trains, prints the final COCO metrics."""
  configs.check_config(config, common.CONFIG_KEYS)
  return app.train_main(rng, config, workdir, writer, builder.get_dataset, models.get_model_cls,
                        trainer.train, _report)


if __name__ == '__main__':
  app.run(main)
