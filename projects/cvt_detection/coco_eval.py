"""COCO box AP with faster-coco-eval (pycocotools' `COCOeval` in C++, the same numbers).

From a detector's outputs to COCO numbers as mmdetection's `CocoMetric`
(mmdet/evaluation/metrics/coco_metric.py): `to_coco_results` (mmdet's `xyxy2xywh`, no
legacy +1, unrounded), `write_results_json`, `evaluate_boxes` (fractions in [0, 1], and
`classwise` per-category AP), `format_table` (percent). Crowd ground truth is matched and
ignored by COCOeval itself.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from faster_coco_eval import COCO, COCOeval_faster

from projects.tools.output_files import write_atomically

logger = logging.getLogger(__name__)

# COCOeval.stats order (pycocotools cocoeval.py `_summarizeDets`), under mmdet's names.
STAT_NAMES = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl',
              'AR1', 'AR10', 'AR100', 'ARs', 'ARm', 'ARl')
# The headline numbers of detection papers, in their usual order.
SUMMARY_NAMES = STAT_NAMES[:6]


def to_coco_results(
    boxes: Any, scores: Any, classes: Any, image_ids: Any,
    label_to_category_id: Sequence[int] | Mapping[int, int], *, valid: Any = None,
) -> list[dict[str, Any]]:
  """`[{'image_id', 'category_id', 'bbox': [x, y, w, h], 'score'}]` of the valid detections.

  Args:
    boxes: `[N, 4]` `(x1, y1, x2, y2)` in original-image pixels.
    classes: `[N]` contiguous labels `0..K-1`.
    image_ids: `[N]`, or one id for all.
    label_to_category_id: COCO category id of each label (sequence or mapping); COCO's 80
      categories have ids 1..90 with gaps.
    valid: optional `[N]` bool, False for padding (the fixed-size tail after a jit NMS).
  """
  boxes = np.asarray(boxes)
  if boxes.ndim != 2 or boxes.shape[-1] != 4:
    raise ValueError(f'to_coco_results expects boxes [N, 4] (x1, y1, x2, y2), got shape '
                     f'{boxes.shape}.')
  n = boxes.shape[0]
  scores = np.asarray(scores).reshape(-1)
  classes = np.asarray(classes).reshape(-1)
  image_ids = np.broadcast_to(np.asarray(image_ids), (n,)) if np.ndim(image_ids) == 0 else (
      np.asarray(image_ids).reshape(-1))
  valid = np.ones((n,), bool) if valid is None else np.asarray(valid, bool).reshape(-1)
  for name, value in (('scores', scores), ('classes', classes), ('image_ids', image_ids),
                      ('valid', valid)):
    if value.shape != (n,):
      raise ValueError(f'to_coco_results: {name} has {value.shape[0]} entries for {n} boxes; '
                       f'expected shape ({n},).')
  boxes, scores, classes, image_ids = (boxes[valid], scores[valid], classes[valid],
                                       image_ids[valid])
  if not np.isfinite(boxes).all() or not np.isfinite(scores).all():
    raise ValueError('to_coco_results: non-finite boxes or scores among the valid detections; '
                     'mark padding with `valid`.')

  if isinstance(label_to_category_id, Mapping):
    mapping = {int(k): int(v) for k, v in label_to_category_id.items()}
  else:
    mapping = {i: int(v) for i, v in enumerate(label_to_category_id)}
  unknown = sorted({int(c) for c in classes} - set(mapping))
  if unknown:
    raise ValueError(f'to_coco_results: labels {unknown[:10]} have no category id; '
                     f'label_to_category_id covers labels {sorted(mapping)[:10]}'
                     f'{"..." if len(mapping) > 10 else ""} ({len(mapping)} labels).')

  # mmdet `xyxy2xywh`: float32 box values, width and height as x2 - x1 and y2 - y1.
  xyxy = boxes.astype(np.float32).astype(np.float64)
  xywh = np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], axis=1)
  scores = scores.astype(np.float32)
  return [{'image_id': int(image_id), 'category_id': mapping[int(label)],
           'bbox': [float(v) for v in box], 'score': float(score)}
          for image_id, label, box, score in zip(image_ids, classes, xywh, scores, strict=True)]


def write_results_json(results: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> str:
  """Writes `to_coco_results` dicts to `path` atomically (the folder is created if needed)."""
  text = json.dumps(list(results), allow_nan=False)  # COCO tools reject NaN; fail here.
  return write_atomically(path, lambda f: f.write(text.encode()))


def load_ground_truth(ground_truth: str | os.PathLike | Mapping[str, Any] | COCO) -> COCO:
  """A `COCO` index of an instances json path or dict (a dict is deep-copied, not mutated)."""
  if isinstance(ground_truth, COCO):
    return ground_truth
  if isinstance(ground_truth, Mapping):
    missing = [k for k in ('images', 'annotations', 'categories') if k not in ground_truth]
    if missing:
      raise ValueError(f'COCO ground truth needs keys images, annotations and categories; '
                       f'{missing} missing (found {sorted(ground_truth)}).')
    return COCO(dict(ground_truth), use_deepcopy=True, print_function=logger.debug)
  path = os.fspath(ground_truth)
  if not os.path.isfile(path):
    raise ValueError(f'COCO ground truth file {path!r} does not exist.')
  return COCO(path, print_function=logger.debug)


def evaluate_boxes(
    ground_truth: str | os.PathLike | Mapping[str, Any] | COCO,
    results: Sequence[Mapping[str, Any]] | str | os.PathLike, *,
    image_ids: Sequence[int] | None = None) -> dict[str, Any]:
  """COCO box AP of `results` (dicts or a results json) against `ground_truth`.

  Args:
    ground_truth: an instances json path, its dict, or a `COCO` (reused: not re-read).
    image_ids: evaluate only these images (default: all; an image without detections
      counts its objects as misses).

  Returns:
    `STAT_NAMES` as fractions (NaN where COCOeval reports -1: no ground truth in that
    range) and `'per_class'`: `{category name: AP}` in category-id order (NaN without
    ground truth).
  """
  coco_gt = load_ground_truth(ground_truth)
  if isinstance(results, (str, os.PathLike)):
    with open(results) as f:
      results = json.load(f)
  # loadRes adds keys ('area', 'id', 'segmentation', ...) to the dicts it gets: copy them.
  results = [dict(r) for r in results]
  _check_results(coco_gt, results)

  coco_dt = coco_gt.loadRes(results)
  evaluator = COCOeval_faster(coco_gt, coco_dt, iouType='bbox', print_function=logger.debug)
  if image_ids is not None:
    unknown = sorted(set(map(int, image_ids)) - set(coco_gt.getImgIds()))
    if unknown:
      raise ValueError(f'evaluate_boxes: image_ids {unknown[:10]} are not in the ground truth.')
    evaluator.params.imgIds = sorted(set(map(int, image_ids)))
  evaluator.evaluate()
  evaluator.accumulate()
  evaluator.summarize()

  metrics: dict[str, Any] = {name: _fraction(value) for name, value in
                             zip(STAT_NAMES, evaluator.stats[:len(STAT_NAMES)], strict=True)}
  # mmdet CocoMetric classwise AP: precision [T IoUs, R recalls, K classes, A areas, M maxDets].
  precision = np.asarray(evaluator.eval['precision'])
  per_class: dict[str, float] = {}
  for k, cat_id in enumerate(evaluator.params.catIds):
    values = precision[:, :, k, 0, -1]
    values = values[values > -1]
    name = str(coco_gt.cats[cat_id].get('name', cat_id))
    if name in per_class:
      name = f'{name} ({cat_id})'
    per_class[name] = float(np.mean(values)) if values.size else math.nan
  metrics['per_class'] = per_class
  return metrics


def _fraction(value: float) -> float:
  return math.nan if value < 0 else float(value)


def _check_results(coco_gt: COCO, results: Sequence[Mapping[str, Any]]) -> None:
  keys = ('image_id', 'category_id', 'bbox', 'score')
  for r in results[:1]:
    missing = [k for k in keys if k not in r]
    if missing:
      raise ValueError(f'COCO box results need keys {keys}; the first lacks {missing}: {r}.')
  images = {r['image_id'] for r in results} - set(coco_gt.getImgIds())
  if images:
    raise ValueError(f'Results name image ids {sorted(images)[:10]} that are not in the '
                     f'ground truth ({len(coco_gt.getImgIds())} images).')
  categories = {r['category_id'] for r in results} - set(coco_gt.getCatIds())
  if categories:
    raise ValueError(f'Results name category ids {sorted(categories)[:10]} that are not in '
                     f'the ground truth categories {sorted(coco_gt.getCatIds())[:20]}; check '
                     f'label_to_category_id.')


def format_table(metrics: Mapping[str, Any], *, columns: int = 3) -> str:
  """`evaluate_boxes` metrics in percent: the summary row, then per-class AP in `columns`
  (category, AP) pairs per row (mmdet prints 3)."""
  names = [n for n in SUMMARY_NAMES if n in metrics]
  width = 6
  lines = ['  '.join(f'{n:>{width}}' for n in names),
           '  '.join(f'{_percent(metrics[n]):>{width}}' for n in names)]
  per_class = metrics.get('per_class') or {}
  if per_class:
    items = list(per_class.items())
    name_width = max(len('category'), *(len(name) for name, _ in items))
    cell = lambda name, ap: f'{name:<{name_width}}  {ap:>{width}}'
    header = ' | '.join([cell('category', 'AP')] * min(columns, len(items)))
    lines += ['', header, '-' * len(header)]
    for start in range(0, len(items), columns):
      lines.append(' | '.join(cell(name, _percent(ap))
                              for name, ap in items[start:start + columns]))
  return '\n'.join(lines)


def _percent(value: float) -> str:
  return 'nan' if value is None or math.isnan(value) else f'{100 * value:.1f}'

