"""Bad dataset files are found when the dataset is built, all listed in one error.

Segmentation folders: pairs, sizes and modes (headers), label values (masks decoded once,
then cached per file by size and mtime); COCO-format detection: missing image files and
header sizes that differ from the json. Plus a training run that stops before training.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from projects.cvt_detection.data import builder as detection_builder
from projects.cvt_detection.data.coco import CocoDetection
from projects.cvt_segmentation.data import builder, folders
from projects.training import checkpoints, data_index
from projects.training.datasets import DatasetError, MissingFilesError

from . import trainer_support as support

SIZE = (40, 48)  # (h, w) of the tiny images


def _save(path, array):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path)


def _folder(root, num_images=3, num_classes=3):
  """`img/{train,val}/<i>.png` and `ann/{train,val}/<i>.png`, all valid; the
  `build_loaders('folder', ...)` arguments."""
  rng = np.random.default_rng(0)
  for split in ('train', 'val'):
    for i in range(num_images):
      _save(root / 'img' / split / f'{i}.png', rng.integers(0, 256, SIZE + (3,), np.uint8))
      mask = rng.integers(0, num_classes, SIZE).astype(np.uint8)
      mask[:4] = 255
      _save(root / 'ann' / split / f'{i}.png', mask)
  return dict(train_images=str(root / 'img/train'), train_masks=str(root / 'ann/train'),
              val_images=str(root / 'img/val'), val_masks=str(root / 'ann/val'),
              num_classes=num_classes)


def _build(args, **extra):
  return builder.build_loaders('folder', batch_size=2, eval_batch_size=2, num_threads=0,
                               crop_size=(32, 32), scale=(64, 32), **args, **extra)


def _count_decodes(monkeypatch):
  """Counts the masks `validate_splits` decodes (`folders.read_label` calls)."""
  calls = []
  read_label = folders.read_label

  def counting(path):
    calls.append(path)
    return read_label(path)

  monkeypatch.setattr(folders, 'read_label', counting)
  return calls


def _error_lines(error):
  return [line for line in str(error).splitlines() if line.startswith('  ')]


def test_bad_masks_in_both_splits_fail_the_build_in_one_error(tmp_path):
  args = _folder(tmp_path)
  wrong_size, out_of_range = tmp_path / 'ann/train/1.png', tmp_path / 'ann/val/2.png'
  _save(wrong_size, np.zeros((40, 50), np.uint8))
  _save(out_of_range, np.full(SIZE, 7, np.uint8))
  with pytest.raises(DatasetError) as error:
    _build(args)
  message = str(error.value)
  assert message.startswith('2 of the 6 image/mask pairs of the train and validation splits '
                            'are invalid (checked: pairs, decoding, sizes, modes, label values):')
  assert _error_lines(error.value) == [
      f'  train: {wrong_size}: size 40x50 (h x w); expected 40x48, the size of its image '
      f'{tmp_path / "img/train/1.png"}',
      f'  validation: {out_of_range}: label values [7]; expected 0..2 or 255 (ignore) for 3 '
      'classes',
  ]


def test_unpaired_images_are_listed_with_the_other_problems(tmp_path):
  args = _folder(tmp_path)
  os.remove(tmp_path / 'ann/train/0.png')
  os.remove(tmp_path / 'ann/val/1.png')
  _save(tmp_path / 'ann/val/2.png', np.zeros((8, 8), np.uint8))
  with pytest.raises(DatasetError) as error:
    _build(args)
  assert str(error.value).startswith('3 of the 6 image/mask pairs')
  assert _error_lines(error.value) == [
      f'  train: {tmp_path / "img/train/0.png"}: no label file; expected '
      f'{tmp_path / "ann/train/0.png"}',
      f'  validation: {tmp_path / "img/val/1.png"}: no label file; expected '
      f'{tmp_path / "ann/val/1.png"}',
      f'  validation: {tmp_path / "ann/val/2.png"}: size 8x8 (h x w); expected 40x48, the size '
      f'of its image {tmp_path / "img/val/2.png"}',
  ]
  # Built directly, a split lists all its unpaired images (a FileNotFoundError too).
  os.remove(tmp_path / 'ann/train/2.png')
  with pytest.raises(MissingFilesError, match=r'^2 of the 3 images in .* have no label file') as e:
    folders.image_mask_folders(args['train_images'], args['train_masks'], num_classes=3)
  assert isinstance(e.value, FileNotFoundError) and len(_error_lines(e.value)) == 2


def test_valid_dataset_passes_and_the_second_build_decodes_nothing(tmp_path, monkeypatch):
  args = _folder(tmp_path)
  decodes = _count_decodes(monkeypatch)
  _, evaluation, meta = _build(args)
  assert meta['num_train_examples'] == meta['num_eval_examples'] == 3
  assert len(decodes) == 6
  for split in ('train', 'val'):
    index = Path(data_index.index_path(tmp_path / 'ann' / split))
    assert len(json.loads(index.read_text())['files']) == 6  # 3 images and 3 masks
    assert not [p for p in os.listdir(index.parent) if p.endswith('.tmp')]  # written atomically
  decodes.clear()
  _build(args)
  assert decodes == []
  assert evaluation.source[0]['label'].shape == SIZE  # the read-time checks pass too


def test_a_changed_mask_is_rescanned(tmp_path, monkeypatch):
  args = _folder(tmp_path)
  decodes = _count_decodes(monkeypatch)
  _build(args)
  changed = tmp_path / 'ann/val/0.png'
  before = os.stat(changed)
  _save(changed, np.full(SIZE, 9, np.uint8))  # same size on disk or not: mtime changes
  os.utime(changed, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
  decodes.clear()
  with pytest.raises(DatasetError, match=r'0\.png: label values \[9\]'):
    _build(args)
  assert decodes == [str(changed)]


@pytest.mark.parametrize('content', ['{"format": "cvt-dense file in', 'not json', '[1, 2]',
                                     '{"format": "cvt-dense file index", "version": 1, '
                                     '"files": []}'])
def test_a_broken_index_is_ignored_and_rebuilt(tmp_path, monkeypatch, content):
  args = _folder(tmp_path)
  _build(args)
  index = Path(data_index.index_path(tmp_path / 'ann/train'))
  index.write_text(content)
  decodes = _count_decodes(monkeypatch)
  _build(args)
  assert len(decodes) == 3  # the train masks; the validation index is intact
  assert len(json.loads(index.read_text())['files']) == 6


def test_the_index_lives_in_the_user_cache_not_in_the_dataset(tmp_path, monkeypatch):
  args = _folder(tmp_path / 'data')
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
  decodes = _count_decodes(monkeypatch)
  before = sorted(p for p in (tmp_path / 'data').rglob('*'))
  _build(args)
  assert sorted(p for p in (tmp_path / 'data').rglob('*')) == before  # nothing written there
  cached = sorted(p.name for p in (tmp_path / 'cache/cvt-dense/index').iterdir())
  assert len(cached) == 2 and cached[0].startswith('train-') and cached[1].startswith('val-')
  decodes.clear()
  _build(args)
  assert decodes == []


def test_validate_modes(tmp_path, monkeypatch):
  args = _folder(tmp_path)
  _save(tmp_path / 'ann/train/1.png', np.zeros((40, 50), np.uint8))
  _save(tmp_path / 'ann/val/2.png', np.full(SIZE, 7, np.uint8))
  decodes = _count_decodes(monkeypatch)
  with pytest.raises(DatasetError, match=r'^1 of the 6 .*\(checked: pairs, sizes, modes\)') as e:
    _build(args, validate='headers')
  assert 'train/1.png: size 40x50' in str(e.value) and decodes == []
  # 'none': only the pairs; the read-time checks remain the last line of defence.
  _, evaluation, _ = _build(args, validate='none')
  with pytest.raises(ValueError, match=r'val/2\.png holds values \[7\]'):
    evaluation.source[2]
  with pytest.raises(ValueError, match="validate must be one of .*got 'fast'"):
    _build(args, validate='fast')


def test_label_mappings_and_modes(tmp_path):
  base = support.make_ade20k(tmp_path / 'ade', size=(24, 32))
  bad = base / 'annotations/validation/ADE_validation_00000001.png'
  _save(bad, np.full((24, 32), 151, np.uint8))
  with pytest.raises(DatasetError) as error:
    builder.build_loaders('ade20k', batch_size=2, eval_batch_size=2, data_dir=str(base))
  assert _error_lines(error.value) == [
      f'  validation: {bad}: label values [151]; expected 0..150 or 255 (ignore) for 150 '
      'classes after reduce_zero_label']

  root = support.make_cityscapes(tmp_path / 'city', size=(16, 32))
  rgb = root / 'gtFine/val/frankfurt/frankfurt_000000_000019_gtFine_labelIds.png'
  _save(rgb, np.zeros((16, 32, 3), np.uint8))  # the colour image instead of the ids
  with pytest.raises(DatasetError, match=r"labelIds\.png: mode 'RGB'; expected a single-channel"):
    builder.build_loaders('cityscapes', batch_size=2, eval_batch_size=2, data_dir=str(root))

  # A label mapping that leaves the class range is caught too.
  _folder(tmp_path / 'folder')
  images = sorted(str(p) for p in (tmp_path / 'folder/img/train').iterdir())
  masks = [p.replace('/img/', '/ann/') for p in images]

  def double(label):
    return np.where(label == 255, 255, label * 2).astype(np.uint8)

  names = ('a', 'b', 'c')
  source = folders.SegmentationFolder(images, masks, 3, names, label_map=double)
  with pytest.raises(DatasetError, match=r'label values \[2\] become \[4\] after double; '
                                         r'expected 0\.\.2 or 255'):
    folders.validate_splits({'train': source})
  folders.validate_splits({'train': folders.SegmentationFolder(images, masks, 3, names)})


def _coco_folder(tmp_path):
  image_dir = tmp_path / 'images'
  infos = []
  for image_id in (1, 2, 3):
    _save(image_dir / f'{image_id}.png', np.full((8, 8, 3), 90, np.uint8))
    infos.append({'id': image_id, 'file_name': f'{image_id}.png', 'height': 8, 'width': 8})
  infos[2]['width'] = 10
  os.remove(image_dir / '2.png')
  annotations = [{'id': 1, 'image_id': 1, 'category_id': 1, 'bbox': [1, 1, 3, 3], 'area': 9,
                  'iscrowd': 0}]
  ann_file = tmp_path / 'instances.json'
  ann_file.write_text(json.dumps({'images': infos, 'annotations': annotations,
                                  'categories': [{'id': 1, 'name': 'thing'}]}))
  return str(ann_file), str(image_dir)


def test_coco_missing_and_resized_images_are_listed_when_built(tmp_path):
  ann_file, image_dir = _coco_folder(tmp_path)
  expected = [f'  {image_dir}/2.png (image id 2) is missing',
              f'  {image_dir}/3.png (image id 3) is 8x8 (h x w) but {ann_file} says 8x10']
  with pytest.raises(MissingFilesError) as error:
    CocoDetection(ann_file, image_dir)
  assert str(error.value).startswith(f'2 of the 3 images listed in {ann_file} are missing')
  assert _error_lines(error.value) == expected
  with pytest.raises(DatasetError) as error:
    detection_builder.build_loaders(
        'coco_format', batch_size=2, eval_batch_size=2, train_annotations=ann_file,
        train_images=image_dir, val_annotations=ann_file, val_images=image_dir)
  assert _error_lines(error.value) == expected
  # validate='none' checks that the files exist, not their sizes.
  with pytest.raises(FileNotFoundError, match=r'images/2\.png \(image id 2\) is missing$'):
    CocoDetection(ann_file, image_dir, validate='none')


def test_training_run_with_a_bad_validation_mask_stops_before_training(tmp_path):
  base = support.make_ade20k(tmp_path / 'data', size=(24, 32))
  bad = base / 'annotations/validation/ADE_validation_00000001.png'
  _save(bad, np.full((24, 32), 200, np.uint8))
  config = support.REPO / 'projects/cvt_segmentation/configs/ade20k_cvt13_upernet.py'
  workdir = tmp_path / 'work'
  error, stderr = support.main_error(f'{config}:data_dir={base},runlocal', workdir)
  assert error.startswith('error: 1 of the 4 image/mask pairs')
  assert f'validation: {bad}: label values [200]' in stderr
  assert checkpoints.latest_step(workdir) is None


def _truncate(path):
  """Cuts an image file in half, as an interrupted copy or download leaves it."""
  data = Path(path).read_bytes()
  Path(path).write_bytes(data[: len(data) // 2])


def test_truncated_images_are_all_named_when_built(tmp_path, monkeypatch):
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
  args = _folder(tmp_path)
  jpeg = tmp_path / 'img/train/1.jpg'
  os.remove(tmp_path / 'img/train/1.png')
  Image.fromarray(np.random.default_rng(0).integers(0, 256, SIZE + (3,), np.uint8)).save(jpeg)
  _truncate(jpeg)
  _truncate(tmp_path / 'img/val/2.png')
  # The headers are whole: only a decode of the pixels finds these files.
  _build(args, validate='headers')
  with pytest.raises(DatasetError) as error:
    _build(args)
  assert str(error.value).startswith('2 of the 6 image/mask pairs')
  lines = _error_lines(error.value)
  assert len(lines) == 2
  assert f'cannot read image {jpeg}: image file is truncated' in lines[0]
  assert f'cannot read image {tmp_path / "img/val/2.png"}:' in lines[1]
  # COCO-format detection: the same decode, the file and its image id named.
  ann_file, image_dir = _coco_folder(tmp_path / 'coco')
  _save(Path(image_dir) / '2.png', np.full((8, 8, 3), 90, np.uint8))
  _save(Path(image_dir) / '3.png', np.random.default_rng(0).integers(0, 256, (8, 10, 3),
                                                                      np.uint8))
  _truncate(Path(image_dir) / '3.png')
  CocoDetection(ann_file, image_dir, validate='headers')
  with pytest.raises(DatasetError, match=rf'cannot read image {image_dir}/3\.png \(image id 3\): '):
    CocoDetection(ann_file, image_dir)
