"""Detection datasets in COCO's format: an `instances_*.json` file and a folder of images.

`CocoDetection` reads any dataset laid out like COCO (`train2017/`, `val2017/`,
`annotations/instances_val2017.json`, or your own) with random access; `write_coco`
writes any detection source in that layout, so a synthetic set exercises the same path.

Annotation filtering follows mmdetection 3.x `CocoDataset.parse_data_info`
(mmdet/datasets/coco.py): annotations flagged `ignore`, boxes that do not overlap the
image, and boxes with `w < 1`, `h < 1` or `area <= 0` are dropped; crowd boxes are kept
and flagged. Evaluation reads the ground truth from the json itself, so nothing dropped
here changes the AP.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from projects.cvt_segmentation.data.folders import read_image


class CocoDetection:
  """Random-access source for a dataset in COCO's detection format.

  `ds[k]` returns `{'image': uint8 [H, W, 3] RGB, 'boxes': float32 [n, 4] xyxy pixels,
  'labels': int32 [n] in [0, num_classes), 'crowd': bool [n], 'image_id': int,
  'orig_size': (H, W)}`. COCO's `[x, y, w, h]` boxes become `[x, y, x + w, y + h]`;
  category ids map to contiguous labels in sorted-id order (COCO's 80 ids 1..90 give
  labels 0..79). Images come in the order of the json's `images` list; images without
  annotations are kept unless `filter_empty` is set.

  Args:
    annotation_file: the `instances_*.json` file. A file without an `annotations` list
      (COCO's test-dev image info) gives images without boxes.
    image_dir: folder holding each image's `file_name`.
    filter_empty: drop images without annotations of a listed category, as mmdet's
      training `filter_cfg=dict(filter_empty_gt=True)` (configs/_base_/datasets/
      coco_detection.py). Like mmdet, an image whose only annotations are crowd or
      degenerate ones is kept.
    min_size: drop images whose json width or height is below this (mmdet's training
      `filter_cfg` uses 32); 0 keeps all.

  Attributes:
    annotation_file: path of the ground-truth json (what COCO evaluators load).
    ground_truth: the parsed json dict, unchanged.
    category_ids: sorted COCO category ids, one per label.
    class_names: category names, one per label.
    label_to_category_id: int64 `[num_classes]`, for writing results in COCO ids.
    category_id_to_label: dict from COCO category id to label.
    image_ids: the ids of the images kept, in dataset order.
  """

  def __init__(
      self,
      annotation_file: str | os.PathLike,
      image_dir: str | os.PathLike,
      filter_empty: bool = False,
      min_size: int = 0,
  ):
    self.annotation_file = os.fspath(annotation_file)
    self.image_dir = os.fspath(image_dir)
    if not os.path.isfile(self.annotation_file):
      raise FileNotFoundError(f'COCO annotation file not found: {self.annotation_file}')
    if not os.path.isdir(self.image_dir):
      raise FileNotFoundError(
          f'image folder not found: {self.image_dir} (for {self.annotation_file})'
      )
    with open(self.annotation_file) as f:
      self.ground_truth = json.load(f)
    gt = self.ground_truth
    for key in ('images', 'categories'):
      if key not in gt:
        raise ValueError(
            f'{self.annotation_file} has no {key!r} list; expected a COCO detection file with '
            f"'images', 'annotations' and 'categories' (found keys {sorted(gt)})"
        )
    categories = sorted(gt['categories'], key=lambda c: c['id'])
    self.category_ids = tuple(int(c['id']) for c in categories)
    if len(set(self.category_ids)) != len(self.category_ids):
      raise ValueError(f'{self.annotation_file} lists a category id twice: {self.category_ids}')
    self.class_names = tuple(str(c['name']) for c in categories)
    self.label_to_category_id = np.asarray(self.category_ids, np.int64)
    self.category_id_to_label = {c: i for i, c in enumerate(self.category_ids)}

    images = gt['images']
    per_image = self._parse_annotations(images, gt.get('annotations', []))
    keep = []
    for info, (boxes, labels, crowd, num_listed) in zip(images, per_image, strict=True):
      if filter_empty and num_listed == 0:
        continue
      if min(info['width'], info['height']) < min_size:
        continue
      keep.append((info, boxes, labels, crowd))
    self._images = [k[0] for k in keep]
    self._targets = [k[1:] for k in keep]
    self.image_ids = [int(info['id']) for info in self._images]
    self._paths = [os.path.join(self.image_dir, info['file_name']) for info in self._images]
    missing = [k for k, path in enumerate(self._paths) if not os.path.isfile(path)]
    if missing:
      path, image_id = self._paths[missing[0]], self.image_ids[missing[0]]
      raise FileNotFoundError(
          f'{len(missing)} of the {len(self._paths)} images listed in {self.annotation_file} '
          f'are missing from {self.image_dir}; first: {path} (image id {image_id})'
      )

  @property
  def num_classes(self) -> int:
    return len(self.category_ids)

  def __len__(self) -> int:
    return len(self._images)

  def __getitem__(self, index: int) -> dict:
    if not -len(self) <= index < len(self):
      raise IndexError(f'index {index} out of range for {len(self)} images')
    info, path = self._images[index], self._paths[index]
    image = read_image(path)
    # Boxes are in the json's pixel frame; a differently sized file would misplace them.
    if image.shape[:2] != (info['height'], info['width']):
      raise ValueError(
          f'image {path} (id {info["id"]}) is {image.shape[0]}x{image.shape[1]} (h x w) but '
          f'{self.annotation_file} says {info["height"]}x{info["width"]}'
      )
    boxes, labels, crowd = self._targets[index]
    return {
        'image': image,
        'boxes': boxes.copy(),
        'labels': labels.copy(),
        'crowd': crowd.copy(),
        'image_id': int(info['id']),
        'orig_size': (int(image.shape[0]), int(image.shape[1])),
    }

  def _parse_annotations(self, images: list[dict], anns: list[dict]) -> list[tuple]:
    """Per image (json order): `(boxes, labels, crowd, number of annotations listed)`."""
    if not images:
      return []
    index_of = {int(info['id']): i for i, info in enumerate(images)}
    if len(index_of) != len(images):
      raise ValueError(f'{self.annotation_file} lists an image id twice in `images`')
    n = len(anns)
    image_index = np.empty(n, np.int64)
    labels = np.empty(n, np.int32)
    for j, ann in enumerate(anns):
      if ann['image_id'] not in index_of:
        raise ValueError(
            f'annotation {ann.get("id")} in {self.annotation_file} refers to image id '
            f'{ann["image_id"]}, which is not in `images`'
        )
      if ann['category_id'] not in self.category_id_to_label:
        raise ValueError(
            f'annotation {ann.get("id")} (image {ann["image_id"]}) in {self.annotation_file} '
            f'has category id {ann["category_id"]}, which is not in `categories` '
            f'{list(self.category_ids)}'
        )
      image_index[j] = index_of[ann['image_id']]
      labels[j] = self.category_id_to_label[ann['category_id']]
    xywh = np.asarray([ann['bbox'] for ann in anns], np.float64).reshape(n, 4)
    area = np.asarray([ann.get('area', 1.0) for ann in anns], np.float64)
    ignore = np.asarray([bool(ann.get('ignore', False)) for ann in anns], bool)
    crowd = np.asarray([bool(ann.get('iscrowd', 0)) for ann in anns], bool)
    wh = [(images[i]['width'], images[i]['height']) for i in image_index]
    image_w, image_h = np.asarray(wh, np.float64).reshape(n, 2).T
    x, y, w, h = xywh.T
    # mmdet parse_data_info: no overlap with the image, or w < 1, h < 1, area <= 0 -> dropped.
    inter_w = np.maximum(0, np.minimum(x + w, image_w) - np.maximum(x, 0))
    inter_h = np.maximum(0, np.minimum(y + h, image_h) - np.maximum(y, 0))
    valid = ~ignore & (inter_w * inter_h > 0) & (w >= 1) & (h >= 1) & (area > 0)
    xyxy = np.stack([x, y, x + w, y + h], axis=1).astype(np.float32)
    listed = np.bincount(image_index, minlength=len(images))
    order = np.argsort(image_index[valid], kind='stable')
    kept = np.flatnonzero(valid)[order]
    splits = np.cumsum(np.bincount(image_index[kept], minlength=len(images)))[:-1]
    return [
        (xyxy[k], labels[k], crowd[k], int(c))
        for k, c in zip(np.split(kept, splits), listed, strict=True)
    ]


def coco_ground_truth(
    source: Sequence[dict],
    split: str | None = None,
    category_ids: Sequence[int] | None = None,
) -> dict:
  """A detection source's annotations as a COCO instances dict (what `write_coco` writes).

  `images` (id, file_name `<image_id:012d>.png`, height, width), `annotations` (id,
  image_id, category_id, bbox `[x, y, w, h]`, area `w * h`, iscrowd) and `categories` (id,
  name, supercategory), as COCO's own files. Reads every item (images included).

  Args:
    source: items as `CocoDetection` returns them (`image`, `boxes` xyxy, `labels`,
      optional `crowd`, `image_id`); needs `class_names`.
    split: split name for the description; defaults to `source.split`.
    category_ids: the COCO id of each label (e.g. `(1, 3, 90)` to test non-contiguous
      ids); defaults to `source.label_to_category_id`, else `1..num_classes` as COCO
      numbers from 1.
  """
  class_names = tuple(source.class_names)
  split = split if split is not None else getattr(source, 'split', 'val')
  if category_ids is None:
    category_ids = getattr(source, 'label_to_category_id', range(1, len(class_names) + 1))
  category_ids = [int(c) for c in category_ids]
  if len(category_ids) != len(class_names):
    raise ValueError(
        f'{len(category_ids)} category ids for {len(class_names)} classes {class_names}'
    )
  images, annotations = [], []
  for k in range(len(source)):
    item = source[k]
    image_id = int(item['image_id'])
    height, width = item['image'].shape[:2]
    images.append({'id': image_id, 'file_name': f'{image_id:012d}.png', 'height': height,
                   'width': width})
    crowd = item.get('crowd', np.zeros(len(item['labels']), bool))
    for box, label, is_crowd in zip(item['boxes'], item['labels'], crowd, strict=True):
      x1, y1, x2, y2 = (float(v) for v in box)
      annotations.append({
          'id': len(annotations) + 1,
          'image_id': image_id,
          'category_id': category_ids[int(label)],
          'bbox': [x1, y1, x2 - x1, y2 - y1],
          'area': (x2 - x1) * (y2 - y1),
          'iscrowd': int(is_crowd),
      })
  categories = [
      {'id': c, 'name': name, 'supercategory': 'object'}
      for c, name in zip(category_ids, class_names, strict=True)
  ]
  return {
      'info': {'description': f'{type(source).__name__} {split}'},
      'licenses': [],
      'images': images,
      'annotations': annotations,
      'categories': categories,
  }


def write_coco(
    root: str | os.PathLike,
    source: Sequence[dict],
    split: str | None = None,
    category_ids: Sequence[int] | None = None,
) -> tuple[str, str]:
  """Writes a detection source in COCO's layout: PNG images and an instances json.

  Layout: `root/<split>/<image_id:012d>.png` and `root/annotations/instances_<split>.json`
  (`coco_ground_truth`). Each file is written under a temporary name and renamed, so an
  interrupted run leaves no half-written file under the final name.

  Args:
    root: output folder (created).
    source: items as `CocoDetection` returns them; needs `class_names`.
    split: split name in the paths; defaults to `source.split`.
    category_ids: the COCO id of each label (`coco_ground_truth`).

  Returns:
    `(annotation_file, image_dir)`, the arguments of `CocoDetection`.
  """
  split = split if split is not None else source.split
  gt = coco_ground_truth(source, split, category_ids)
  root = os.fspath(root)
  image_dir = os.path.join(root, split)
  os.makedirs(image_dir, exist_ok=True)
  os.makedirs(os.path.join(root, 'annotations'), exist_ok=True)
  for k, info in enumerate(gt['images']):
    path = os.path.join(image_dir, info['file_name'])
    Image.fromarray(source[k]['image']).save(path + '.tmp', format='PNG')
    os.replace(path + '.tmp', path)
  annotation_file = os.path.join(root, 'annotations', f'instances_{split}.json')
  with open(annotation_file + '.tmp', 'w') as f:
    json.dump(gt, f)
  os.replace(annotation_file + '.tmp', annotation_file)
  return annotation_file, image_dir
