"""Segmentation datasets read from image/mask folders: ADE20K, Cityscapes, generic pairs.

Each source lists its files when built (so a missing folder or mask is reported at
once, naming the first missing path) and reads, maps and checks labels lazily, one
example at a time: `ds[i]` returns `{'image': uint8 [H, W, 3], 'label': uint8 [H, W],
'name': str}` with labels in `[0, num_classes)` or 255 (ignore).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from projects.input_files import read_stored_image

IGNORE_INDEX = 255
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')

# mmseg `ADE20KDataset.METAINFO['classes']` (mmseg/datasets/ade.py), including the
# trailing space of 'bed ' so names match mmseg logs exactly.
ADE20K_CLASSES = (
    'wall', 'building', 'sky', 'floor', 'tree', 'ceiling', 'road', 'bed ', 'windowpane',
    'grass', 'cabinet', 'sidewalk', 'person', 'earth', 'door', 'table', 'mountain', 'plant',
    'curtain', 'chair', 'car', 'water', 'painting', 'sofa', 'shelf', 'house', 'sea', 'mirror',
    'rug', 'field', 'armchair', 'seat', 'fence', 'desk', 'rock', 'wardrobe', 'lamp', 'bathtub',
    'railing', 'cushion', 'base', 'box', 'column', 'signboard', 'chest of drawers', 'counter',
    'sand', 'sink', 'skyscraper', 'fireplace', 'refrigerator', 'grandstand', 'path', 'stairs',
    'runway', 'case', 'pool table', 'pillow', 'screen door', 'stairway', 'river', 'bridge',
    'bookcase', 'blind', 'coffee table', 'toilet', 'flower', 'book', 'hill', 'bench',
    'countertop', 'stove', 'palm', 'kitchen island', 'computer', 'swivel chair', 'boat', 'bar',
    'arcade machine', 'hovel', 'bus', 'towel', 'light', 'truck', 'tower', 'chandelier',
    'awning', 'streetlight', 'booth', 'television receiver', 'airplane', 'dirt track',
    'apparel', 'pole', 'land', 'bannister', 'escalator', 'ottoman', 'bottle', 'buffet',
    'poster', 'stage', 'van', 'ship', 'fountain', 'conveyer belt', 'canopy', 'washer',
    'plaything', 'swimming pool', 'stool', 'barrel', 'basket', 'waterfall', 'tent', 'bag',
    'minibike', 'cradle', 'oven', 'ball', 'food', 'step', 'tank', 'trade name', 'microwave',
    'pot', 'animal', 'bicycle', 'lake', 'dishwasher', 'screen', 'blanket', 'sculpture', 'hood',
    'sconce', 'vase', 'traffic light', 'tray', 'ashcan', 'fan', 'pier', 'crt screen', 'plate',
    'monitor', 'bulletin board', 'shower', 'radiator', 'glass', 'clock', 'flag',
)  # fmt: skip

# Cityscapes labelId -> trainId for the 19 evaluated classes (cityscapesScripts
# helpers/labels.py); every other id (void, rare classes such as 'parking' or
# 'caravan', and -1 'license plate') maps to 255.
CITYSCAPES_TRAIN_IDS = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip
CITYSCAPES_CLASSES = (
    'road', 'sidewalk', 'building', 'wall', 'fence', 'pole', 'traffic light', 'traffic sign',
    'vegetation', 'terrain', 'sky', 'person', 'rider', 'car', 'truck', 'bus', 'train',
    'motorcycle', 'bicycle',
)  # fmt: skip


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
  """mmseg `reduce_zero_label`: 0 -> 255 (ignore), v -> v - 1 otherwise, 255 stays 255.

  Args:
    label: `[H, W]` uint8 raw labels.

  Returns:
    `[H, W]` uint8.
  """
  out = label.astype(np.int32) - 1
  out[(label == 0) | (label == 255)] = IGNORE_INDEX
  return out.astype(np.uint8)


def cityscapes_label_ids_to_train_ids(label: np.ndarray) -> np.ndarray:
  """Maps a Cityscapes `*_labelIds.png` array `[H, W]` to train ids (others 255), uint8."""
  return _CITYSCAPES_LUT[label]


_reduce_zero_label = reduce_zero_label  # `image_mask_folders` has an argument of that name.

_CITYSCAPES_LUT = np.full(256, IGNORE_INDEX, np.uint8)
for _label_id, _train_id in CITYSCAPES_TRAIN_IDS.items():
  _CITYSCAPES_LUT[_label_id] = _train_id


def read_label(path: str) -> np.ndarray:
  """Reads a single-channel label PNG (mode L, P or I) as `[H, W]` class indices.

  Palette ('P') masks give their palette indices, which is how VOC-style masks store
  class ids. Multi-channel masks are rejected rather than guessed at.
  """
  with Image.open(path) as im:
    if im.mode not in ('L', 'P', 'I', 'I;16', 'I;16B', 'I;16L', '1'):
      raise ValueError(
          f'label file {path} has mode {im.mode!r}; expected a single-channel map of class '
          'indices (mode L or P)'
      )
    return np.asarray(im)


class SegmentationFolder:
  """Image/label file pairs with a label mapping; random access, lazy reads.

  Args:
    image_paths: image files.
    label_paths: label files, one per image.
    num_classes: number of classes after `label_map`.
    class_names: one name per class.
    label_map: raw label array -> class ids (uint8, 255 = ignore); None keeps raw values.
    max_raw_label: largest valid raw label value (255 always allowed); larger values
      raise when the example is read. None derives it as `num_classes - 1`.
  """

  def __init__(
      self,
      image_paths: Sequence[str],
      label_paths: Sequence[str],
      num_classes: int,
      class_names: Sequence[str],
      label_map=None,
      max_raw_label: int | None = None,
  ):
    if len(image_paths) != len(label_paths):
      raise ValueError(f'{len(image_paths)} images but {len(label_paths)} label files')
    if len(class_names) != num_classes:
      raise ValueError(f'{len(class_names)} class names for {num_classes} classes')
    if not 1 <= num_classes <= 255:
      raise ValueError(f'num_classes must be in [1, 255] (255 = ignore), got {num_classes}')
    self.image_paths = list(image_paths)
    self.label_paths = list(label_paths)
    self.num_classes = num_classes
    self.class_names = tuple(class_names)
    self.label_map = label_map
    self.max_raw_label = num_classes - 1 if max_raw_label is None else max_raw_label

  def __len__(self) -> int:
    return len(self.image_paths)

  def __getitem__(self, index: int) -> dict:
    image_path, label_path = self.image_paths[index], self.label_paths[index]
    image = read_stored_image(image_path)
    raw = read_label(label_path)
    if raw.shape != image.shape[:2]:
      raise ValueError(
          f'label {label_path} has size {raw.shape} but image {image_path} has size '
          f'{image.shape[:2]}'
      )
    bad = ((raw > self.max_raw_label) | (raw < 0)) & (raw != IGNORE_INDEX)
    if bad.any():
      values = np.unique(raw[bad])
      raise ValueError(
          f'label file {label_path} holds values {values[:10].tolist()} outside '
          f'[0, {self.max_raw_label}] and not {IGNORE_INDEX} (ignore) for a dataset with '
          f'{self.num_classes} classes'
      )
    raw = raw.astype(np.uint8)
    label = raw if self.label_map is None else self.label_map(raw)
    name = os.path.splitext(os.path.basename(image_path))[0]
    return {'image': image, 'label': label, 'name': name}


def _require_dir(path: str) -> str:
  if not os.path.isdir(path):
    raise FileNotFoundError(f'dataset folder not found: {path}')
  return path


def _list_files(root: str, suffixes: Sequence[str]) -> list[str]:
  """Files under `root` (recursive) whose lower-cased name ends with one of `suffixes`."""
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    found += [os.path.join(dirpath, f) for f in filenames if f.lower().endswith(tuple(suffixes))]
  return sorted(found)


def _pair(
    images: list[str], image_root: str, image_suffix: str, label_root: str, label_suffix: str
):
  """Label path for each image (same relative path, suffix swapped); fails on the first miss."""
  labels = []
  for path in images:
    rel = os.path.relpath(path, image_root)
    label = os.path.join(label_root, rel[: len(rel) - len(image_suffix)] + label_suffix)
    if not os.path.isfile(label):
      raise FileNotFoundError(f'label file not found: {label} (for image {path})')
    labels.append(label)
  return labels


def ade20k(root: str, split: str = 'training') -> SegmentationFolder:
  """ADE20K SceneParsing (`ADEChallengeData2016`), 150 classes, reduce_zero_label.

  Layout: `root/images/{training,validation}/*.jpg` and
  `root/annotations/{training,validation}/*.png` (`root` may also be the folder that
  contains `ADEChallengeData2016`). Raw label 0 ("other") becomes 255, others minus 1.

  Args:
    root: dataset root.
    split: 'training' or 'validation' ('train'/'val' accepted).

  Returns:
    The split as a `SegmentationFolder`.
  """
  split = {'train': 'training', 'val': 'validation'}.get(split, split)
  if split not in ('training', 'validation'):
    raise ValueError(f"ADE20K split must be 'training' or 'validation', got {split!r}")
  nested = os.path.join(root, 'ADEChallengeData2016')
  if not os.path.isdir(os.path.join(root, 'images')) and os.path.isdir(nested):
    root = nested
  image_dir = _require_dir(os.path.join(root, 'images', split))
  label_dir = _require_dir(os.path.join(root, 'annotations', split))
  images = _list_files(image_dir, ('.jpg',))
  if not images:
    raise FileNotFoundError(f'no .jpg images found in {image_dir}')
  labels = _pair(images, image_dir, '.jpg', label_dir, '.png')
  # Raw ADE20K labels are 0..150; the check runs before reduce_zero_label.
  return SegmentationFolder(
      images, labels, 150, ADE20K_CLASSES, label_map=reduce_zero_label, max_raw_label=150
  )


def cityscapes(root: str, split: str = 'train') -> SegmentationFolder:
  """Cityscapes fine annotations, 19 classes (labelIds mapped to trainIds, others 255).

  Layout: `root/leftImg8bit/{train,val}/<city>/<stem>_leftImg8bit.png` with
  `root/gtFine/{train,val}/<city>/<stem>_gtFine_labelIds.png`.

  Args:
    root: dataset root.
    split: 'train' or 'val' ('validation' accepted).

  Returns:
    The split as a `SegmentationFolder`.
  """
  split = {'validation': 'val', 'training': 'train'}.get(split, split)
  if split not in ('train', 'val'):
    raise ValueError(f"Cityscapes split must be 'train' or 'val', got {split!r}")
  image_dir = _require_dir(os.path.join(root, 'leftImg8bit', split))
  label_dir = _require_dir(os.path.join(root, 'gtFine', split))
  images = _list_files(image_dir, ('_leftimg8bit.png',))
  if not images:
    raise FileNotFoundError(f'no *_leftImg8bit.png images found in {image_dir}')
  labels = _pair(images, image_dir, '_leftImg8bit.png', label_dir, '_gtFine_labelIds.png')
  # Every byte value has a train id (unknown ids are ignored), so nothing raises.
  return SegmentationFolder(
      images,
      labels,
      19,
      CITYSCAPES_CLASSES,
      label_map=cityscapes_label_ids_to_train_ids,
      max_raw_label=254,
  )


def image_mask_folders(
    image_dir: str,
    mask_dir: str,
    num_classes: int,
    class_names: Sequence[str] | None = None,
    reduce_zero_label: bool = False,
    mask_suffix: str = '.png',
) -> SegmentationFolder:
  """A generic images/masks folder pair matched by relative path and file stem.

  `image_dir/a/b.jpg` pairs with `mask_dir/a/b.png`. Masks are single-channel class
  indices (mode L or P); 255 is ignored.

  Args:
    image_dir: folder of images (any of `IMAGE_EXTENSIONS`, searched recursively).
    mask_dir: folder of masks.
    num_classes: number of classes (after `reduce_zero_label`).
    class_names: names; defaults to 'class_0', 'class_1', ...
    reduce_zero_label: apply mmseg's reduce_zero_label (0 = unlabelled).
    mask_suffix: mask file ending replacing the image extension.

  Returns:
    A `SegmentationFolder`.
  """
  _require_dir(image_dir)
  _require_dir(mask_dir)
  images = _list_files(image_dir, IMAGE_EXTENSIONS)
  if not images:
    raise FileNotFoundError(f'no images ({", ".join(IMAGE_EXTENSIONS)}) found in {image_dir}')
  labels = []
  for path in images:
    labels += _pair([path], image_dir, os.path.splitext(path)[1], mask_dir, mask_suffix)
  names = class_names if class_names is not None else [f'class_{i}' for i in range(num_classes)]
  return SegmentationFolder(
      images,
      labels,
      num_classes,
      names,
      label_map=_reduce_zero_label if reduce_zero_label else None,
      max_raw_label=num_classes if reduce_zero_label else num_classes - 1,
  )
