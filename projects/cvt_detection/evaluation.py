"""COCO box evaluation of a detection model over a split: the trainer's and `evaluate`'s code.

`detect_split(predict, loader)` runs the jitted model + post-processing (`models.predict_fn`)
over every batch of an `EvalLoader` and returns COCO result dicts; on several processes each
scores its slice and the fixed-size detections are gathered. `DetectionEvaluation` is the
trainer's periodic evaluation (`projects.training.loop.Evaluation`): AP, AP50, AP75, APs, APm,
APl and per-class AP with faster-coco-eval.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import numpy as np

from projects.cvt_detection import coco_eval
from projects.cvt_detection.data.builder import EVAL_DEVICE_KEYS

PredictFn = Callable[..., dict[str, jax.Array]]
# Written to TensorBoard as valid/<name> and printed by the trainer.
SUMMARY = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl')


def detect_batches(predict: PredictFn, variables: Any,
                   batches: Iterable[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Detections of every real image of `batches`, as host arrays with a leading image axis.

  Returns:
    `{'boxes' [N, D, 4] (original pixels), 'scores' [N, D], 'classes' [N, D], 'valid'
    [N, D], 'image_id' [N]}` over the images with `batch_mask` 1 (this process's only).
  """
  parts = []
  for batch in batches:
    out = predict(variables, *(batch[k] for k in EVAL_DEVICE_KEYS))
    out = dict(jax.device_get(out), image_id=batch['image_id'])
    keep = np.asarray(batch['batch_mask']) > 0
    parts.append({k: np.asarray(v)[keep] for k, v in out.items()})
  if not parts:
    raise ValueError('detect_batches got no batches: is the evaluation split empty?')
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def gather_processes(detections: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Every process's detections (each scored its own slice of the split), on every process."""
  if jax.process_count() == 1:
    return detections
  from jax.experimental import multihost_utils

  # Processes hold different numbers of real images: pad to the largest, then drop padding.
  count = np.asarray(multihost_utils.process_allgather(np.int32(len(detections['image_id']))))
  most = int(count.max())
  padded = {k: np.concatenate([v, np.zeros((most - len(v), *v.shape[1:]), v.dtype)])
            for k, v in detections.items()}
  gathered = multihost_utils.process_allgather(padded)
  return {k: np.concatenate([np.asarray(v)[p, :n] for p, n in enumerate(count)])
          for k, v in gathered.items()}


def to_results(detections: dict[str, np.ndarray],
               label_to_category_id: Sequence[int]) -> list[dict[str, Any]]:
  """`detect_batches` output as COCO result dicts (image_id, category_id, bbox, score)."""
  d = detections['boxes'].shape[1]
  return coco_eval.to_coco_results(
      detections['boxes'].reshape(-1, 4), detections['scores'].reshape(-1),
      detections['classes'].reshape(-1), np.repeat(detections['image_id'], d),
      label_to_category_id, valid=detections['valid'].reshape(-1))


class DetectionEvaluation:
  """COCO box AP over one pass of the validation split, with the `evaluate` tool's code."""

  scalars = SUMMARY

  def __init__(self, model: Any, dataset: Any):
    meta = dataset.meta_data
    self.loader = meta['eval_loader']
    self.label_to_category_id = meta['category_ids']
    # Parsed once; COCOeval reads it at every evaluation.
    self.ground_truth = coco_eval.load_ground_truth(meta['ground_truth'])
    # Built once: one compiled program per canvas size for the whole run.
    self.predict = model.predict_fn()

  def __call__(self, variables: dict[str, Any]) -> dict[str, Any]:
    detections = gather_processes(detect_batches(self.predict, variables, self.loader.iterate()))
    results = to_results(detections, self.label_to_category_id)
    return dict(coco_eval.evaluate_boxes(self.ground_truth, results), results=results)

  def describe(self, summary: dict[str, Any]) -> str:
    """'AP 64.3  AP50 88.7 ...': percent, as the tables print COCO's fractions."""
    return '  '.join(f'{k} {100 * summary[k]:.1f}' for k in SUMMARY)
