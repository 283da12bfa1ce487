"""Semantic segmentation metrics from an integer confusion matrix, as mmsegmentation.

`cm[K, K]` (rows: ground truth, columns: prediction) is summed over a split at the original
label resolution, without `ignore_index` (255) and padding; then, as mmseg's `IoUMetric`
(mmseg/evaluation/metrics/iou_metric.py):

  intersect = diag(cm), area_label = row sums, area_pred = column sums,
  union = area_label + area_pred - intersect,
  IoU = intersect / union      (NaN for a class neither present nor predicted),
  Acc = intersect / area_label (NaN for a class without ground-truth pixels),
  aAcc = sum(intersect) / sum(area_label), mIoU = nanmean(IoU), mAcc = nanmean(Acc).

A class predicted but absent from the ground truth has IoU 0 and counts in mIoU, as in
mmseg. Counts are exact integers (mmseg sums float32 histograms).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

IGNORE_INDEX = 255


def _valid_mask(label, num_classes, ignore_index, mask, xp):
  valid = (label != ignore_index) & (label >= 0) & (label < num_classes)
  if mask is not None:
    mask = xp.asarray(mask)
    # A per-example mask [B] (Scenic's batch_mask) broadcasts over the pixels.
    mask = mask.reshape(mask.shape + (1,) * (label.ndim - mask.ndim))
    valid = valid & (mask > 0)
  return valid


def confusion_matrix(label: np.ndarray, pred: np.ndarray, num_classes: int, *,
                     ignore_index: int = IGNORE_INDEX,
                     mask: np.ndarray | None = None) -> np.ndarray:
  """int64 `[K, K]` confusion matrix of labels `[..., H, W]` and predictions in `[0, K)`.

  Labels `ignore_index` or outside `[0, K)` are skipped (mmseg's histogram drops them too),
  as are pixels whose `mask` (per example `[B]` or per pixel) is 0.
  """
  label, pred = np.asarray(label), np.asarray(pred)
  if label.shape != pred.shape:
    raise ValueError(f'label shape {label.shape} != prediction shape {pred.shape}')
  valid = _valid_mask(label, num_classes, ignore_index, mask, np)
  gt, pr = label[valid].astype(np.int64), pred[valid].astype(np.int64)
  if pr.size and (pr.min() < 0 or pr.max() >= num_classes):
    raise ValueError(f'predictions must be in [0, {num_classes}), found [{pr.min()}, {pr.max()}]')
  counts = np.bincount(gt * num_classes + pr, minlength=num_classes * num_classes)
  return counts.reshape(num_classes, num_classes).astype(np.int64)


def confusion_matrix_jax(label: jax.Array, pred: jax.Array, num_classes: int, *,
                         ignore_index: int = IGNORE_INDEX,
                         mask: jax.Array | None = None) -> jax.Array:
  """`confusion_matrix` on device (jit with `num_classes` static): int32 `[K, K]` per batch
  (exact below 2**31 pixels), to add into an int64 total on the host.

  Invalid pixels go to an extra bin that is dropped (integer counts, no float weights);
  predictions outside `[0, K)` are skipped instead of raising.
  """
  label, pred = jnp.asarray(label), jnp.asarray(pred)
  valid = _valid_mask(label, num_classes, ignore_index, mask, jnp)
  valid = valid & (pred >= 0) & (pred < num_classes)
  k2 = num_classes * num_classes
  index = jnp.where(valid, label.astype(jnp.int32) * num_classes + pred.astype(jnp.int32), k2)
  counts = jnp.bincount(index.reshape(-1), length=k2 + 1)[:k2]
  return counts.reshape(num_classes, num_classes).astype(jnp.int32)


def _nanmean(x: np.ndarray) -> float:
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', RuntimeWarning)  # all-NaN -> NaN, no warning
    return float(np.nanmean(x)) if x.size else math.nan


def segmentation_metrics(cm: np.ndarray) -> dict:
  """mmseg's `{'aAcc', 'mIoU', 'mAcc': float, 'IoU', 'Acc': float64 [K]}` of `cm [K, K]`, as
  fractions (mmseg reports them x100); NaN where undefined."""
  cm = np.asarray(cm, np.int64)
  if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
    raise ValueError(f'confusion matrix must be square [K, K], got shape {cm.shape}')
  intersect = np.diag(cm).astype(np.float64)
  area_label = cm.sum(1).astype(np.float64)
  area_pred = cm.sum(0).astype(np.float64)
  union = area_label + area_pred - intersect
  with np.errstate(divide='ignore', invalid='ignore'):
    iou = intersect / union
    acc = intersect / area_label
    a_acc = intersect.sum() / area_label.sum() if area_label.sum() else math.nan
  return {
      'aAcc': float(a_acc), 'mIoU': _nanmean(iou), 'mAcc': _nanmean(acc), 'IoU': iou, 'Acc': acc
  }


def _percent(x: float, decimals: int | None) -> float | None:
  if x is None or math.isnan(x):
    return None
  x = 100 * float(x)
  return round(x, decimals) if decimals is not None else x


def metrics_report(cm: np.ndarray, class_names: Sequence[str] | None = None,
                   decimals: int | None = 2, include_confusion_matrix: bool = False) -> dict:
  """JSON-ready `{'aAcc', 'mIoU', 'mAcc', 'num_pixels', 'num_classes', 'per_class': [{'class',
  'IoU', 'Acc', 'num_pixels'}], ['confusion_matrix']}`: percentages rounded to `decimals`
  (mmseg: 2; None: not rounded), NaN -> None; `class_names` default to 'class_0', ...
  """
  cm = np.asarray(cm, np.int64)
  m = segmentation_metrics(cm)
  k = cm.shape[0]
  names = list(class_names) if class_names is not None else [f'class_{i}' for i in range(k)]
  if len(names) != k:
    raise ValueError(f'{len(names)} class names for a {k}-class confusion matrix')
  report = {
      'aAcc': _percent(m['aAcc'], decimals),
      'mIoU': _percent(m['mIoU'], decimals),
      'mAcc': _percent(m['mAcc'], decimals),
      'num_pixels': int(cm.sum()),
      'num_classes': k,
      'per_class': [
          {
              'class': names[i],
              'IoU': _percent(m['IoU'][i], decimals),
              'Acc': _percent(m['Acc'][i], decimals),
              'num_pixels': int(cm[i].sum()),
          }
          for i in range(k)
      ],
  }
  if include_confusion_matrix:
    report['confusion_matrix'] = cm.tolist()
  return report


def per_class_table(cm: np.ndarray, class_names: Sequence[str] | None = None) -> str:
  """Text table of per-class IoU and Acc (percent, 2 decimals; 'nan' when undefined)."""
  report = metrics_report(cm, class_names)
  rows = [(r['class'], _fmt(r['IoU']), _fmt(r['Acc'])) for r in report['per_class']]
  summary = f"aAcc {_fmt(report['aAcc'])}  mIoU {_fmt(report['mIoU'])}  mAcc {_fmt(report['mAcc'])}"
  width = max([len('Class')] + [len(r[0]) for r in rows])
  lines = [f'{"Class":<{width}}  {"IoU":>6}  {"Acc":>6}', '-' * (width + 16)]
  lines += [f'{name:<{width}}  {iou:>6}  {acc:>6}' for name, iou, acc in rows]
  return '\n'.join(lines + ['-' * (width + 16), summary])


def _fmt(x: float | None) -> str:
  return 'nan' if x is None else f'{x:.2f}'


def write_metrics_json(path: str | os.PathLike, cm: np.ndarray,
                       class_names: Sequence[str] | None = None, **report_kwargs) -> dict:
  """Writes `metrics_report(cm, class_names, ...)` to `path` as strict JSON; returns it."""
  report = metrics_report(cm, class_names, **report_kwargs)
  with open(path, 'w') as f:
    json.dump(report, f, indent=2, allow_nan=False)  # NaN was mapped to null
  return report
