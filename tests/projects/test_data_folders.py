"""Folder datasets on tiny trees built in tmp_path: ADE20K, Cityscapes, generic pairs."""

import os

import numpy as np
import pytest
from PIL import Image

from projects.cvt_segmentation.data import folders


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
