"""Detection training: the shared training loop with periodic COCO evaluation.

`train(*, rng, config, model_cls, dataset, workdir, writer)` is Scenic's trainer signature;
the loop (mesh, optimizer, checkpoints and exact resume, progress, writers) is
`projects.training.loop`, the evaluation `evaluation.DetectionEvaluation`.
"""

from __future__ import annotations

from typing import Any

import jax

from projects.cvt_detection.configs import common
from projects.cvt_detection.evaluation import DetectionEvaluation
from projects.training import loop


def train(*, rng: jax.Array, config: Any, model_cls: Any, dataset: Any, workdir: str,
          writer: Any) -> tuple[loop.TrainState, dict[str, Any]]:
  """Trains `model_cls(config, dataset.meta_data)`; returns the state and last evaluation.

  Raises:
    ConfigKeyError: a key of `config` that the project does not read (a typo), before any
      work; also when Scenic's own main calls the trainer with a user's config.
  """
  common.check_config(config)
  model = model_cls(config, dataset.meta_data)
  return loop.train(rng=rng, config=config, model=model, dataset=dataset, workdir=workdir,
                    writer=writer, evaluation=DetectionEvaluation(model, dataset))
