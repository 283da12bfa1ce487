"""Segmentation fine-tuning: the shared training loop (`projects.training.loop`) with mIoU.

`train` has Scenic's trainer signature; the periodic evaluation of mIoU/aAcc/mAcc on the
validation split uses the same code and settings (`config.eval`) as `evaluate.py`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np

from projects.cvt_segmentation import metrics as metrics_lib
from projects.training import loop


def eval_logits(variables: dict[str, Any], images: jax.Array, *, flax_model: Any) -> jax.Array:
  return flax_model.apply(variables, images, train=False)['logits']


class SegmentationEvaluation:
  """mIoU, aAcc, mAcc over one pass of the validation split (exact, full resolution).

  In percent, as mmsegmentation reports them and `evaluate` writes them: the progress lines,
  TensorBoard's `valid/*` scalars and `validation.json` all read 92.03, not 0.9203.
  """

  scalars = ('mIoU', 'aAcc', 'mAcc')

  def __init__(self, flax_model: Any, dataset: Any, num_classes: int, config: Any):
    from projects.cvt_segmentation.inference import inference_settings

    self.dataset = dataset
    self.num_classes = num_classes
    # config.eval read exactly as `evaluate.py` reads it.
    self.infer_kwargs = inference_settings(config).infer_kwargs()
    # Built once: one compiled program per input shape for the whole run.
    self.logits_jit = jax.jit(functools.partial(eval_logits, flax_model=flax_model))

  def __call__(self, variables: dict[str, Any]) -> dict[str, Any]:
    from projects.cvt_segmentation import inference

    meta = self.dataset.meta_data
    if 'eval_loader' in meta:
      batches = meta['eval_loader'].iterate()
    else:
      batches = (next(self.dataset.valid_iter) for _ in range(meta['num_eval_batches']))
    confusion = inference.evaluate_dataset(
        functools.partial(self.logits_jit, variables), batches, self.num_classes,
        **self.infer_kwargs)
    if jax.process_count() > 1:
      # Each process scored its own slice of the split.
      from jax.experimental import multihost_utils

      confusion = np.asarray(multihost_utils.process_allgather(confusion)).sum(0)
    fractions = metrics_lib.segmentation_metrics(confusion)
    return {'confusion': confusion, **{k: 100 * v for k, v in fractions.items()}}

  def describe(self, summary: dict[str, Any]) -> str:
    return describe(summary)


def describe(summary: dict[str, Any]) -> str:
  """'mIoU 92.03  aAcc 98.50  mAcc 96.21' (percent, two decimals as mmsegmentation)."""
  return '  '.join(f'{k} {summary[k]:.2f}' for k in SegmentationEvaluation.scalars)


def train(*, rng: jax.Array, config: Any, model_cls: Any, dataset: Any, workdir: str,
          writer: Any) -> tuple[loop.TrainState, dict[str, Any]]:
  """Trains `model_cls(config, dataset.meta_data)`; returns the state and last evaluation."""
  model = model_cls(config, dataset.meta_data)
  evaluation = SegmentationEvaluation(model.flax_model, dataset,
                                      int(dataset.meta_data['num_classes']), config)
  return loop.train(rng=rng, config=config, model=model, dataset=dataset, workdir=workdir,
                    writer=writer, evaluation=evaluation)
