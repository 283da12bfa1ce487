"""Detection data: COCO-format reading and writing, the synthetic set, mmdet's 1x pipeline."""

import json
import logging
import os
import re
import warnings

import numpy as np
import pytest
from PIL import Image

from projects.cvt_detection.data import builder, transforms
from projects.cvt_detection.data.coco import CocoDetection, write_coco
from projects.cvt_detection.data.synthetic import SyntheticDetection
from projects.cvt_detection.data.transforms import (
    DetectionEvalTransform,
    DetectionTrainTransform,
    collate,
    default_canvas_sizes,
    flip_boxes,
    pad_batch,
    random_flip,
    resize_keep_ratio,
)
from projects.training.image_ops import IMAGENET_MEAN, IMAGENET_STD

# ---------------------------------------------------------------- COCO format


def _synthetic(**kwargs):
  args = dict(num_images=4, image_size=(48, 64), num_classes=3, seed=1)
  return SyntheticDetection(**{**args, **kwargs})


def test_coco_round_trip(tmp_path):
  source = _synthetic()
  ann_file, image_dir = write_coco(tmp_path, source)
  assert ann_file == os.path.join(tmp_path, 'annotations', 'instances_train.json')
  ds = CocoDetection(ann_file, image_dir)
  assert len(ds) == len(source) and ds.class_names == source.class_names
  assert ds.image_ids == [1, 2, 3, 4]
  for k in range(len(source)):
    a, b = source[k], ds[k]
    np.testing.assert_array_equal(b['image'], a['image'])
    np.testing.assert_array_equal(b['boxes'], a['boxes'])
    np.testing.assert_array_equal(b['labels'], a['labels'])
    np.testing.assert_array_equal(b['crowd'], a['crowd'])
    assert b['image_id'] == a['image_id'] and b['orig_size'] == a['orig_size'] == (48, 64)
    assert b['boxes'].dtype == np.float32 and b['labels'].dtype == np.int32
  x1, y1, x2, y2 = source[0]['boxes'][0].tolist()
  assert ds.ground_truth['annotations'][0]['bbox'] == [x1, y1, x2 - x1, y2 - y1]  # COCO xywh


def test_non_contiguous_category_ids(tmp_path):
  source = _synthetic()
  ann_file, image_dir = write_coco(tmp_path, source, category_ids=(1, 3, 90))
  # Categories listed out of order still map in sorted-id order.
  gt = json.load(open(ann_file))
  gt['categories'] = gt['categories'][::-1]
  json.dump(gt, open(ann_file, 'w'))
  ds = CocoDetection(ann_file, image_dir)
  assert ds.category_ids == (1, 3, 90) and ds.num_classes == 3
  np.testing.assert_array_equal(ds.label_to_category_id, [1, 3, 90])
  assert ds.category_id_to_label == {1: 0, 3: 1, 90: 2}
  assert ds.class_names == source.class_names
  for k in range(len(source)):
    np.testing.assert_array_equal(ds[k]['labels'], source[k]['labels'])
  ids = [a['category_id'] for a in gt['annotations'] if a['image_id'] == 1]
  np.testing.assert_array_equal(ds.label_to_category_id[ds[0]['labels']], ids)


def _write_json(tmp_path, images, annotations, categories=None, sizes=None):
  """Writes small grey PNGs for `images` (id -> (h, w)) and a json; returns CocoDetection args."""
  image_dir = tmp_path / 'images'
  image_dir.mkdir(exist_ok=True)
  infos = []
  for image_id, (h, w) in images.items():
    name = f'{image_id}.png'
    Image.fromarray(np.full((h, w), 90, np.uint8)).save(image_dir / name)  # grayscale file
    file_h, file_w = (sizes or {}).get(image_id, (h, w))
    infos.append({'id': image_id, 'file_name': name, 'height': file_h, 'width': file_w})
  for j, ann in enumerate(annotations):
    ann.setdefault('id', j + 1)
    ann.setdefault('category_id', 7)
    ann.setdefault('iscrowd', 0)
    bbox = ann.get('bbox')
    if isinstance(bbox, list) and len(bbox) == 4 and all(type(v) in (int, float) for v in bbox):
      ann.setdefault('area', bbox[2] * bbox[3])
  gt = {
      'images': infos,
      'annotations': annotations,
      'categories': categories or [{'id': 7, 'name': 'thing'}],
  }
  ann_file = tmp_path / 'instances.json'
  ann_file.write_text(json.dumps(gt))
  return str(ann_file), str(image_dir)


COCO_LOGGER = 'projects.cvt_detection.data.coco'


def _warnings(caplog):
  return [r.getMessage() for r in caplog.records
          if r.name == COCO_LOGGER and r.levelno == logging.WARNING]


def test_crowd_empty_and_dropped_boxes(tmp_path, caplog):
  anns = [
      {'image_id': 1, 'bbox': [2, 3, 10, 5]},
      {'image_id': 1, 'bbox': [0, 0, 20, 20], 'iscrowd': 1},
      {'image_id': 1, 'bbox': [4, 4, 0.5, 6]},  # w < 1: mmdet drops it
      {'image_id': 1, 'bbox': [4, 4, 6, 0.25]},  # h < 1
      {'image_id': 1, 'bbox': [4, 4, 6, 6], 'area': 0},  # area <= 0: mmdet drops it
      {'image_id': 1, 'bbox': [4, 4, 6, 6], 'ignore': 1},
      {'image_id': 3, 'bbox': [1, 1, 8, 8], 'iscrowd': 1},
  ]
  args = _write_json(tmp_path, {1: (24, 32), 2: (16, 16), 3: (20, 20)}, anns)
  with caplog.at_level(logging.WARNING, logger=COCO_LOGGER):
    ds = CocoDetection(*args)
  assert _warnings(caplog) == [
      f'Dropped 3 of the 7 annotations in {args[0]} as mmdetection does: 2 with a box side '
      'under 1 px, 1 with area <= 0 (annotation ids 3, 4, 5).'
  ]
  assert len(ds) == 3 and ds.class_names == ('thing',)
  first = ds[0]
  np.testing.assert_array_equal(first['boxes'], [[2, 3, 12, 8], [0, 0, 20, 20]])
  np.testing.assert_array_equal(first['crowd'], [False, True])
  np.testing.assert_array_equal(first['labels'], [0, 0])
  assert first['image'].shape == (24, 32, 3) and first['image'].dtype == np.uint8
  empty = ds[1]
  assert empty['boxes'].shape == (0, 4) and empty['labels'].shape == (0,)
  assert empty['crowd'].shape == (0,) and empty['orig_size'] == (16, 16)
  # filter_empty keeps images with any annotation, crowd-only ones included (as mmdet).
  assert CocoDetection(*args, filter_empty=True).image_ids == [1, 3]
  assert CocoDetection(*args, min_size=18).image_ids == [1, 3]
  # The training pipeline drops crowd boxes.
  out = DetectionTrainTransform(scale=(32, 24), flip_prob=0.0)(first, None)
  np.testing.assert_array_equal(out['boxes'], [[2, 3, 12, 8]])


def test_boxes_up_to_one_pixel_beyond_the_image_are_clipped(tmp_path, caplog):
  anns = [
      {'image_id': 1, 'bbox': [-0.4, -1.0, 10, 8]},  # COCO's rounding: kept, clipped
      {'image_id': 1, 'bbox': [20.5, 16.25, 12.4, 8.5]},  # right 0.9 px, bottom 0.75 px
      {'image_id': 1, 'bbox': [31.5, 2, 1.4, 6], 'iscrowd': 1},  # 0.5 px inside once clipped
  ]
  args = _write_json(tmp_path, {1: (24, 32)}, anns)
  with caplog.at_level(logging.WARNING, logger=COCO_LOGGER):
    item = CocoDetection(*args)[0]
  np.testing.assert_allclose(item['boxes'], [[0, 0, 9.6, 7], [20.5, 16.25, 32, 24]])
  assert len(_warnings(caplog)) == 1 and 'annotation ids 3)' in _warnings(caplog)[0]


@pytest.mark.parametrize(
    'ann, problem',
    [
        ({'bbox': [28, 2, 7, 4]}, 'bbox [28, 2, 7, 4] extends 3 px beyond the right edge of the '
         '32x24 (w x h) image (up to 1 px is allowed and clipped)'),
        ({'bbox': [-1.5, -4, 5, 9]}, 'bbox [-1.5, -4, 5, 9] extends 1.5 px beyond the left edge '
         'and 4 px beyond the top edge of'),
        ({'bbox': [2, 20, 5, 5.25]}, 'bbox [2, 20, 5, 5.25] extends 1.25 px beyond the bottom '
         'edge'),
        ({'bbox': [40, 4, 6, 6]}, 'bbox [40, 4, 6, 6] lies outside the 32x24 (w x h) image'),
        ({'bbox': [32, 4, 0.5, 6]}, 'bbox [32, 4, 0.5, 6] lies outside'),  # no overlap: error
        ({'bbox': [-3, 4, 3, 6]}, 'bbox [-3, 4, 3, 6] lies outside'),  # touches the left edge only
        ({'bbox': [4, 4, 0, 6]}, 'bbox [4, 4, 0, 6] has width 0 (must be > 0)'),
        ({'bbox': [4, 4, 6, -2]}, 'bbox [4, 4, 6, -2] has height -2 (must be > 0)'),
        ({'bbox': [4, 4, 0, 6], 'iscrowd': 1}, 'bbox [4, 4, 0, 6] has width 0'),  # crowd alike
        ({'bbox': [4, float('nan'), 6, 6]}, 'bbox [4, nan, 6, 6] has a non-finite value'),
        ({'bbox': [4, 4, float('inf'), 6]}, 'bbox [4, 4, inf, 6] has a non-finite value'),
        ({'bbox': [4, 4, 6, 6], 'area': float('nan')}, 'area nan is not a finite number'),
        ({'bbox': [4, 4, 6]}, 'bbox [4, 4, 6] is not 4 numbers [x, y, width, height]'),
        ({'bbox': [4, 4, '6', 6]}, "bbox [4, 4, '6', 6] is not 4 numbers"),
        ({'bbox': None}, 'bbox None is not 4 numbers'),
        ({}, "has no 'bbox'"),
        ({'bbox': [4, 4, 6, 6], 'area': 'big'}, "area 'big' is not a finite number"),
    ],
)
def test_invalid_box_errors_name_file_and_annotation(tmp_path, ann, problem):
  anns = [{'image_id': 1, 'bbox': [2, 3, 10, 5]}, {'id': 42, 'image_id': 1, **ann}]
  args = _write_json(tmp_path, {1: (24, 32)}, anns)
  with pytest.raises(ValueError) as error:
    CocoDetection(*args)
  message = str(error.value)
  assert message.startswith(f'1 of the 2 annotations in {args[0]} are invalid')
  assert f'\n  annotation 42 (image 1, 1.png): {problem}' in message
  assert "set invalid_boxes='drop' (dataset_configs.invalid_boxes)" in message
  # 'drop' keeps the good box.
  ds = CocoDetection(*args, invalid_boxes='drop')
  np.testing.assert_array_equal(ds[0]['boxes'], [[2, 3, 12, 8]])


def test_unknown_ids_name_the_annotation(tmp_path):
  anns = [
      {'id': 11, 'image_id': 1, 'bbox': [1, 1, 3, 3], 'category_id': 5},
      {'id': 12, 'image_id': 9, 'bbox': [1, 1, 3, 3]},
      {'id': 13, 'image_id': 1, 'bbox': [1, 1, 3, 3]},
  ]
  args = _write_json(tmp_path, {1: (8, 8)}, anns)
  gt = json.loads(open(args[0]).read())
  gt['annotations'].append('not an annotation')
  with open(args[0], 'w') as f:
    json.dump(gt, f)
  for mode in ('error', 'drop'):  # unknown ids are not boxes to drop
    with pytest.raises(ValueError) as error:
      CocoDetection(*args, invalid_boxes=mode)
    message = str(error.value)
    assert f'3 of the 4 annotations in {args[0]} are invalid' in message
    assert "\n  annotations[3]: is a str, not an object\n" in message
    assert ('annotation 11 (image 1, 1.png): has category id 5, which is not in `categories`'
            in message)
    assert 'annotation 12: refers to image id 9, which is not in `images`' in message
    assert '`categories` has ids [7].' in message
    assert 'annotation 13' not in message
  assert "drops invalid boxes only" in message


def test_all_invalid_annotations_listed_in_one_error(tmp_path):
  anns = [
      {'id': 1, 'image_id': 1, 'bbox': [2, 3, 10, 5]},
      {'id': 7, 'image_id': 1, 'bbox': [4, 4, 0, 6]},
      {'id': 8, 'image_id': 2, 'bbox': [1, 1, 3, 3], 'category_id': 99},
      {'id': 9, 'image_id': 2, 'bbox': [-5, 1, 8, 8], 'iscrowd': 1},
      {'id': 10, 'image_id': 2, 'bbox': [1, 1, 3, 3]},
  ]
  args = _write_json(tmp_path, {1: (24, 32), 2: (16, 16)}, anns)
  with pytest.raises(ValueError) as error:
    CocoDetection(*args)
  lines = str(error.value).splitlines()
  assert lines[0] == (f'3 of the 5 annotations in {args[0]} are invalid (COCO bbox: [x, y, '
                      'width, height] in image pixels):')
  assert lines[1] == '  annotation 7 (image 1, 1.png): bbox [4, 4, 0, 6] has width 0 (must be > 0)'
  assert lines[2] == ('  annotation 8 (image 2, 2.png): has category id 99, which is not in '
                      '`categories`')
  assert lines[3] == ('  annotation 9 (image 2, 2.png): bbox [-5, 1, 8, 8] extends 5 px beyond the '
                      'left edge of the 16x16 (w x h) image (up to 1 px is allowed and clipped)')
  assert lines[4:] == [
      '`categories` has ids [7].',
      "Fix the file, or set invalid_boxes='drop' (dataset_configs.invalid_boxes) to drop the "
      'invalid boxes with a warning.',
      "invalid_boxes='drop' drops invalid boxes only: fix the annotations with an unknown image "
      'or category id in the file.',
  ]


def test_long_error_shows_ten_and_the_count(tmp_path):
  anns = [{'id': 100 + k, 'image_id': 1, 'bbox': [4, 4, 6, -1]} for k in range(13)]
  anns.append({'id': 1, 'image_id': 1, 'bbox': [1, 1, 4, 4]})
  args = _write_json(tmp_path, {1: (24, 32)}, anns)
  with pytest.raises(ValueError, match=r'^13 of the 14 annotations in .*instances\.json') as error:
    CocoDetection(*args)
  message = str(error.value)
  assert all(f'annotation {100 + k} ' in message for k in range(10))
  assert 'annotation 110 ' not in message and '\n  ... and 3 more\n' in message


def test_drop_invalid_boxes_warns_once(tmp_path, caplog):
  anns = [
      {'id': 1, 'image_id': 1, 'bbox': [2, 3, 10, 5]},
      *({'id': 20 + k, 'image_id': 1, 'bbox': [40, 4, 6, 6]} for k in range(6)),
      {'id': 30, 'image_id': 2, 'bbox': [1, 1, 3, float('nan')], 'iscrowd': 1},
      {'id': 31, 'image_id': 2, 'bbox': [1, 1, 5, 4], 'iscrowd': 1},
      {'id': 32, 'image_id': 2, 'bbox': [1, 1, 5, 0.5]},  # sub-pixel: its own warning
  ]
  args = _write_json(tmp_path, {1: (24, 32), 2: (16, 16)}, anns)
  with caplog.at_level(logging.WARNING, logger=COCO_LOGGER):
    ds = CocoDetection(*args, invalid_boxes='drop')
  first, second = _warnings(caplog)
  assert first == (
      f"Dropped 7 of the 10 annotations in {args[0]} with invalid boxes (invalid_boxes='drop'); "
      'annotation ids 20, 21, 22, 23, 24, ...; first: annotation 20 (image 1, 1.png): bbox '
      '[40, 4, 6, 6] lies outside the 32x24 (w x h) image'
  )
  assert second.startswith('Dropped 1 of the 10') and '(annotation ids 32)' in second
  np.testing.assert_array_equal(ds[0]['boxes'], [[2, 3, 12, 8]])
  np.testing.assert_array_equal(ds[1]['boxes'], [[1, 1, 6, 5]])
  np.testing.assert_array_equal(ds[1]['crowd'], [True])
  with pytest.raises(ValueError, match="invalid_boxes must be one of \\('error', 'drop'\\)"):
    CocoDetection(*args, invalid_boxes='skip')


def test_builder_passes_invalid_boxes(tmp_path):
  anns = [{'image_id': 1, 'bbox': [2, 3, 10, 5]}, {'id': 5, 'image_id': 1, 'bbox': [4, 4, 0, 6]}]
  ann_file, image_dir = _write_json(tmp_path, {1: (24, 32)}, anns)
  paths = dict(train_annotations=ann_file, train_images=image_dir, val_annotations=ann_file,
               val_images=image_dir)
  with pytest.raises(ValueError, match=re.escape(f'1 of the 2 annotations in {ann_file}')):
    builder._sources('coco_format', dict(paths))
  kw = dict(paths, invalid_boxes='drop')
  train, evaluation, ground_truth = builder._sources('coco_format', kw)
  assert not kw and train.invalid_boxes == evaluation.invalid_boxes == 'drop'
  np.testing.assert_array_equal(train[0]['boxes'], [[2, 3, 12, 8]])
  assert len(ground_truth['annotations']) == 2  # evaluation reads the file as it is


def _split(folder, category_ids, names=None, annotated=None):
  """A one-image COCO file in `folder` listing `category_ids`, one box of each of `annotated`
  (default: every category); returns `(annotation file, image folder)`."""
  folder.mkdir()
  names = names or [f'c{c}' for c in category_ids]
  anns = [{'image_id': 1, 'category_id': c, 'bbox': [2, 2, 8, 8]}
          for c in (category_ids if annotated is None else annotated)]
  categories = [{'id': c, 'name': n} for c, n in zip(category_ids, names, strict=True)]
  return _write_json(folder, {1: (24, 32)}, anns, categories)


def _loaders(train, val):
  return builder.build_loaders(
      'coco_format', batch_size=1, eval_batch_size=1, train_annotations=train[0],
      train_images=train[1], val_annotations=val[0], val_images=val[1])


def test_one_category_map_from_the_training_file_checked_against_validation(tmp_path):
  train = _split(tmp_path / 'train', (1, 5, 90))
  # Validation lists the same categories but has no box of category 1: fine.
  _, _, meta = _loaders(train, _split(tmp_path / 'val', (1, 5, 90), annotated=(90,)))
  assert meta['num_classes'] == 3 and meta['category_ids'] == (1, 5, 90)
  assert meta['class_names'] == ('c1', 'c5', 'c90')
  # Validation lists fewer categories: label 0 would mean 1 in training, 5 in evaluation.
  val = _split(tmp_path / 'fewer', (5, 90))
  with pytest.raises(ValueError) as error:
    _loaders(train, val)
  message = str(error.value)
  assert '\n' not in message and val[0] in message and train[0] in message
  assert 'id 1 ' in message and '5' not in message.replace(val[0], '').replace(train[0], '')
  # More categories, or the same ids named otherwise.
  val = _split(tmp_path / 'more', (1, 5, 7, 90))
  with pytest.raises(ValueError, match=re.escape(f'{val[0]} lists category id 7, which')):
    _loaders(train, val)
  val = _split(tmp_path / 'renamed', (1, 5, 90), names=('c1', 'dog', 'c90'))
  with pytest.raises(ValueError, match="category 5 is 'dog' in .* but 'c5' in"):
    _loaders(train, val)


def test_duplicate_ids_name_the_id_and_the_file(tmp_path):
  ann_file, image_dir = _write_json(tmp_path, {1: (8, 8), 2: (8, 8)}, [],
                                    [{'id': 7, 'name': 'a'}, {'id': 3, 'name': 'b'},
                                     {'id': 7, 'name': 'c'}])
  with pytest.raises(ValueError, match=re.escape(f'{ann_file} lists category id 7 twice')):
    CocoDetection(ann_file, image_dir)
  gt = json.loads(open(ann_file).read())
  gt['categories'] = gt['categories'][:2]
  gt['images'][1]['id'] = 1
  open(ann_file, 'w').write(json.dumps(gt))
  with pytest.raises(ValueError, match=re.escape(f'{ann_file} lists image id 1 twice')):
    CocoDetection(ann_file, image_dir)


def test_errors_name_what_is_wrong(tmp_path):
  args = _write_json(tmp_path, {1: (8, 8), 2: (8, 8)}, [{'image_id': 1, 'bbox': [1, 1, 3, 3]}])
  os.remove(os.path.join(args[1], '2.png'))
  missing = r'1 of the 2 images .* missing .*2\.png \(image id 2\)'
  with pytest.raises(FileNotFoundError, match=missing):
    CocoDetection(*args)
  with pytest.raises(FileNotFoundError, match='annotation file not found: .*nope.json'):
    CocoDetection(tmp_path / 'nope.json', args[1])
  with pytest.raises(FileNotFoundError, match='image folder not found'):
    CocoDetection(args[0], tmp_path / 'nope')
  args = _write_json(tmp_path, {1: (8, 8)}, [], sizes={1: (8, 10)})
  with pytest.raises(ValueError, match='is 8x8 .* says 8x10'):
    CocoDetection(*args)[0]


def _valid_text():
  return json.dumps({
      'images': [{'id': 1, 'file_name': '1.png', 'height': 8, 'width': 8}],
      'annotations': [{'id': 1, 'image_id': 1, 'category_id': 7, 'bbox': [1, 1, 3, 3]}],
      'categories': [{'id': 7, 'name': 'thing'}],
  }, indent=1)


@pytest.mark.parametrize(
    'content, problem',
    [
        (_valid_text()[:100], r'is not valid JSON \(100 characters\): Unterminated string '
         r'starting at: line 10 column 2 \(char 95\); the file ends early: truncated \(an '
         r'interrupted download or copy\?\)$'),
        (_valid_text()[:-3], r"is not valid JSON \(\d+ characters\): Expecting ',' delimiter: "
         r'line \d+ column \d+ \(char \d+\); the file ends early: truncated'),
        ('images: []\n', r'is not valid JSON \(11 characters\): Expecting value: line 1 column 1 '
         r'\(char 0\)$'),
        ('{"images": [], "categories": [}', r'is not valid JSON \(31 characters\): Expecting '
         r'value: line 1 column 31 \(char 30\)$'),
        ('', 'is empty'),
        (' \n', 'is empty'),
        (b'\x89PNG\r\n\x1a\n\xff', 'is not UTF-8 text'),
        ('[1, 2]', "holds a JSON list, not an object; expected a COCO detection file"),
        ('{"images": [], "annotations": []}', r"has no 'categories' list; expected a COCO .* "
         r"\(found keys \['annotations', 'images'\]\)"),
        ('{"categories": [{"id": 1, "name": "a"}]}', "has no 'images' list"),
        ('{"images": {}, "categories": [{"id": 1, "name": "a"}]}',
         "'images' is a dict, not a list"),
        ('{"images": [], "categories": []}', 'lists no categories'),
        ('{"images": [], "categories": [{"id": "cat", "name": "a"}]}',
         r"1 of the 1 categories in .* lack an integer 'id' or a 'name':\n  categories\[0\]"),
        ('{"images": [{"id": 3, "file_name": "3.png", "height": 8}], "categories": '
         '[{"id": 1, "name": "a"}]}', r"1 of the 1 images listed in .* are invalid:\n  "
         r"images\[0\] \(id 3\) has no \['width'\]"),
        ('{"images": [{"id": 3, "file_name": "3.png", "height": 8, "width": 0}], "categories": '
         '[{"id": 1, "name": "a"}]}', 'image 3 \\(3.png\\) has height 8 and width 0; expected '
         'positive integers'),
    ],
)
def test_corrupt_json_errors(tmp_path, content, problem):
  path = tmp_path / 'instances.json'
  if isinstance(content, bytes):
    path.write_bytes(content)
  else:
    path.write_text(content)
  with pytest.raises(ValueError) as error:
    CocoDetection(path, tmp_path)
  message = str(error.value)
  assert str(path) in message and re.search(problem, message), message
  assert error.value.__cause__ is None  # the message says it all, no chained traceback


def test_coco_eval_reads_written_ground_truth(tmp_path):
  # faster-coco-eval scores the ground truth itself as detections at AP 1.
  from faster_coco_eval import COCO, COCOeval_faster

  ds = CocoDetection(*write_coco(tmp_path, _synthetic(), category_ids=(1, 3, 90)))
  dets = []
  for k in range(len(ds)):
    item = ds[k]
    for box, label in zip(item['boxes'], item['labels'], strict=True):
      x1, y1, x2, y2 = box.tolist()
      category = int(ds.label_to_category_id[label])
      dets.append({'image_id': item['image_id'], 'category_id': category,
                   'bbox': [x1, y1, x2 - x1, y2 - y1], 'score': 0.9})
  gt = COCO(ds.annotation_file)
  evaluator = COCOeval_faster(gt, gt.loadRes(dets), 'bbox', print_function=lambda *a: None)
  evaluator.evaluate()
  evaluator.accumulate()
  evaluator.summarize()
  assert evaluator.stats[0] == pytest.approx(1.0)


# ------------------------------------------------------------------ synthetic


def _same(a, b):
  return all(np.array_equal(a[k], b[k]) for k in ('image', 'boxes', 'labels'))


def test_synthetic_deterministic_by_seed_and_split():
  a, b = _synthetic(), _synthetic()
  assert all(_same(a[k], b[k]) for k in range(4))
  assert not any(_same(a[k], _synthetic(seed=2)[k]) for k in range(4))
  assert not any(_same(a[k], _synthetic(split='val')[k]) for k in range(4))
  assert _same(_synthetic(split='val')[1], _synthetic(split='validation')[1])
  with pytest.raises(IndexError):
    a[4]
  with pytest.raises(ValueError, match='num_classes must be in'):
    _synthetic(num_classes=9)


def test_synthetic_set_properties():
  ds = SyntheticDetection(num_images=64, image_size=(128, 128), num_classes=5, seed=0)
  items = [ds[k] for k in range(len(ds))]
  counts = np.array([len(x['labels']) for x in items])
  assert counts.min() >= 2 and counts.max() <= 6 and len(set(counts)) >= 4
  boxes = np.concatenate([x['boxes'] for x in items])
  labels = np.concatenate([x['labels'] for x in items])
  assert np.all(boxes[:, :2] >= 0) and np.all(boxes[:, 2:] <= 128)
  assert np.all(boxes[:, 2:] > boxes[:, :2])
  sides = (boxes[:, 2:] - boxes[:, :2]).max(axis=1)
  assert sides.max() / sides.min() >= 4, (sides.min(), sides.max())
  assert sides.min() >= 8 and sides.max() <= 48
  assert set(labels.tolist()) == set(range(5)) and ds.class_names == (
      'rectangle', 'ellipse', 'triangle', 'ring', 'cross')
  overlapping = touching = 0
  for x in items:
    b = x['boxes']
    lo = np.maximum(b[:, None, :2], b[None, :, :2])
    hi = np.minimum(b[:, None, 2:], b[None, :, 2:])
    gap = np.triu(np.ones((len(b), len(b)), bool), 1)
    overlapping += np.sum(gap & np.all(hi > lo, axis=-1))
    touching += np.sum(gap & np.all(hi >= lo - 1, axis=-1))
  assert overlapping >= 10 and touching > overlapping, (overlapping, touching)


def test_synthetic_classes_differ_in_colour():
  # Object pixels (mean colour inside each box) cluster by class: a nearest-class-mean rule
  # fitted on one split labels most boxes of another; shape is the remaining cue.
  def box_colours(ds):
    feats, labels = [], []
    for k in range(len(ds)):
      x = ds[k]
      for (x1, y1, x2, y2), label in zip(x['boxes'].astype(int), x['labels'], strict=True):
        cy = (y1 + y2) // 2  # a strip across the middle crosses every shape
        feats.append(x['image'][cy - 1 : cy + 2, x1:x2].reshape(-1, 3).mean(0))
        labels.append(label)
    return np.array(feats), np.array(labels)

  xt, yt = box_colours(SyntheticDetection(num_images=24, num_classes=5))
  xv, yv = box_colours(SyntheticDetection(num_images=12, num_classes=5, split='val'))
  means = np.stack([xt[yt == c].mean(0) for c in range(5)])
  pred = np.argmin(((xv[:, None] - means[None]) ** 2).sum(-1), axis=1)
  assert np.mean(pred == yv) > 0.6


# ----------------------------------------------------------------- transforms


@pytest.mark.parametrize(
    'size, expected',
    [
        # (h, w) -> (h, w); mmcv.rescale_size: factor min(1333 / long, 800 / short),
        # int(side * factor + 0.5). COCO's 640x480 images become 1067x800 in mmdet logs.
        ((480, 640), (800, 1067)),
        ((2000, 500), (1333, 333)),
        ((500, 2000), (333, 1333)),
        ((800, 1333), (800, 1333)),
        ((100, 100), (800, 800)),
        ((640, 427), (1199, 800)),
    ],
)
def test_resize_keep_ratio_matches_mmdet(size, expected):
  image = np.zeros(size + (3,), np.uint8)
  boxes = np.array([[0, 0, size[1], size[0]], [10, 20, 30, 40]], np.float32)
  out, out_boxes, (h_ratio, w_ratio) = resize_keep_ratio(image, boxes, (1333, 800))
  assert out.shape == expected + (3,) and out.dtype == np.uint8
  assert (h_ratio, w_ratio) == (expected[0] / size[0], expected[1] / size[1])
  np.testing.assert_allclose(out_boxes[0], [0, 0, expected[1], expected[0]], rtol=1e-6)
  np.testing.assert_allclose(
      out_boxes[1], [10 * w_ratio, 20 * h_ratio, 30 * w_ratio, 40 * h_ratio], rtol=1e-6
  )
  assert resize_keep_ratio(image, boxes, (800, 1333))[0].shape == out.shape  # order free


def test_resize_clips_boxes_to_the_image():
  _, boxes, _ = resize_keep_ratio(np.zeros((10, 20, 3), np.uint8), [[-2, 1, 25, 12]], (40, 20))
  np.testing.assert_allclose(boxes, [[0, 2, 40, 20]])


def test_flip_boxes():
  boxes = np.array([[2, 3, 10, 8], [0, 0, 32, 5]], np.float32)
  np.testing.assert_array_equal(flip_boxes(boxes, 32), [[22, 3, 30, 8], [0, 0, 32, 5]])
  np.testing.assert_array_equal(flip_boxes(flip_boxes(boxes, 32), 32), boxes)
  assert flip_boxes(np.zeros((0, 4)), 32).shape == (0, 4)
  image = np.arange(2 * 32 * 3, dtype=np.uint8).reshape(2, 32, 3)
  rng = np.random.default_rng(0)
  flipped, fb = random_flip(rng, image, boxes, prob=1.0)
  np.testing.assert_array_equal(flipped, image[:, ::-1])
  np.testing.assert_array_equal(fb, flip_boxes(boxes, 32))
  same, sb = random_flip(rng, image, boxes, prob=0.0)
  assert same is image and np.array_equal(sb, boxes)
  # The flipped box covers the mirrored pixels.
  marked = np.zeros((10, 32), bool)
  marked[3:8, 2:10] = True
  x1, y1, x2, y2 = flip_boxes(boxes[:1], 32)[0].astype(int)
  assert marked[:, ::-1][y1:y2, x1:x2].all() and marked[:, ::-1].sum() == (y2 - y1) * (x2 - x1)


def test_train_and_eval_transforms():
  example = _synthetic(image_size=(40, 60))[0]
  train = DetectionTrainTransform(scale=(120, 80), flip_prob=0.5)
  flips = set()
  for seed in range(8):
    out = train(example, np.random.default_rng(seed))
    assert out['image'].shape == (80, 120, 3) and out['image'].dtype == np.float32
    assert out['image_size'] == (80, 120) and out['orig_size'] == (40, 60)
    assert out['scale_factor'] == (2.0, 2.0)
    flips.add(bool(np.array_equal(out['boxes'], example['boxes'] * 2)))
    again = train(example, np.random.default_rng(seed))
    np.testing.assert_array_equal(again['image'], out['image'])  # a pure function of rng
  assert flips == {True, False}  # both outcomes occur
  out = DetectionEvalTransform(scale=(120, 80))(example)
  np.testing.assert_array_equal(out['boxes'], example['boxes'] * 2)
  np.testing.assert_array_equal(out['labels'], example['labels'])
  pixel = example['image'][0, 0].astype(np.float32)
  np.testing.assert_allclose(
      out['image'][0, 0], (pixel - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD), atol=1e-5
  )
  with pytest.raises(ValueError, match='needs an np.random.Generator'):
    train(example, None)


# -------------------------------------------------------------------- collate


def _example(h, w, num_boxes, image_id=1):
  boxes = np.array([[i, i, i + 2 + i, i + 3] for i in range(num_boxes)], np.float32)
  return {
      'image': np.ones((h, w, 3), np.float32),
      'boxes': boxes.reshape(-1, 4),
      'labels': np.arange(num_boxes, dtype=np.int32),
      'image_id': image_id,
      'orig_size': (2 * h, 2 * w),
      'image_size': (h, w),
      'scale_factor': (0.5, 0.5),
  }


def test_default_canvas_sizes():
  assert default_canvas_sizes((1333, 800)) == ((800, 1344), (1344, 800), (1344, 1344))
  assert default_canvas_sizes((800, 1333)) == ((800, 1344), (1344, 800), (1344, 1344))
  assert default_canvas_sizes((64, 64)) == ((64, 64),)


def test_collate_canvas_choice_and_masks():
  canvases = default_canvas_sizes((64, 40), divisor=8)
  assert canvases == ((40, 64), (64, 40), (64, 64))
  landscape = collate([_example(40, 64, 2), _example(30, 50, 0, 2)], canvases, max_boxes=4)
  assert landscape['inputs'].shape == (2, 40, 64, 3)
  portrait = collate([_example(64, 40, 1), _example(20, 20, 3)], canvases, max_boxes=4)
  assert portrait['inputs'].shape == (2, 64, 40, 3)
  mixed = collate([_example(40, 64, 1), _example(64, 40, 1)], canvases, max_boxes=4)
  assert mixed['inputs'].shape == (2, 64, 64, 3)
  with pytest.raises(ValueError, match=r'needs 70x10 .*height from image 5'):
    collate([_example(70, 10, 1, image_id=5)], canvases)

  b = landscape
  assert b['inputs'].dtype == np.float32
  assert b['inputs'][1, :30, :50].min() == 1 and b['inputs'][1, 30:].max() == 0
  assert b['inputs'][1, :, 50:].max() == 0
  np.testing.assert_array_equal(b['box_mask'], [[1, 1, 0, 0], [0, 0, 0, 0]])
  np.testing.assert_array_equal(b['labels'], [[0, 1, -1, -1], [-1, -1, -1, -1]])
  np.testing.assert_array_equal(b['boxes'][0, :2], _example(40, 64, 2)['boxes'])
  assert not b['boxes'][0, 2:].any() and not b['boxes'][1].any()
  np.testing.assert_array_equal(b['image_size'], [[40, 64], [30, 50]])
  np.testing.assert_array_equal(b['orig_size'], [[80, 128], [60, 100]])
  np.testing.assert_array_equal(b['image_id'], [1, 2])
  np.testing.assert_array_equal(b['batch_mask'], [1, 1])
  dtypes = {k: v.dtype for k, v in b.items()}
  assert dtypes == {
      'inputs': np.float32, 'boxes': np.float32, 'labels': np.int32, 'box_mask': bool,
      'image_size': np.int32, 'orig_size': np.int32, 'scale_factor': np.float32,
      'image_id': np.int64, 'batch_mask': np.float32,
  }

  padded = pad_batch(b, 4)
  assert {k: v.shape[0] for k, v in padded.items()} == dict.fromkeys(b, 4)
  np.testing.assert_array_equal(padded['batch_mask'], [1, 1, 0, 0])
  assert not padded['box_mask'][2:].any() and (padded['labels'][2:] == -1).all()
  assert (padded['scale_factor'][2:] == 1).all() and (padded['image_id'][2:] == -1).all()
  assert not padded['inputs'][2:].any()
  with pytest.raises(ValueError, match='cannot pad a batch of 2 entries to the smaller'):
    pad_batch(b, 1)


def test_collate_keeps_the_largest_boxes_and_warns_once(monkeypatch):
  monkeypatch.setattr(transforms, '_warned_max_boxes', False)
  example = _example(40, 64, 6, image_id=17)  # box i has area (2 + i) * 3
  with pytest.warns(UserWarning, match='image 17 has 6 boxes, more than max_boxes=4'):
    b = collate([example], [(40, 64)], max_boxes=4)
  np.testing.assert_array_equal(b['labels'][0], [2, 3, 4, 5])
  assert b['box_mask'].all()
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    collate([example], [(40, 64)], max_boxes=4)  # silent the second time


def test_synthetic_through_the_pipeline():
  source = _synthetic(image_size=(64, 96))
  train = DetectionTrainTransform(scale=(120, 80))
  rng = np.random.default_rng(0)
  batch = collate(
      [train(source[k], rng) for k in range(3)], default_canvas_sizes((120, 80)), max_boxes=8
  )
  assert batch['inputs'].shape == (3, 96, 128, 3)
  counts = [len(source[k]['labels']) for k in range(3)]
  np.testing.assert_array_equal(batch['box_mask'].sum(1), counts)
  np.testing.assert_allclose(batch['scale_factor'], 1.25)


@pytest.mark.parametrize('num_classes', [0, 6])
def test_synthetic_classes_beyond_its_shapes_are_a_dataset_error(num_classes):
  # A DatasetError: main prints it as one `error:` line (a ValueError was a traceback).
  from projects.cvt_detection.data.synthetic import SyntheticDetection
  from projects.training.datasets import DatasetError

  with pytest.raises(DatasetError, match=rf'num_classes must be in \[1, 5\], got {num_classes}'):
    SyntheticDetection(num_classes=num_classes)
