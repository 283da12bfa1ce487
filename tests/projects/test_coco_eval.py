"""COCO box evaluation: hand-computed COCOeval numbers on tiny ground truths built here."""

from __future__ import annotations

import copy
import json
import math
import os

import numpy as np
import pytest

from projects.cvt_detection.coco_eval import (
    evaluate_boxes,
    format_table,
    to_coco_results,
    write_results_json,
)

# Category ids with gaps, as COCO's (1..90 for 80 classes); contiguous labels 0, 1, 2.
CATEGORIES = [{'id': 1, 'name': 'cat'}, {'id': 3, 'name': 'dog'}, {'id': 7, 'name': 'bird'}]
LABEL_TO_CATEGORY = [1, 3, 7]


def _ann(ann_id: int, image_id: int, category_id: int, xywh, iscrowd: int = 0) -> dict:
  return {'id': ann_id, 'image_id': image_id, 'category_id': category_id,
          'bbox': list(map(float, xywh)), 'area': float(xywh[2] * xywh[3]), 'iscrowd': iscrowd}


def _ground_truth(annotations) -> dict:
  return {'images': [{'id': i, 'width': 200, 'height': 200, 'file_name': f'{i}.jpg'}
                     for i in (1, 2)],
          'annotations': annotations, 'categories': copy.deepcopy(CATEGORIES)}


# Small (20x20 = 400 < 32**2), medium (50x40) and large (100x120) objects on two images.
GT_ANNOTATIONS = [_ann(1, 1, 1, (10, 10, 20, 20)), _ann(2, 1, 3, (60, 50, 50, 40)),
                  _ann(3, 2, 1, (30, 40, 100, 120)), _ann(4, 2, 3, (5, 5, 20, 20))]


def _result(image_id, category_id, xywh, score=1.0) -> dict:
  return {'image_id': image_id, 'category_id': category_id, 'bbox': list(map(float, xywh)),
          'score': score}


def _perfect_results(annotations):
  return [_result(a['image_id'], a['category_id'], a['bbox']) for a in annotations
          if not a['iscrowd']]


def test_perfect_detections_give_ap_one():
  gt = _ground_truth(GT_ANNOTATIONS)
  metrics = evaluate_boxes(gt, _perfect_results(GT_ANNOTATIONS))
  for name in ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR100'):
    assert metrics[name] == pytest.approx(1.0), name
  # 'bird' has no ground truth: NaN, not 0 (mmdet prints 'nan').
  assert metrics['per_class']['cat'] == pytest.approx(1.0)
  assert metrics['per_class']['dog'] == pytest.approx(1.0)
  assert math.isnan(metrics['per_class']['bird'])
  assert list(metrics['per_class']) == ['cat', 'dog', 'bird']


@pytest.mark.parametrize('shift,ap50,ap75,ap', [
    (0, 1.0, 1.0, 1.0),
    # 40x40 box moved 4 px: IoU 36/44 = 0.818, a match at thresholds 0.50..0.80 (7 of 10).
    (4, 1.0, 1.0, 0.7),
    # Moved 8 px: IoU 32/48 = 0.667, a match at 0.50..0.65 (4 of 10): AP75 goes first.
    (8, 1.0, 0.0, 0.4),
    # Moved 16 px: IoU 24/56 = 0.43, below every threshold.
    (16, 0.0, 0.0, 0.0),
])
def test_shifted_box_lowers_ap75_before_ap50(shift, ap50, ap75, ap):
  gt = _ground_truth([_ann(1, 1, 1, (50, 50, 40, 40))])
  metrics = evaluate_boxes(gt, [_result(1, 1, (50 + shift, 50, 40, 40), 0.9)])
  assert metrics['AP50'] == pytest.approx(ap50)
  assert metrics['AP75'] == pytest.approx(ap75)
  assert metrics['AP'] == pytest.approx(ap)


def test_false_positive_ranked_first_halves_precision():
  # Ranked detections: FP (score 0.9), TP (0.8). Recall reaches 1 at precision 1/2, and COCO's
  # interpolated precision (max over recall >= r) is 1/2 at every recall point: AP = 0.5.
  gt = _ground_truth([_ann(1, 1, 3, (50, 50, 40, 40))])
  results = [_result(1, 3, (150, 150, 30, 30), 0.9), _result(1, 3, (50, 50, 40, 40), 0.8)]
  metrics = evaluate_boxes(gt, results)
  assert metrics['AP'] == pytest.approx(0.5)
  assert metrics['AP50'] == pytest.approx(0.5)
  # Ranked the other way round, the FP comes after full recall and costs nothing.
  results[0]['score'] = 0.7
  assert evaluate_boxes(gt, results)['AP'] == pytest.approx(1.0)


def test_class_without_detections_has_ap_zero():
  gt = _ground_truth(GT_ANNOTATIONS)
  cats_only = [r for r in _perfect_results(GT_ANNOTATIONS) if r['category_id'] == 1]
  metrics = evaluate_boxes(gt, cats_only)
  assert metrics['per_class']['cat'] == pytest.approx(1.0)
  assert metrics['per_class']['dog'] == 0.0
  assert math.isnan(metrics['per_class']['bird'])
  # The summary AP is the mean over categories with ground truth.
  assert metrics['AP'] == pytest.approx(0.5)


def test_crowd_boxes_are_neither_misses_nor_false_positives():
  gt = _ground_truth([_ann(1, 1, 1, (10, 10, 40, 40)),
                      _ann(2, 1, 1, (100, 100, 80, 80), iscrowd=1)])
  # Only the ordinary box is detected: the crowd region is not a miss.
  assert evaluate_boxes(gt, [_result(1, 1, (10, 10, 40, 40), 0.5)])['AP'] == pytest.approx(1.0)
  # A higher-scoring detection inside the crowd region is ignored, not a false positive.
  results = [_result(1, 1, (120, 120, 30, 30), 0.9), _result(1, 1, (10, 10, 40, 40), 0.5)]
  assert evaluate_boxes(gt, results)['AP'] == pytest.approx(1.0)
  # The same detection away from the crowd region is a false positive ranked first.
  results[0]['bbox'] = [60.0, 60.0, 30.0, 30.0]
  assert evaluate_boxes(gt, results)['AP'] == pytest.approx(0.5)


def test_empty_results_give_zero_ap():
  metrics = evaluate_boxes(_ground_truth(GT_ANNOTATIONS), [])
  for name in ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR100'):
    assert metrics[name] == 0.0, name
  assert metrics['per_class']['cat'] == 0.0 and metrics['per_class']['dog'] == 0.0
  assert 'cat' in format_table(metrics)


def test_evaluation_subset_of_images():
  gt = _ground_truth(GT_ANNOTATIONS)
  image_1 = [r for r in _perfect_results(GT_ANNOTATIONS) if r['image_id'] == 1]
  assert evaluate_boxes(gt, image_1)['AR100'] == pytest.approx(0.5)
  assert evaluate_boxes(gt, image_1, image_ids=[1])['AP'] == pytest.approx(1.0)


def test_to_coco_results_converts_boxes_labels_and_drops_padding():
  boxes = np.array([[10, 20, 40, 60], [1.5, 2.25, 3.5, 4.75], [0, 0, 0, 0]], np.float32)
  results = to_coco_results(boxes, np.array([0.9, 0.25, 0.0]), np.array([2, 0, 0]),
                            np.array([5, 6, 6]), LABEL_TO_CATEGORY,
                            valid=np.array([True, True, False]))
  assert results == [
      {'image_id': 5, 'category_id': 7, 'bbox': [10.0, 20.0, 30.0, 40.0],
       'score': pytest.approx(0.9)},
      {'image_id': 6, 'category_id': 1, 'bbox': [1.5, 2.25, 2.0, 2.5], 'score': 0.25}]
  assert all(type(v) is float for r in results for v in r['bbox'])
  # One image id for all, and a mapping instead of a sequence.
  single = to_coco_results(boxes[:1], [0.5], [1], 9, {1: 3})
  assert single[0]['image_id'] == 9 and single[0]['category_id'] == 3
  assert to_coco_results(np.zeros((0, 4)), [], [], [], LABEL_TO_CATEGORY) == []


def test_to_coco_results_errors():
  with pytest.raises(ValueError, match=r'boxes \[N, 4\]'):
    to_coco_results(np.zeros((2, 5)), [1, 1], [0, 0], [1, 1], LABEL_TO_CATEGORY)
  with pytest.raises(ValueError, match='scores has 1 entries for 2 boxes'):
    to_coco_results(np.zeros((2, 4)), [1], [0, 0], [1, 1], LABEL_TO_CATEGORY)
  with pytest.raises(ValueError, match=r'labels \[3\] have no category id'):
    to_coco_results(np.zeros((1, 4)), [1], [3], [1], LABEL_TO_CATEGORY)
  with pytest.raises(ValueError, match='non-finite'):
    to_coco_results(np.full((1, 4), np.nan), [1], [0], [1], LABEL_TO_CATEGORY)


def test_round_trip_through_results_file(tmp_path):
  gt = _ground_truth(GT_ANNOTATIONS)
  gt_before = copy.deepcopy(gt)
  xywh = np.array([a['bbox'] for a in GT_ANNOTATIONS], np.float32)
  boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
  labels = [LABEL_TO_CATEGORY.index(a['category_id']) for a in GT_ANNOTATIONS]
  results = to_coco_results(boxes, np.ones(len(labels)), labels,
                            [a['image_id'] for a in GT_ANNOTATIONS], LABEL_TO_CATEGORY)
  results_before = copy.deepcopy(results)

  path = write_results_json(results, tmp_path / 'sub' / 'results.json')
  assert os.listdir(tmp_path / 'sub') == ['results.json']  # no temporary file left behind
  with open(path) as f:
    assert json.load(f) == results
  gt_path = tmp_path / 'instances.json'
  gt_path.write_text(json.dumps(gt))

  from_list = evaluate_boxes(gt, results)
  from_files = evaluate_boxes(str(gt_path), path)
  assert from_list['AP'] == pytest.approx(1.0)
  np.testing.assert_equal(from_list, from_files)
  # Neither the ground truth nor the results were modified by the evaluation.
  assert gt == gt_before and results == results_before

  with pytest.raises(ValueError, match='allow|NaN|Out of range'):
    write_results_json([{'score': float('nan')}], tmp_path / 'bad.json')
  assert not (tmp_path / 'bad.json').exists()


def test_results_that_do_not_match_the_ground_truth_are_rejected(tmp_path):
  gt = _ground_truth(GT_ANNOTATIONS)
  with pytest.raises(ValueError, match=r'image ids \[99\]'):
    evaluate_boxes(gt, [_result(99, 1, (0, 0, 1, 1))])
  with pytest.raises(ValueError, match=r'category ids \[2\]'):
    evaluate_boxes(gt, [_result(1, 2, (0, 0, 1, 1))])
  with pytest.raises(ValueError, match='does not exist'):
    evaluate_boxes(tmp_path / 'missing.json', [])


def test_format_table():
  metrics = evaluate_boxes(_ground_truth(GT_ANNOTATIONS), _perfect_results(GT_ANNOTATIONS))
  table = format_table(metrics)
  lines = table.splitlines()
  assert lines[0].split() == ['AP', 'AP50', 'AP75', 'APs', 'APm', 'APl']
  assert lines[1].split() == ['100.0'] * 6
  assert 'cat' in table and 'dog' in table and 'nan' in table


def test_faster_coco_eval_equals_pycocotools():
  """The same AP as pycocotools (the reference implementation) on noisy detections."""
  pycocotools = pytest.importorskip('pycocotools.cocoeval')
  from pycocotools.coco import COCO as ReferenceCOCO

  from projects.cvt_detection.data import SyntheticDetection, coco_ground_truth

  gt = coco_ground_truth(SyntheticDetection(40, image_size=(128, 128), num_classes=4, seed=3))
  # A crowd region and an image without objects, handled as COCO does.
  gt['annotations'].append(_ann(10_000, 1, 2, [2.0, 2.0, 40.0, 30.0], iscrowd=1))
  gt['images'].append({'id': 999, 'file_name': 'empty.png', 'height': 128, 'width': 128})
  rng = np.random.default_rng(0)
  results = []
  for ann in gt['annotations']:
    for _ in range(rng.integers(0, 3)):  # missed, found once, or duplicated
      x, y, w, h = np.asarray(ann['bbox']) + rng.normal(0, 2.0, 4)
      category = ann['category_id'] if rng.random() < 0.85 else int(rng.integers(1, 5))
      results.append(_result(ann['image_id'], category, [x, y, max(w, 1), max(h, 1)],
                             float(rng.random())))
  results += [_result(int(rng.integers(1, 41)), int(rng.integers(1, 5)),
                      list(rng.uniform(0, 60, 4) + [0, 0, 4, 4]), float(rng.random()))
              for _ in range(30)]  # false positives
  ours = evaluate_boxes(gt, results)

  reference_gt = ReferenceCOCO()
  reference_gt.dataset = copy.deepcopy(gt)
  reference_gt.createIndex()
  reference = pycocotools.COCOeval(reference_gt, reference_gt.loadRes(copy.deepcopy(results)),
                                   'bbox')
  reference.evaluate()
  reference.accumulate()
  reference.summarize()
  names = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR1', 'AR10', 'AR100', 'ARs', 'ARm',
           'ARl')
  for name, value in zip(names, reference.stats, strict=True):
    expected = math.nan if value == -1 else value
    np.testing.assert_allclose(ours[name], expected, atol=1e-6, err_msg=name)
  assert 0.1 < ours['AP'] < 0.9  # a case with misses, duplicates and confusions
