"""Segmentation datasets read from image/mask folders: ADE20K, Cityscapes, generic pairs.

A source lists its files when built and reads one example at a time: `ds[i]` is
`{'image': uint8 [H, W, 3], 'label': uint8 [H, W], 'name': str}`, labels in
`[0, num_classes)` or 255 (ignore). `validate_splits` checks every file up front (pairs,
sizes, modes, label values; cached per file by `projects.training.data_index`) and reports
all problems in one `DatasetError`; `ds[i]`'s checks stay as the last line of defence.
"""

from __future__ import annotations

import collections
import logging
import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from PIL import Image

from projects.training import data_index
from projects.training.datasets import DatasetError, MissingFilesError, listing
from projects.training.images import read_stored_image

IGNORE_INDEX = 255
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')
# PIL modes of single-channel masks (class indices); multi-channel masks are rejected.
LABEL_MODES = ('L', 'P', 'I', 'I;16', 'I;16B', 'I;16L', '1')
MISSING_MASKS = ('raise', 'keep')
_SHOWN = 20  # problems listed in a validation error

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
  """mmseg `reduce_zero_label` of uint8 `[H, W]`: 0 -> 255 (ignore), v -> v - 1, 255 stays."""
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
  """A single-channel label file as `[H, W]` class indices; palette ('P') masks give their
  indices (VOC-style class ids); multi-channel masks are rejected rather than guessed at."""
  with Image.open(path) as im:
    if im.mode not in LABEL_MODES:
      raise ValueError(
          f'label file {path} has mode {im.mode!r}; expected a single-channel map of class '
          'indices (mode L or P)'
      )
    return np.asarray(im)


class SegmentationFolder:
  """Image/label file pairs with a label mapping; random access, lazy reads.

  Args:
    num_classes: number of classes after `label_map`.
    label_map: raw label array -> class ids (uint8, 255 = ignore); None keeps raw values.
    max_raw_label: largest valid raw label (255 always allowed); None: `num_classes - 1`.
    unpaired: `(image, expected mask)` of images without a mask (`missing_masks='keep'`),
      reported by `validate_splits`.
    mask_root: the masks' folder (`validate_splits` keeps its index there); None: their
      common folder.
  """

  def __init__(self, image_paths: Sequence[str], label_paths: Sequence[str], num_classes: int,
               class_names: Sequence[str],
               label_map: Callable[[np.ndarray], np.ndarray] | None = None,
               max_raw_label: int | None = None, unpaired: Sequence[tuple[str, str]] = (),
               mask_root: str | None = None):
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
    self.unpaired = [tuple(pair) for pair in unpaired]
    self.mask_root = mask_root

  def __len__(self) -> int:
    return len(self.image_paths)

  def example_files(self, index: int) -> tuple[str, str]:
    """The image and mask of example `index` (the loaders name them when it fails)."""
    return self.image_paths[index], self.label_paths[index]

  def __getitem__(self, index: int) -> dict:
    image_path, label_path = self.example_files(index)
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
    found += [os.path.join(dirpath, f) for f in filenames
              if f.lower().endswith(tuple(x.lower() for x in suffixes))]
  return sorted(found)


def _listed_images(image_dir: str, suffixes: Sequence[str]) -> list[str]:
  """The images under `image_dir` ending with one of `suffixes`; none is an error naming the
  types of file the folder holds instead, and images of other types beside them a warning."""
  images = _list_files(image_dir, suffixes)
  others = [f for f in _list_files(image_dir, tuple(Image.registered_extensions()))
            if not f.lower().endswith(tuple(suffixes))]
  if images and others:
    logging.warning('%s: skipped %d image(s) of unsupported types (such as %s); supported: %s',
                    image_dir, len(others), others[0], ', '.join(suffixes))
  if not images:
    kinds = collections.Counter(os.path.splitext(f)[1].lower() or '(no extension)'
                                for f in _list_files(image_dir, ('',)))
    held = ', '.join(f'{n} {kind} file{"s" if n > 1 else ""}' for kind, n in kinds.most_common())
    raise FileNotFoundError(f'no images found in {image_dir}: '
                            f'{f"it holds {held}" if held else "it is empty"}; supported: '
                            f'{", ".join(suffixes)}')
  return images


def _pair(images: list[str], image_root: str, label_root: str, label_suffix: str,
          image_suffix: str | None = None,
          missing_masks: str = 'raise') -> tuple[list[str], list[str], list[tuple[str, str]]]:
  """`(paired images, their labels, [(image, expected label)] without one)`: the label file
  has the image's relative path with `image_suffix` (None: the extension) replaced by
  `label_suffix`. `missing_masks='raise'` lists the unpaired in one `MissingFilesError`.
  """
  if missing_masks not in MISSING_MASKS:
    raise ValueError(f'missing_masks must be one of {MISSING_MASKS}, got {missing_masks!r}')
  paired, labels, unpaired = [], [], []
  images_of: dict[str, list[str]] = {}
  for path in images:
    rel = os.path.relpath(path, image_root)
    cut = len(image_suffix) if image_suffix is not None else len(os.path.splitext(rel)[1])
    label = os.path.join(label_root, rel[: len(rel) - cut] + label_suffix)
    images_of.setdefault(label, []).append(path)
    if os.path.isfile(label):
      paired.append(path)
      labels.append(label)
    else:
      unpaired.append((path, label))
  shared = [f'{" and ".join(paths)} would pair with the same mask {label}'
            for label, paths in images_of.items() if len(paths) > 1]
  if shared:
    advice = 'keep one image per mask (rename or remove the others)'
    raise DatasetError(f'{shared[0]}; {advice}' if len(shared) == 1 else
                       f'{len(shared)} masks in {label_root} would each pair with several '
                       f'images; {advice}:\n{listing(shared, _SHOWN)}')
  if unpaired and missing_masks == 'raise':
    lines = [_unpaired_line(image, label) for image, label in unpaired]
    raise MissingFilesError(
        f'{len(unpaired)} of the {len(images)} images in {image_root} have no label file in '
        f'{label_root}:\n{listing(lines, _SHOWN)}'
    )
  return paired, labels, unpaired


def _unpaired_line(image: str, label: str) -> str:
  return f'{image}: no label file; expected {label}'


def ade20k(root: str, split: str = 'training', missing_masks: str = 'raise') -> SegmentationFolder:
  """ADE20K SceneParsing, 150 classes: raw label 0 ("other") becomes 255, others minus 1.

  `root/images/{training,validation}/*.jpg`, `root/annotations/.../*.png` (`root` may hold
  `ADEChallengeData2016`); `split` 'training'/'train' or 'validation'/'val'. Images without
  a mask: `missing_masks='raise'` (`MissingFilesError` listing all) or 'keep' (`unpaired`).
  """
  split = {'train': 'training', 'val': 'validation'}.get(split, split)
  if split not in ('training', 'validation'):
    raise ValueError(f"ADE20K split must be 'training' or 'validation', got {split!r}")
  nested = os.path.join(root, 'ADEChallengeData2016')
  if not os.path.isdir(os.path.join(root, 'images')) and os.path.isdir(nested):
    root = nested
  image_dir = _require_dir(os.path.join(root, 'images', split))
  label_dir = _require_dir(os.path.join(root, 'annotations', split))
  images = _listed_images(image_dir, ('.jpg',))
  images, labels, unpaired = _pair(images, image_dir, label_dir, '.png', '.jpg', missing_masks)
  # Raw ADE20K labels are 0..150; the check runs before reduce_zero_label.
  return SegmentationFolder(
      images, labels, 150, ADE20K_CLASSES, label_map=reduce_zero_label, max_raw_label=150,
      unpaired=unpaired, mask_root=label_dir,
  )


def cityscapes(root: str, split: str = 'train', missing_masks: str = 'raise') -> SegmentationFolder:
  """Cityscapes fine annotations, 19 classes (labelIds mapped to trainIds, others 255).

  `root/leftImg8bit/{train,val}/<city>/<stem>_leftImg8bit.png` with
  `root/gtFine/.../<stem>_gtFine_labelIds.png`; `split` and `missing_masks` as `ade20k`.
  """
  split = {'validation': 'val', 'training': 'train'}.get(split, split)
  if split not in ('train', 'val'):
    raise ValueError(f"Cityscapes split must be 'train' or 'val', got {split!r}")
  image_dir = _require_dir(os.path.join(root, 'leftImg8bit', split))
  label_dir = _require_dir(os.path.join(root, 'gtFine', split))
  images = _listed_images(image_dir, ('_leftImg8bit.png',))
  images, labels, unpaired = _pair(images, image_dir, label_dir, '_gtFine_labelIds.png',
                                   '_leftImg8bit.png', missing_masks)
  # Every byte value has a train id (unknown ids are ignored), so nothing raises.
  return SegmentationFolder(
      images,
      labels,
      19,
      CITYSCAPES_CLASSES,
      label_map=cityscapes_label_ids_to_train_ids,
      max_raw_label=254,
      unpaired=unpaired,
      mask_root=label_dir,
  )


def image_mask_folders(image_dir: str, mask_dir: str, num_classes: int,
                       class_names: Sequence[str] | None = None, reduce_zero_label: bool = False,
                       mask_suffix: str = '.png',
                       missing_masks: str = 'raise') -> SegmentationFolder:
  """Images (any of `IMAGE_EXTENSIONS`, recursively) and single-channel masks (255 ignored)
  paired by relative path: `image_dir/a/b.jpg` with `mask_dir/a/b` + `mask_suffix`.

  `num_classes` counts after `reduce_zero_label` (mmseg's, 0 = unlabelled); `class_names`
  default to 'class_0', ...; `missing_masks` as `ade20k`.
  """
  _require_dir(image_dir)
  _require_dir(mask_dir)
  images = _listed_images(image_dir, IMAGE_EXTENSIONS)
  images, labels, unpaired = _pair(images, image_dir, mask_dir, mask_suffix, None,
                                   missing_masks)
  names = class_names if class_names is not None else [f'class_{i}' for i in range(num_classes)]
  return SegmentationFolder(
      images,
      labels,
      num_classes,
      names,
      label_map=_reduce_zero_label if reduce_zero_label else None,
      max_raw_label=num_classes if reduce_zero_label else num_classes - 1,
      unpaired=unpaired,
      mask_root=mask_dir,
  )


_MAX_VALUES = 256  # distinct label values kept per mask in the index (uint8 has 256)


def _label_values(raw: np.ndarray) -> dict:
  """`values` (sorted, at most `_MAX_VALUES`), `min`, `top` (the largest but 255, or None) and
  `num_values` of a label map."""
  if raw.dtype == np.uint8:
    present = np.flatnonzero(np.bincount(raw.ravel(), minlength=256))
  else:
    present = np.unique(raw.astype(np.int64))
  values = [int(v) for v in present]
  labels = [v for v in values if v != IGNORE_INDEX]
  return {'values': values[:_MAX_VALUES], 'min': min(values, default=0),
          'top': max(labels, default=None), 'num_values': len(values)}


def _mask_facts(path: str) -> dict:
  """A mask's header and, if it is single-channel, its label values (decodes the pixels)."""
  facts = data_index.read_header(path)
  if facts['mode'] in LABEL_MODES:
    facts.update(_label_values(read_label(path)))
  return facts


def _has_values(facts: dict) -> bool:
  return 'values' in facts or facts['mode'] not in LABEL_MODES


def _pair_problems(ds: SegmentationFolder, image: str, image_facts: dict | Exception,
                   mask_facts: dict | Exception) -> list[str]:
  """What is wrong with one image/mask pair of `ds`, from the facts `validate_splits` found."""
  problems = []
  if isinstance(image_facts, Exception):
    problems.append(data_index.describe_error('image', image, image_facts))
  if isinstance(mask_facts, Exception):
    return problems + [data_index.describe_error('mask', 'file', mask_facts)]
  if mask_facts['mode'] not in LABEL_MODES:
    problems.append(f"mode {mask_facts['mode']!r}; expected a single-channel map of class "
                    'indices (mode L or P)')
  size = (mask_facts['height'], mask_facts['width'])
  if not isinstance(image_facts, Exception):
    expected = (image_facts['height'], image_facts['width'])
    if size != expected:
      problems.append(f'size {size[0]}x{size[1]} (h x w); expected {expected[0]}x{expected[1]}, '
                      f'the size of its image {image}')
  if 'values' not in mask_facts:
    return problems
  lo, top, values = mask_facts['min'], mask_facts['top'], mask_facts['values']
  limit = ds.max_raw_label
  mapping = getattr(ds.label_map, '__name__', None) if ds.label_map is not None else None
  classes = f'{ds.num_classes} classes' + (f' after {mapping}' if mapping else '')
  if lo < 0 or (top is not None and top > limit):
    bad = [v for v in values if (v < 0 or v > limit) and v != IGNORE_INDEX]
    if top is not None and top > limit and top not in bad:
      bad.append(top)
    shown = ', '.join(map(str, bad[:10])) + (', ...' if len(bad) > 10 else '')
    problems.append(f'label values [{shown}]; expected 0..{limit} or {IGNORE_INDEX} (ignore) '
                    f'for {classes}')
  elif ds.label_map is not None:
    # The values are valid raw labels here; check what the mapping (on bytes) makes of them.
    raw = np.asarray([v for v in values if v <= 255], np.uint8)
    mapped = np.asarray(ds.label_map(raw)).astype(np.int64)
    bad = (mapped >= ds.num_classes) & (mapped != IGNORE_INDEX) | (mapped < 0)
    if bad.any():
      problems.append(f'label values {raw[bad][:10].tolist()} become {mapped[bad][:10].tolist()} '
                      f'after {mapping or "the label mapping"}; expected 0..{ds.num_classes - 1} '
                      f'or {IGNORE_INDEX} (ignore)')
  return problems


def validate_splits(splits: Mapping[str, SegmentationFolder], mode: str = 'full',
                    num_threads: int | None = None) -> list[str]:
  """Checks every file of `splits` up front; one `DatasetError` lists every bad pair. Then,
  in 'full' mode, each split's labels as a whole (`_split_labels`); returns its warnings.

  By `mode`: always, every image has its mask; 'headers' and 'full': files open and each
  mask is a single-channel map of its image's size; 'full': every image decodes (none is
  truncated or damaged), every mask's values are in `[0, max_raw_label]` or 255 and the
  label mapping takes them into `[0, num_classes)` or 255. Headers and values are cached
  per file in the mask folder's index: a rerun decodes only new or changed files.
  """
  data_index.check_validate(mode)
  lines: list[str] = []
  total = 0
  found: dict[str, list] = {}  # each split's mask facts, with their label values
  indexes: dict[str, data_index.FileIndex] = {}
  for name, ds in splits.items():
    total += len(ds) + len(ds.unpaired)
    lines += [f'{name}: {_unpaired_line(image, mask)}' for image, mask in ds.unpaired]
    if mode == 'none' or not len(ds):
      continue
    folder = ds.mask_root or os.path.commonpath(
        [os.path.dirname(os.path.abspath(p)) for p in ds.label_paths])
    key = os.path.realpath(folder)
    if key not in indexes:  # splits sharing a mask folder share its index
      indexes[key] = data_index.FileIndex(folder)
    index = indexes[key]
    image_facts = data_index.probe_images(index, ds.image_paths, mode, num_threads)
    if mode == 'full':
      mask_facts = data_index.probe_files(index, ds.label_paths, _mask_facts, _has_values,
                                          num_threads=num_threads)
    else:
      mask_facts = data_index.probe_files(index, ds.label_paths, data_index.read_header,
                                          num_threads=num_threads)
    for image, mask, fi, fm in zip(ds.image_paths, ds.label_paths, image_facts, mask_facts,
                                   strict=True):
      problems = _pair_problems(ds, image, fi, fm)
      if problems:
        lines.append(f'{name}: {mask}: {"; ".join(problems)}')
    if mode == 'full':
      found[name] = mask_facts
  for index in indexes.values():
    index.save()  # before raising: a rerun after a fix rechecks only the changed files
  if lines:
    checked = {'full': 'pairs, decoding, sizes, modes, label values',
               'headers': 'pairs, sizes, modes', 'none': 'pairs'}[mode]
    names = list(splits)
    names = ' and '.join([', '.join(names[:-1]), names[-1]] if len(names) > 1 else names)
    raise DatasetError(
        f'{len(lines)} of the {total} image/mask pairs of the {names} split'
        f'{"s" if len(splits) > 1 else ""} are invalid (checked: {checked}):\n'
        f'{listing(lines, _SHOWN)}\n'
        'Fix or remove these files; a rerun rechecks only the files that changed.'
    )
  warnings, useless = [], []
  for name, facts in found.items():
    warning, error = _split_labels(name, splits[name], facts)
    warnings += [warning] if warning else []
    useless += [error] if error else []
  if useless:
    raise DatasetError(useless[0] if len(useless) == 1 else
                       f'the masks of {len(useless)} splits make training meaningless:\n'
                       f'{listing(useless, _SHOWN)}')
  return warnings


def _split_labels(name: str, ds: SegmentationFolder,
                  facts: Sequence[dict]) -> tuple[str | None, str | None]:
  """`(warning, error)` about the label values of a split's masks, all valid one by one:
  an error when no pixel is labelled or the masks hold only 0 and 255 (binary masks whose
  foreground is the ignore label), a warning naming the classes no training mask holds."""
  values = sorted(set().union(*(f['values'] for f in facts)))
  raw = np.asarray(values, np.uint8)
  mapped = raw if ds.label_map is None else np.asarray(ds.label_map(raw))
  present = set(mapped.tolist()) - {IGNORE_INDEX}
  mapping = getattr(ds.label_map, '__name__', 'the label mapping')
  training = name == 'train'
  masks = f'{len(facts)} mask{"s" if len(facts) > 1 else ""}'
  hold = f'the {masks} hold' if len(facts) > 1 else 'the mask holds'

  def such_as(value: int) -> str:
    paths = [p for p, f in zip(ds.label_paths, facts, strict=True) if value in f['values']]
    return ', '.join(paths[:2])

  if values == [0, IGNORE_INDEX]:
    labelled = 'only class 0 is labelled' if present else 'no pixel is labelled'
    return None, (f'{name}: {hold} only the values 0 and 255 (such as '
                  f'{such_as(IGNORE_INDEX)}), and 255 is the ignore label: {labelled}. If 255 '
                  'marks the foreground of binary masks, map 255 to 1 in the mask files '
                  '(numpy: mask // 255)')
  if not present:
    held = ('255 (ignore)' if values == [IGNORE_INDEX] else
            f'the values {values}, all 255 (ignore) after {mapping}')
    return None, (f'{name}: {hold} only {held}; nothing to '
                  f'{"train on" if training else "score"} (such as {such_as(values[0])})')
  missing = [k for k in range(ds.num_classes) if k not in present]
  if not training or not missing:
    return None, None
  shown = ', '.join(f'{k} ({ds.class_names[k]})' for k in missing[:10])
  more = f' and {len(missing) - 10} more' if len(missing) > 10 else ''
  one = len(missing) == 1
  return (f'{name}: class{"" if one else "es"} {shown}{more} of {ds.num_classes} '
          f'appear{"s" if one else ""} in none of its {masks}; the model cannot learn '
          f'{"it" if one else "them"}'), None
