"""Detection training: the shared training loop (`projects.training.loop`) with COCO AP.

`train` has Scenic's trainer signature; the evaluation is `evaluation.DetectionEvaluation`.
"""

from __future__ import annotations

from typing import Any

import jax

from projects.cvt_detection.evaluation import DetectionEvaluation
from projects.training import loop


def train(*, rng: jax.Array, config: Any, model_cls: Any, dataset: Any, workdir: str,
          writer: Any) -> tuple[loop.TrainState, dict[str, Any]]:
  """Trains `model_cls(config, dataset.meta_data)`; returns the state and last evaluation."""
  model = model_cls(config, dataset.meta_data)
  return loop.train(rng=rng, config=config, model=model, dataset=dataset, workdir=workdir,
                    writer=writer, evaluation=DetectionEvaluation(model, dataset))
