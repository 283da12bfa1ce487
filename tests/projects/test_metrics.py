"""Confusion-matrix metrics against a brute-force mmseg `IoUMetric` reference."""

import json
import math

import jax
import numpy as np
import pytest

from projects.cvt_segmentation import metrics

K = 7


def _mmseg_reference(labels, preds, num_classes, ignore_index=255):
  """mmseg IoUMetric: per-image intersect/union histograms summed, then the ratios."""
  inter = np.zeros(num_classes)
  union = np.zeros(num_classes)
  area_pred = np.zeros(num_classes)
  area_label = np.zeros(num_classes)
  for label, pred in zip(labels, preds, strict=True):
    keep = label != ignore_index
    p, g = pred[keep], label[keep]
    for c in range(num_classes):  # torch.histc(min=0, max=K-1) over each array
      i = np.sum((p == c) & (g == c))
      ap, al = np.sum(p == c), np.sum(g == c)
      inter[c] += i
      area_pred[c] += ap
      area_label[c] += al
      union[c] += ap + al - i
  with np.errstate(divide='ignore', invalid='ignore'):
    iou, acc = inter / union, inter / area_label
  return {
      'aAcc': inter.sum() / area_label.sum(),
      'mIoU': np.nanmean(iou),
      'mAcc': np.nanmean(acc),
      'IoU': iou,
      'Acc': acc,
  }


def _random_maps(seed, n=4, shape=(9, 11)):
  rng = np.random.default_rng(seed)
  # Ground truth never uses classes 5 and 6; predictions never use 4 and 6:
  # class 6 is absent from both (NaN), 5 predicted only (IoU 0, Acc NaN),
  # 4 in the ground truth only (IoU 0, Acc 0).
  labels = rng.choice([0, 1, 2, 3, 4, 255], size=(n,) + shape, p=[0.3, 0.2, 0.2, 0.1, 0.1, 0.1])
  preds = rng.choice([0, 1, 2, 3, 5], size=(n,) + shape)
  preds = np.where(rng.random(preds.shape) < 0.5, np.where(labels == 255, 0, labels), preds)
  preds = np.where(preds == 4, 0, preds)
  return labels.astype(np.int32), preds.astype(np.int32)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_matches_mmseg_reference(seed):
  labels, preds = _random_maps(seed)
  cm = sum(metrics.confusion_matrix(g, p, K) for g, p in zip(labels, preds, strict=True))
  assert cm.dtype == np.int64 and cm.shape == (K, K)
  assert cm.sum() == np.sum(labels != 255)
  got, ref = metrics.segmentation_metrics(cm), _mmseg_reference(labels, preds, K)
  for key in ('aAcc', 'mIoU', 'mAcc'):
    assert got[key] == pytest.approx(ref[key], rel=1e-12)
  np.testing.assert_allclose(got['IoU'], ref['IoU'], rtol=1e-12)
  np.testing.assert_allclose(got['Acc'], ref['Acc'], rtol=1e-12)
  assert math.isnan(got['IoU'][6]) and math.isnan(got['Acc'][6])
  assert got['IoU'][5] == 0 and math.isnan(got['Acc'][5])
  assert got['IoU'][4] == 0 and got['Acc'][4] == 0
  # Whole batch at once equals the per-image sum.
  np.testing.assert_array_equal(metrics.confusion_matrix(labels, preds, K), cm)


def test_masks_exclude_padding_and_out_of_range_labels():
  labels, preds = _random_maps(3)
  batch_mask = np.array([1, 0, 1, 0], np.float32)
  cm = metrics.confusion_matrix(labels, preds, K, mask=batch_mask)
  np.testing.assert_array_equal(
      cm, metrics.confusion_matrix(labels[::2], preds[::2], K)
  )
  pixel_mask = np.zeros(labels.shape, bool)
  pixel_mask[:, :3] = True
  np.testing.assert_array_equal(
      metrics.confusion_matrix(labels, preds, K, mask=pixel_mask),
      metrics.confusion_matrix(labels[:, :3], preds[:, :3], K),
  )
  # Labels >= K that are not the ignore index are dropped, as mmseg's histc does.
  odd = labels.copy()
  odd[0, 0, 0] = 200
  assert metrics.confusion_matrix(odd, preds, K).sum() == np.sum(odd < K)
  with pytest.raises(ValueError, match='predictions'):
    metrics.confusion_matrix(labels, preds + K, K)


def test_jax_version_equals_numpy():
  labels, preds = _random_maps(4, shape=(16, 20))
  mask = np.array([1, 1, 0, 1], np.float32)
  fn = jax.jit(metrics.confusion_matrix_jax, static_argnames=('num_classes', 'ignore_index'))
  for m in (None, mask):
    got = np.asarray(fn(labels, preds, num_classes=K, mask=m))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, metrics.confusion_matrix(labels, preds, K, mask=m))


def test_report_json_and_table(tmp_path):
  labels, preds = _random_maps(5)
  cm = metrics.confusion_matrix(labels, preds, K)
  names = [f'c{i}' for i in range(K)]
  path = tmp_path / 'metrics.json'
  report = metrics.write_metrics_json(path, cm, names, include_confusion_matrix=True)
  loaded = json.loads(path.read_text())  # strict JSON: NaN written as null
  assert loaded == report
  ref = metrics.segmentation_metrics(cm)
  assert loaded['mIoU'] == round(100 * ref['mIoU'], 2)
  assert loaded['per_class'][6] == {'class': 'c6', 'IoU': None, 'Acc': None, 'num_pixels': 0}
  assert loaded['confusion_matrix'] == cm.tolist()
  table = metrics.per_class_table(cm, names)
  assert 'c6' in table and 'nan' in table and f"{loaded['mIoU']:.2f}" in table
  with pytest.raises(ValueError, match='class names'):
    metrics.metrics_report(cm, names[:3])


def test_empty_confusion_matrix_is_nan_without_warnings():
  with np.errstate(all='raise'):
    m = metrics.segmentation_metrics(np.zeros((3, 3), np.int64))
  assert math.isnan(m['mIoU']) and math.isnan(m['aAcc']) and math.isnan(m['mAcc'])
