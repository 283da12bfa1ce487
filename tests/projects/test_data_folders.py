"""Folder datasets on tiny trees built in tmp_path: ADE20K, Cityscapes, generic pairs."""

import os

import numpy as np
import pytest
from PIL import Image

from projects.cvt_segmentation.data import folders
from projects.training.datasets import DatasetError


def _write_image(path, h, w, fmt=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rgb = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
  Image.fromarray(rgb).save(path, format=fmt)


def _write_label(path, label, mode='L'):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  im = Image.fromarray(label.astype(np.uint8)).convert(mode)
  if mode == 'P':  # VOC-style palette mask: pixel values are palette indices
    im.putpalette([v for i in range(256) for v in (i, 255 - i, i)])
  im.save(path)


def _ade_tree(root, label):
  base = os.path.join(root, 'ADEChallengeData2016')
  for split in ('training', 'validation'):
    for stem in ('ADE_x_0001', 'ADE_x_0002'):
      _write_image(os.path.join(base, 'images', split, stem + '.jpg'), *label.shape)
      _write_label(os.path.join(base, 'annotations', split, stem + '.png'), label)
  return base


def test_ade20k_reduce_zero_label(tmp_path):
  raw = np.array([[0, 1, 2, 150], [255, 10, 0, 149]], np.uint8)
  base = _ade_tree(str(tmp_path), raw)
  for root in (base, str(tmp_path)):  # the dataset folder or its parent
    ds = folders.ade20k(root, 'training')
    assert len(ds) == 2 and ds.num_classes == 150 and len(ds.class_names) == 150
    ex = ds[0]
    assert ex['image'].shape == (2, 4, 3) and ex['image'].dtype == np.uint8
    np.testing.assert_array_equal(ex['label'], [[255, 0, 1, 149], [255, 9, 255, 148]])
    assert ex['name'] == 'ADE_x_0001'
  assert len(folders.ade20k(base, 'validation')) == 2
  assert folders.ADE20K_CLASSES[0] == 'wall' and folders.ADE20K_CLASSES[-1] == 'flag'


def test_ade20k_label_out_of_range_raises_lazily(tmp_path):
  base = _ade_tree(str(tmp_path), np.array([[0, 1], [151, 3]], np.uint8))
  ds = folders.ade20k(base, 'training')  # listing succeeds: values are checked when read
  with pytest.raises(ValueError, match=r'ADE_x_0001\.png.*\[151\]'):
    ds[0]


def test_ade20k_missing_folder_and_mask(tmp_path):
  with pytest.raises(FileNotFoundError, match='images/training'):
    folders.ade20k(str(tmp_path / 'nowhere'))
  base = _ade_tree(str(tmp_path), np.zeros((2, 2), np.uint8))
  os.remove(os.path.join(base, 'annotations', 'training', 'ADE_x_0001.png'))
  os.remove(os.path.join(base, 'annotations', 'training', 'ADE_x_0002.png'))
  with pytest.raises(FileNotFoundError, match=r'annotations/training/ADE_x_0001\.png'):
    folders.ade20k(base, 'training')


def _city_tree(root, label_ids):
  for split, city in (('train', 'aachen'), ('val', 'lindau')):
    stem = f'{city}_000000_000019'
    image = os.path.join(root, 'leftImg8bit', split, city, stem + '_leftImg8bit.png')
    _write_image(image, *label_ids.shape)
    label = os.path.join(root, 'gtFine', split, city, stem + '_gtFine_labelIds.png')
    _write_label(label, label_ids)


def test_cityscapes_label_ids_to_train_ids(tmp_path):
  ids = np.array([[7, 8, 0, 33], [29, 255, 26, 6]], np.uint8)
  _city_tree(str(tmp_path), ids)
  ds = folders.cityscapes(str(tmp_path), 'train')
  assert len(ds) == 1 and ds.num_classes == 19 and ds.class_names[-1] == 'bicycle'
  ex = ds[0]
  np.testing.assert_array_equal(ex['label'], [[0, 1, 255, 18], [255, 255, 13, 255]])
  assert ex['image'].shape == (2, 4, 3)
  assert len(folders.cityscapes(str(tmp_path), 'val')) == 1
  # The full table: 19 ids map to 0..18 in order, every other byte to 255.
  lut = folders.cityscapes_label_ids_to_train_ids(np.arange(256, dtype=np.uint8))
  assert sorted(lut[lut != 255].tolist()) == list(range(19))


def test_cityscapes_missing_mask_names_first_missing_file(tmp_path):
  _city_tree(str(tmp_path), np.zeros((2, 2), np.uint8))
  os.remove(tmp_path / 'gtFine' / 'val' / 'lindau' / 'lindau_000000_000019_gtFine_labelIds.png')
  with pytest.raises(FileNotFoundError, match='lindau_000000_000019_gtFine_labelIds.png'):
    folders.cityscapes(str(tmp_path), 'val')
  with pytest.raises(FileNotFoundError, match='leftImg8bit/train'):
    folders.cityscapes(str(tmp_path / 'none'), 'train')
  os.makedirs(tmp_path / 'only_images' / 'leftImg8bit' / 'train')
  with pytest.raises(FileNotFoundError, match='gtFine/train'):
    folders.cityscapes(str(tmp_path / 'only_images'), 'train')


def test_generic_folder_pairs_and_errors(tmp_path):
  images, masks = tmp_path / 'images', tmp_path / 'masks'
  _write_image(str(images / 'b.png'), 3, 5)
  _write_image(str(images / 'sub' / 'a.jpg'), 3, 5)
  _write_label(str(masks / 'b.png'), np.full((3, 5), 2))
  _write_label(str(masks / 'sub' / 'a.png'), np.array([[0, 1, 2, 255, 1]] * 3), mode='P')
  ds = folders.image_mask_folders(str(images), str(masks), num_classes=3)
  assert len(ds) == 2 and ds.class_names == ('class_0', 'class_1', 'class_2')
  assert (ds[0]['label'] == 2).all()  # sorted by path: b.png before sub/a.jpg
  np.testing.assert_array_equal(ds[1]['label'][0], [0, 1, 2, 255, 1])  # palette indices
  reduced = folders.image_mask_folders(
      str(images), str(masks), num_classes=2, reduce_zero_label=True
  )
  np.testing.assert_array_equal(reduced[1]['label'][0], [255, 0, 1, 255, 0])
  # A value above the class count (and not 255) raises when that example is read.
  too_few = folders.image_mask_folders(str(images), str(masks), num_classes=2)
  with pytest.raises(ValueError, match=r'b\.png.*\[2\]'):
    too_few[0]
  # Missing mask: the error names the first missing mask file.
  _write_image(str(images / 'c.jpg'), 3, 5)
  with pytest.raises(FileNotFoundError, match=r'masks/c\.png'):
    folders.image_mask_folders(str(images), str(masks), num_classes=3)
  with pytest.raises(FileNotFoundError, match='nope'):
    folders.image_mask_folders(str(tmp_path / 'nope'), str(masks), num_classes=3)


def test_rgb_mask_is_rejected(tmp_path):
  _write_image(str(tmp_path / 'i' / 'a.jpg'), 4, 4)
  _write_image(str(tmp_path / 'm' / 'a.png'), 4, 4)  # RGB, not class indices
  ds = folders.image_mask_folders(str(tmp_path / 'i'), str(tmp_path / 'm'), num_classes=3)
  with pytest.raises(ValueError, match="mode 'RGB'"):
    ds[0]


# Issue 27: labels that make training meaningless, and files that would pair wrongly.


def _pairs(root, masks, image_names=None):
  """`img/{train,val}/<i>.png` with `ann/.../<i>.png` = `masks[i]`; `build_loaders` args."""
  for split in ('train', 'val'):
    for i, mask in enumerate(masks):
      _write_image(str(root / 'img' / split / f'{i}.png'), *mask.shape)
      _write_label(str(root / 'ann' / split / f'{i}.png'), mask)
  return {f'{split}_{kind}': str(root / folder / split) for split in ('train', 'val')
          for kind, folder in (('images', 'img'), ('masks', 'ann'))}


def _build(args, num_classes=2, **extra):
  from projects.cvt_segmentation.data import builder

  return builder.build_loaders('folder', batch_size=2, eval_batch_size=2, num_threads=0,
                               crop_size=(8, 8), scale=(16, 8), num_classes=num_classes,
                               **args, **extra)


def _binary(h=8, w=8):
  mask = np.zeros((h, w), np.uint8)
  mask[2:5, 3:6] = 255
  return mask


def test_binary_masks_stored_as_0_255_are_an_error_naming_files(tmp_path, capsys):
  args = _pairs(tmp_path, [_binary(), _binary(), np.zeros((8, 8))])
  with pytest.raises(DatasetError) as error:
    _build(args)
  lines = str(error.value).splitlines()
  assert len(lines) == 3 and lines[0] == 'the masks of 2 splits make training meaningless:'
  assert lines[1].startswith(f'  train: the 3 masks hold only the values 0 and 255 (such as '
                             f'{tmp_path}/ann/train/0.png, {tmp_path}/ann/train/1.png)')
  assert 'only class 0 is labelled' in lines[1] and 'map 255 to 1' in lines[1]
  assert lines[2].startswith('  validation: the 3 masks hold only the values 0 and 255')
  # reduce_zero_label makes them all ignore: still the same finding.
  with pytest.raises(DatasetError, match='hold only the values 0 and 255'):
    _build(args, reduce_zero_label=True, num_classes=2)
  assert capsys.readouterr().err == ''


def test_masks_without_a_labelled_pixel_are_an_error(tmp_path):
  ignore = np.full((8, 8), 255, np.uint8)
  args = _pairs(tmp_path, [ignore, ignore])
  with pytest.raises(DatasetError) as error:
    _build(args)
  assert str(error.value).splitlines() == [
      'the masks of 2 splits make training meaningless:',
      f'  train: the 2 masks hold only 255 (ignore); nothing to train on (such as '
      f'{tmp_path}/ann/train/0.png, {tmp_path}/ann/train/1.png)',
      f'  validation: the 2 masks hold only 255 (ignore); nothing to score (such as '
      f'{tmp_path}/ann/val/0.png, {tmp_path}/ann/val/1.png)']


def test_a_class_missing_from_the_training_masks_is_one_warning(tmp_path, capsys):
  mask = np.zeros((8, 8), np.uint8)
  mask[:4] = 2
  args = _pairs(tmp_path, [mask, mask, mask])
  _build(args, num_classes=4)
  err = capsys.readouterr().err
  assert err.splitlines() == [
      'warning: train: classes 1 (class_1), 3 (class_3) of 4 appear in none of its 3 masks; '
      'the model cannot learn them']
  _build(args, num_classes=3, class_names=['sky', 'road', 'car'])  # rerun: cached facts
  assert capsys.readouterr().err.splitlines() == [
      'warning: train: class 1 (road) of 3 appears in none of its 3 masks; the model cannot '
      'learn it']


def test_a_folder_of_unsupported_images_names_the_types_found(tmp_path):
  for i in range(3):
    _write_image(str(tmp_path / 'img' / f'{i}.gif'), 4, 4, fmt='GIF')
  (tmp_path / 'img' / 'notes.txt').write_text('x')
  os.makedirs(tmp_path / 'ann')
  with pytest.raises(FileNotFoundError) as error:
    folders.image_mask_folders(str(tmp_path / 'img'), str(tmp_path / 'ann'), num_classes=2)
  assert str(error.value) == (
      f'no images found in {tmp_path}/img: it holds 3 .gif files, 1 .txt file; supported: '
      '.jpg, .jpeg, .png, .bmp, .tif, .tiff, .webp')


def test_images_of_unsupported_types_beside_supported_ones_are_a_warning(tmp_path, caplog):
  _write_image(str(tmp_path / 'img' / 'a.png'), 4, 4)
  _write_image(str(tmp_path / 'img' / 'b.gif'), 4, 4, fmt='GIF')
  _write_label(str(tmp_path / 'ann' / 'a.png'), np.zeros((4, 4)))
  data = folders.image_mask_folders(str(tmp_path / 'img'), str(tmp_path / 'ann'), num_classes=2)
  assert len(data) == 1
  assert (f'{tmp_path}/img: skipped 1 image(s) of unsupported types (such as '
          f'{tmp_path}/img/b.gif); supported: .jpg') in caplog.text


def test_two_images_that_would_share_one_mask_are_an_error(tmp_path):
  _write_image(str(tmp_path / 'img' / 'a.jpg'), 4, 4)
  _write_image(str(tmp_path / 'img' / 'a.png'), 4, 4)
  _write_image(str(tmp_path / 'img' / 'b.png'), 4, 4)
  for stem in ('a', 'b'):
    _write_label(str(tmp_path / 'ann' / f'{stem}.png'), np.zeros((4, 4)))
  with pytest.raises(DatasetError) as error:
    folders.image_mask_folders(str(tmp_path / 'img'), str(tmp_path / 'ann'), num_classes=2)
  assert str(error.value) == (
      f'{tmp_path}/img/a.jpg and {tmp_path}/img/a.png would pair with the same mask '
      f'{tmp_path}/ann/a.png; keep one image per mask (rename or remove the others)')


def test_training_on_binary_0_255_masks_stops_with_one_error_line(tmp_path):
  """As a user runs it: `main` on a folder config, before anything compiles."""
  import subprocess
  import sys

  from . import trainer_support as support

  args = _pairs(tmp_path / 'data', [_binary(32, 32)] * 2)
  config = tmp_path / 'binary.py'
  config.write_text(
      'from projects.cvt_segmentation.configs import synthetic_demo\n\n\n'
      'def get_config():\n'
      "  config = synthetic_demo.get_config('runlocal')\n"
      '  with config.unlocked():\n'
      "    config.dataset_name = 'folder'\n"
      f'    config.dataset_configs = dict(num_classes=2, crop_size=(32, 32), **{args!r})\n'
      '  return config\n')
  workdir = tmp_path / 'work'
  proc = subprocess.run(
      [sys.executable, '-m', 'projects.cvt_segmentation.main', f'--config={config}',
       f'--workdir={workdir}'], cwd=support.REPO, env=support.subprocess_env(),
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
  assert errors == ['error: the masks of 2 splits make training meaningless:'], proc.stderr
  assert f'train: the 2 masks hold only the values 0 and 255 (such as {tmp_path}' in proc.stderr
  assert not (workdir / 'checkpoints').exists()
