"""Detection datasets in COCO's format: an `instances_*.json` file and a folder of images.

`CocoDetection` reads one with random access; `write_coco` writes any detection source in
that layout. Construction checks the whole file before training: not JSON or not COCO's,
every invalid annotation (unknown image or category id; a bbox not 4 finite numbers, with
a side <= 0, outside its image or more than 1 px beyond it: COCO's own are, by rounding,
and are clipped) and every image file missing or not of the json's size, each in one
error. Otherwise filtering is mmdet 3.x `CocoDataset.parse_data_info`'s: `ignore` dropped,
boxes under 1 px or `area <= 0` dropped with one warning, crowd kept and flagged.
Evaluation reads the json itself, so nothing dropped here changes the AP.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from cvt_backbone.tools import is_int, write_atomically
from projects.training import data_index
from projects.training.datasets import DatasetError, MissingFilesError, listing
from projects.training.images import read_stored_image

logger = logging.getLogger(__name__)

INVALID_BOXES = ('error', 'drop')
# A COCO bbox may extend this far (pixels) beyond its image; it is clipped to the image.
BOX_TOLERANCE = 1.0
_SHOWN = 10  # invalid entries listed in an error


def _short(value: Any, limit: int = 60) -> str:
  text = repr(value)
  return text if len(text) <= limit else text[: limit - 3] + '...'


def _is_number(value: Any) -> bool:
  return type(value) is int or type(value) is float


def _lookup(mapping: dict, key: Any) -> Any:
  """`mapping.get(key)`, None for an unhashable key (a list where an id belongs)."""
  try:
    return mapping.get(key)
  except TypeError:
    return None


def _ids(ids: Sequence[int]) -> str:
  """'id 7' or 'ids 1, 7' (the first ten, then the count)."""
  shown = ', '.join(map(str, ids[:_SHOWN]))
  more = f' and {len(ids) - _SHOWN} more' if len(ids) > _SHOWN else ''
  return f'id{"s" if len(ids) > 1 else ""} {shown}{more}'


def check_same_categories(found: Mapping[int, str], found_in: str,
                          expected: Mapping[int, str], expected_from: str) -> None:
  """Raises a one-line `DatasetError` unless `found` (category id -> name, listed in
  `found_in`) is `expected`, the run's category map (from `expected_from`)."""
  extra = sorted(set(found) - set(expected))
  missing = sorted(set(expected) - set(found))
  renamed = [c for c in expected if c in found and found[c] != expected[c]]
  problems = [f'{found_in} lists category {_ids(extra)}, which {expected_from} does not'] if (
      extra) else []
  if missing:
    problems.append(f'{found_in} does not list category {_ids(missing)} of {expected_from}')
  problems += [f'category {c} is {found[c]!r} in {found_in} but {expected[c]!r} in '
               f'{expected_from}' for c in renamed[:3]]
  if problems:
    raise DatasetError('; '.join(problems) + ' (one category map per run: every split lists '
                       'the same categories, with or without boxes of each)')


def load_coco_json(path: str) -> dict:
  """Parses a COCO annotation file; a `DatasetError` unless it is JSON with the layout
  `CocoDetection` relies on: `images` (integer `id`, `file_name`, positive `height` and
  `width`), non-empty `categories` (integer `id`, `name`), optional `annotations` list."""
  try:
    with open(path, encoding='utf-8-sig') as f:
      text = f.read()
  except UnicodeDecodeError as e:
    raise DatasetError(
        f'COCO annotation file {path} is not UTF-8 text ({e.reason} at byte {e.start}); '
        'expected an instances_*.json file'
    ) from None
  if not text or text.isspace():
    raise DatasetError(f'COCO annotation file {path} is empty')
  try:
    gt = json.loads(text)
  except json.JSONDecodeError as e:
    # An unterminated string or an error at the very end means the text stops early.
    ends_early = e.msg.startswith('Unterminated string') or e.pos >= len(text.rstrip())
    hint = ('; the file ends early: truncated (an interrupted download or copy?)'
            if ends_early else '')
    raise DatasetError(
        f'COCO annotation file {path} is not valid JSON ({len(text)} characters): {e}{hint}'
    ) from None
  expected = ("expected a COCO detection file, an object with 'images', 'annotations' and "
              "'categories' lists")
  if not isinstance(gt, dict):
    raise DatasetError(f'{path} holds a JSON {type(gt).__name__}, not an object; {expected}')
  for key in ('images', 'categories'):
    if key not in gt:
      raise DatasetError(f'{path} has no {key!r} list; {expected} (found keys {sorted(gt)})')
  for key in ('images', 'categories', 'annotations'):
    if key in gt and not isinstance(gt[key], list):
      raise DatasetError(
          f'{path}: {key!r} is a {type(gt[key]).__name__}, not a list; {expected}'
      )
  if not gt['categories']:
    raise DatasetError(f'{path} lists no categories; {expected}')
  bad = []
  for k, info in enumerate(gt['images']):
    if not isinstance(info, dict):
      bad.append(f'images[{k}] is a {type(info).__name__}, not an object')
      continue
    missing = [key for key in ('id', 'file_name', 'height', 'width') if key not in info]
    if missing:
      bad.append(f'images[{k}] (id {_short(info.get("id"))}) has no {missing}')
    elif not is_int(info['id']):
      bad.append(f'images[{k}] has id {_short(info["id"])}, not an integer')
    elif not isinstance(info['file_name'], str) or not info['file_name']:
      bad.append(f'image {info["id"]} has file_name {_short(info["file_name"])}, not a name')
    elif not all(is_int(info[key]) and info[key] > 0 for key in ('height', 'width')):
      bad.append(f'image {info["id"]} ({info["file_name"]}) has height '
                 f'{_short(info["height"])} and width {_short(info["width"])}; expected '
                 'positive integers (pixels)')
  if bad:
    raise DatasetError(f'{len(bad)} of the {len(gt["images"])} images listed in {path} are '
                     f'invalid:\n{listing(bad, _SHOWN)}')
  bad = []
  for k, category in enumerate(gt['categories']):
    if not isinstance(category, dict) or not is_int(category.get('id')) or 'name' not in category:
      bad.append(f'categories[{k}] = {_short(category)}')
  if bad:
    raise DatasetError(f'{len(bad)} of the {len(gt["categories"])} categories in {path} lack an '
                     f"integer 'id' or a 'name':\n{listing(bad, _SHOWN)}")
  return gt


class CocoDetection:
  """Random-access source for a dataset in COCO's detection format.

  `ds[k]` is `{'image': uint8 [H, W, 3] RGB, 'boxes': float32 [n, 4] xyxy pixels, 'labels':
  int32 [n], 'crowd': bool [n], 'image_id': int, 'orig_size': (H, W)}`, images in the
  json's order; labels are category ids in sorted order (COCO's 80 ids 1..90 give 0..79).
  Construction checks the file (module docstring); errors list the first ten and the count.

  Args:
    annotation_file: the `instances_*.json` (without `annotations`, as COCO's test-dev
      image info: images without boxes).
    filter_empty: drop images without annotations of a listed category, as mmdet's
      training `filter_empty_gt=True` (an image with only crowd or dropped ones is kept).
    min_size: drop images whose json width or height is smaller (mmdet's training uses 32).
    invalid_boxes: 'error' raises for invalid boxes; 'drop' drops them with one warning
      (mmdetection drops them silently). Unknown image or category ids raise either way.
    validate: 'headers': each image exists and its header size is the json's; 'full' also
      decodes each image once (cached: a truncated or damaged file is named before
      training); 'none': existence only.

  Attributes:
    ground_truth: the parsed json dict, unchanged.
    label_to_category_id: int64 `[num_classes]`, for writing results in COCO ids.
    image_ids: the ids of the images kept, in dataset order.
  """

  def __init__(self, annotation_file: str | os.PathLike, image_dir: str | os.PathLike,
               filter_empty: bool = False, min_size: int = 0, invalid_boxes: str = 'error',
               validate: str = 'full'):
    self.annotation_file = os.fspath(annotation_file)
    self.image_dir = os.fspath(image_dir)
    if invalid_boxes not in INVALID_BOXES:
      raise ValueError(f'invalid_boxes must be one of {INVALID_BOXES}, got {invalid_boxes!r}')
    self.invalid_boxes = invalid_boxes
    data_index.check_validate(validate)
    if not os.path.isfile(self.annotation_file):
      raise FileNotFoundError(f'COCO annotation file not found: {self.annotation_file}')
    if not os.path.isdir(self.image_dir):
      raise FileNotFoundError(
          f'image folder not found: {self.image_dir} (for {self.annotation_file})'
      )
    self.ground_truth = load_coco_json(self.annotation_file)
    gt = self.ground_truth
    categories = sorted(gt['categories'], key=lambda c: c['id'])
    self.category_ids = tuple(int(c['id']) for c in categories)
    twice = sorted({c for c in self.category_ids if self.category_ids.count(c) > 1})
    if twice:
      raise DatasetError(f'{self.annotation_file} lists category {_ids(twice)} twice in '
                         '`categories`; each id names one category')
    self.class_names = tuple(str(c['name']) for c in categories)
    self.categories = dict(zip(self.category_ids, self.class_names, strict=True))
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
    self._check_image_files(validate)

  @property
  def num_classes(self) -> int:
    return len(self.category_ids)

  def __len__(self) -> int:
    return len(self._images)

  def example_files(self, index: int) -> tuple[str]:
    """The image file of example `index` (the loaders name it when it fails)."""
    return (self._paths[index],)

  def __getitem__(self, index: int) -> dict:
    if not -len(self) <= index < len(self):
      raise IndexError(f'index {index} out of range for {len(self)} images')
    info, path = self._images[index], self._paths[index]
    image = read_stored_image(path)
    # Boxes are in the json's pixel frame; a differently sized file would misplace them.
    if image.shape[:2] != (info['height'], info['width']):
      raise DatasetError(
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

  def _check_image_files(self, validate: str) -> None:
    """Raises, listing every image file that is missing or whose size is not the json's."""
    if validate == 'none':
      facts = [None if os.path.isfile(p) else FileNotFoundError(p) for p in self._paths]
    else:
      index = data_index.FileIndex(self.image_dir)
      facts = data_index.probe_images(index, self._paths, validate)
      index.save()
    lines, missing = [], 0
    for info, path, found in zip(self._images, self._paths, facts, strict=True):
      who = f'{path} (image id {info["id"]})'
      if isinstance(found, FileNotFoundError):
        missing += 1
        lines.append(f'{who} is missing')
      elif isinstance(found, Exception):
        lines.append(data_index.describe_error('image', who, found))
      elif found is not None and (found['height'], found['width']) != (info['height'],
                                                                       info['width']):
        lines.append(f'{who} is {found["height"]}x{found["width"]} (h x w) but '
                     f'{self.annotation_file} says {info["height"]}x{info["width"]}')
    if not lines:
      return
    # Boxes are in the json's pixel frame: a differently sized file would misplace them.
    text = (f'{len(lines)} of the {len(self._paths)} images listed in {self.annotation_file} '
            f'are missing from {self.image_dir} or do not match the json')
    text += f': {lines[0]}' if len(lines) == 1 else f':\n{listing(lines, _SHOWN)}'
    raise (MissingFilesError if missing else DatasetError)(text)

  def _parse_annotations(self, images: list[dict], anns: list) -> list[tuple]:
    """Per image (json order): `(boxes, labels, crowd, number of annotations listed)`."""
    if not images and not anns:
      return []
    index_of = {info['id']: i for i, info in enumerate(images)}
    if len(index_of) != len(images):
      names: dict[int, list[str]] = {}
      for info in images:
        names.setdefault(info['id'], []).append(info['file_name'])
      twice = {i: n for i, n in names.items() if len(n) > 1}
      raise DatasetError(
          f'{self.annotation_file} lists image {_ids(list(twice))} twice in `images` ('
          + '; '.join(f'{i}: {", ".join(n)}' for i, n in list(twice.items())[:_SHOWN]) + ')')
    n = len(anns)
    # Per annotation; placeholders where it is invalid. `bad_box` and `fatal` map an
    # annotation index to what is wrong; fatal ones (unknown ids) raise whatever
    # `invalid_boxes` says.
    image_index, labels, boxes, areas, ignore, crowd = [], [], [], [], [], []
    bad_box: dict[int, str] = {}
    fatal: dict[int, str] = {}
    bad_area: dict[int, str] = {}  # reported unless the box itself is invalid
    for j, ann in enumerate(anns):
      if not isinstance(ann, dict):
        fatal[j] = f'is a {type(ann).__name__}, not an object'
        ann = {}
      i = _lookup(index_of, ann.get('image_id'))
      label = _lookup(self.category_id_to_label, ann.get('category_id'))
      bbox, area = ann.get('bbox'), ann.get('area', 1.0)
      image_index.append(-1 if i is None else i)
      labels.append(0 if label is None else label)
      ignore.append(bool(ann.get('ignore', False)))
      crowd.append(bool(ann.get('iscrowd', 0)))
      if j in fatal:
        pass
      elif i is None or label is None:
        unknown = [f'refers to image id {_short(ann.get("image_id"))}, which is not in '
                   '`images`'] if i is None else []
        if label is None:
          unknown.append(f'has category id {_short(ann.get("category_id"))}, which is not in '
                         '`categories`')
        fatal[j] = '; '.join(unknown)
      elif not (type(bbox) is list and len(bbox) == 4 and all(map(_is_number, bbox))):
        bad_box[j] = (f'bbox {_short(bbox)} is not 4 numbers [x, y, width, height]'
                      if 'bbox' in ann else "has no 'bbox'")
      elif not (_is_number(area) and math.isfinite(area)):
        bad_area[j] = f'area {_short(area)} is not a finite number'
        area = 1.0
      if j in fatal or j in bad_box:
        bbox, area = (0.0, 0.0, 1.0, 1.0), 1.0  # placeholder; not checked, not kept
      boxes.append(bbox)
      areas.append(area)
    image_index = np.asarray(image_index, np.int64).reshape(n)
    labels = np.asarray(labels, np.int32).reshape(n)
    xywh = np.asarray(boxes, np.float64).reshape(n, 4)
    area = np.asarray(areas, np.float64).reshape(n)
    ignore = np.asarray(ignore, bool).reshape(n)
    crowd = np.asarray(crowd, bool).reshape(n)

    checked = np.ones(n, bool)
    checked[[*fatal, *bad_box]] = False
    sizes = [(images[i]['width'], images[i]['height']) for i in image_index]  # -1: unchecked
    image_w, image_h = np.asarray(sizes, np.float64).reshape(n, 2).T
    x, y, w, h = xywh.T
    with np.errstate(invalid='ignore', over='ignore'):
      x2, y2 = x + w, y + h
      # How far the box reaches beyond each edge (left, top, right, bottom); clipped box.
      beyond = np.stack([-x, -y, x2 - image_w, y2 - image_h], axis=1)
      x1c, x2c = np.clip(x, 0, image_w), np.clip(x2, 0, image_w)
      y1c, y2c = np.clip(y, 0, image_h), np.clip(y2, 0, image_h)
      non_finite = checked & ~(np.isfinite(xywh).all(axis=1) & np.isfinite(beyond).all(axis=1))
      non_positive = checked & ~non_finite & ((w <= 0) | (h <= 0))
      rest = checked & ~non_finite & ~non_positive
      outside = rest & ((x2c <= x1c) | (y2c <= y1c))
      too_far = rest & ~outside & (beyond.max(axis=1) > BOX_TOLERANCE)
    for j in np.flatnonzero(non_finite | non_positive | outside | too_far):
      bbox = _short(anns[j]['bbox'])
      size = f'the {image_w[j]:g}x{image_h[j]:g} (w x h) image'
      if non_finite[j]:
        bad_box[j] = f'bbox {bbox} has a non-finite value'
      elif non_positive[j]:
        side, value = ('width', w[j]) if w[j] <= 0 else ('height', h[j])
        bad_box[j] = f'bbox {bbox} has {side} {value:g} (must be > 0)'
      elif outside[j]:
        bad_box[j] = f'bbox {bbox} lies outside {size}'
      else:
        edges = [f'{d:g} px beyond the {edge} edge'
                 for edge, d in zip(('left', 'top', 'right', 'bottom'), beyond[j], strict=True)
                 if d > BOX_TOLERANCE]
        bad_box[j] = (f'bbox {bbox} extends {" and ".join(edges)} of {size} (up to '
                      f'{BOX_TOLERANCE:g} px is allowed and clipped)')
    for j, problem in bad_area.items():
      bad_box.setdefault(j, problem)
    self._report(anns, images, image_index, bad_box, fatal)

    valid = checked.copy()
    valid[list(bad_box)] = False
    # mmdet parse_data_info drops boxes with w < 1, h < 1 or area <= 0 (here after clipping).
    tiny = valid & ((x2c - x1c < 1) | (y2c - y1c < 1))
    no_area = valid & ~tiny & (area <= 0)
    if tiny.any() or no_area.any():
      ids = [_short(anns[j].get('id')) for j in np.flatnonzero(tiny | no_area)[:5]]
      logger.warning(
          'Dropped %d of the %d annotations in %s as mmdetection does: %d with a box side '
          'under 1 px, %d with area <= 0 (annotation ids %s%s).', tiny.sum() + no_area.sum(),
          n, self.annotation_file, tiny.sum(), no_area.sum(), ', '.join(ids),
          ', ...' if tiny.sum() + no_area.sum() > len(ids) else '')
    valid &= ~tiny & ~no_area & ~ignore
    xyxy = np.stack([x1c, y1c, x2c, y2c], axis=1).astype(np.float32)
    listed = np.bincount(image_index[image_index >= 0], minlength=len(images))
    order = np.argsort(image_index[valid], kind='stable')
    kept = np.flatnonzero(valid)[order]
    splits = np.cumsum(np.bincount(image_index[kept], minlength=len(images)))[:-1]
    return [
        (xyxy[k], labels[k], crowd[k], int(c))
        for k, c in zip(np.split(kept, splits), listed, strict=True)
    ]

  def _report(self, anns: list, images: list[dict], image_index: np.ndarray,
              bad_box: dict[int, str], fatal: dict[int, str]) -> None:
    """Raises for invalid annotations, or warns about the boxes `invalid_boxes='drop'` drops."""

    def line(j: int, problem: str) -> str:
      ann = anns[j]
      if not isinstance(ann, dict):
        return f'annotations[{j}]: {problem}'
      name = f'annotation {_short(ann["id"])}' if 'id' in ann else f'annotations[{j}] (no id)'
      if image_index[j] >= 0:
        info = images[image_index[j]]
        name += f' (image {info["id"]}, {info["file_name"]})'
      return f'{name}: {problem}'

    drop = self.invalid_boxes == 'drop'
    if bad_box and drop:
      lines = [line(j, bad_box[j]) for j in sorted(bad_box)]
      ids = [_short(anns[j].get('id')) for j in sorted(bad_box)[:5]]
      logger.warning(
          "Dropped %d of the %d annotations in %s with invalid boxes (invalid_boxes='drop'); "
          'annotation ids %s%s; first: %s', len(bad_box), len(anns), self.annotation_file,
          ', '.join(ids), ', ...' if len(bad_box) > len(ids) else '', lines[0])
    problems = fatal if drop else {**fatal, **bad_box}
    if not problems:
      return
    lines = [line(j, problems[j]) for j in sorted(problems)]
    notes = []
    if any('category id' in problem for problem in fatal.values()):
      ids = ', '.join(map(str, self.category_ids[:20]))
      notes.append(f'`categories` has ids [{ids}{", ..." if self.num_classes > 20 else ""}].')
    if bad_box and not drop:
      notes.append("Fix the file, or set invalid_boxes='drop' (dataset_configs.invalid_boxes) "
                   'to drop the invalid boxes with a warning.')
    if fatal and (bad_box or drop):
      notes.append("invalid_boxes='drop' drops invalid boxes only: fix the annotations with an "
                   'unknown image or category id in the file.')
    raise DatasetError(
        f'{len(problems)} of the {len(anns)} annotations in {self.annotation_file} are invalid '
        f'(COCO bbox: [x, y, width, height] in image pixels):\n{listing(lines, _SHOWN)}\n'
        + '\n'.join(notes)
    )


def coco_ground_truth(source: Sequence[dict], split: str | None = None,
                      category_ids: Sequence[int] | None = None) -> dict:
  """A detection source's annotations as a COCO instances dict (what `write_coco` writes).

  Reads every item; images are named `<image_id:012d>.png`. `category_ids`: the COCO id of
  each label (e.g. `(1, 3, 90)`); default `source.label_to_category_id`, else from 1.
  """
  class_names = tuple(source.class_names)
  split = split if split is not None else getattr(source, 'split', 'val')
  if category_ids is None:
    category_ids = getattr(source, 'label_to_category_id', range(1, len(class_names) + 1))
  category_ids = [int(c) for c in category_ids]
  if len(category_ids) != len(class_names):
    raise DatasetError(
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


def write_coco(root: str | os.PathLike, source: Sequence[dict], split: str | None = None,
               category_ids: Sequence[int] | None = None) -> tuple[str, str]:
  """Writes `root/<split>/<image_id:012d>.png` and `root/annotations/instances_<split>.json`,
  each atomically; returns `(annotation_file, image_dir)`, `CocoDetection`'s arguments."""
  split = split if split is not None else source.split
  gt = coco_ground_truth(source, split, category_ids)
  root = os.fspath(root)
  image_dir = os.path.join(root, split)
  os.makedirs(image_dir, exist_ok=True)
  os.makedirs(os.path.join(root, 'annotations'), exist_ok=True)
  for k, info in enumerate(gt['images']):
    image = Image.fromarray(source[k]['image'])
    write_atomically(os.path.join(image_dir, info['file_name']),
                     lambda f, image=image: image.save(f, format='PNG'))
  annotation_file = os.path.join(root, 'annotations', f'instances_{split}.json')
  text = json.dumps(gt)
  write_atomically(annotation_file, lambda f: f.write(text.encode()))
  return annotation_file, image_dir
