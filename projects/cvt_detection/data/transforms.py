"""mmdetection's 1x detection pipeline in numpy, batched to a few static shapes.

mmdet 3.x `configs/_base_/datasets/coco_detection.py`: train `Resize(scale=(1333, 800),
keep_ratio=True) -> RandomFlip(prob=0.5)`, test the resize alone, then `DetDataPreprocessor`:
ImageNet normalisation in RGB, zero padding after it. mmdet pads each batch to its largest
image rounded up to 32, a shape per batch (a compile each under jit); `collate` pads to the
smallest of a few fixed canvases that holds the batch. Crowd boxes are dropped (mmdet's
assigners ignore them; evaluation reads them from the json).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence

import numpy as np

from projects.training import image_ops

# mmdet `Resize(scale=(1333, 800), keep_ratio=True)`: long edge <= 1333, short edge <= 800.
DEFAULT_SCALE = (1333, 800)
# Boxes per image after padding, as Scenic's CenterNet baseline pads its ground truth
# (scenic/projects/baselines/centernet/input_pipeline.py, max_boxes=100).
DEFAULT_MAX_BOXES = 100

_warned_max_boxes = False


def resize_keep_ratio(
    image: np.ndarray, boxes: np.ndarray, scale: Sequence[int] = DEFAULT_SCALE
) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
  """mmdet `Resize(scale, keep_ratio=True)` of an image `[H, W, 3]` and its xyxy boxes `[n, 4]`.

  Size as `mmcv.rescale_size`; boxes scaled by the per-axis ratios of the rounded size and
  clipped to the image (`clip_object_border=True`). Returns `(image [h, w, 3], boxes
  float32 [n, 4], scale_factor (h / H, w / W))`.
  """
  in_h, in_w = image.shape[:2]
  out_h, out_w = image_ops.rescale_size((in_h, in_w), scale)
  image = image_ops.resize_image(image, (out_h, out_w))
  h_ratio, w_ratio = out_h / in_h, out_w / in_w
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4) * np.float32(
      [w_ratio, h_ratio, w_ratio, h_ratio]
  )
  boxes = np.clip(boxes, 0, np.float32([out_w, out_h, out_w, out_h]))
  return image, boxes, (h_ratio, w_ratio)


def flip_boxes(boxes: np.ndarray, width: int) -> np.ndarray:
  """Mirrors xyxy boxes `[n, 4]` in an image `width` pixels wide (mmdet: `x' = w - x`)."""
  boxes = np.asarray(boxes, np.float32)
  return np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], axis=1)


def random_flip(
    rng: np.random.Generator, image: np.ndarray, boxes: np.ndarray, prob: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
  """mmdet `RandomFlip(prob)`, horizontal: image `[H, W, C]` and boxes `[n, 4]` together (one
  uniform draw, as the segmentation `random_flip`)."""
  if rng.random() < prob:
    return image[:, ::-1], flip_boxes(boxes, image.shape[1])
  return image, np.asarray(boxes, np.float32)


def pad_to(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Zero-pads `[h, w, C]` at the bottom and right to `size` (mmdet pads after normalising)."""
  return image_ops.pad_image(image, size, pad_value=0)


def _pack(
    example: dict, image: np.ndarray, boxes: np.ndarray, scale_factor: tuple[float, float]
) -> dict:
  """The transformed example; crowd boxes (mmdet's ignored instances) are dropped."""
  keep = ~np.asarray(example.get('crowd', np.zeros(len(boxes), bool)), bool)
  return {
      'image': image,
      'boxes': boxes[keep],
      'labels': np.asarray(example['labels'], np.int32)[keep],
      'image_id': int(example['image_id']),
      'orig_size': tuple(int(s) for s in example['image'].shape[:2]),
      'image_size': tuple(int(s) for s in image.shape[:2]),
      'scale_factor': scale_factor,
  }


@dataclasses.dataclass(frozen=True)
class DetectionTrainTransform:
  """mmdet's 1x training pipeline: keep-ratio resize to `scale`, horizontal flip, normalise.

  `transform(example, rng)` on a `CocoDetection` or `SyntheticDetection` item returns
  `{'image': float32 [h, w, 3] (unpadded), 'boxes': float32 [n, 4] xyxy resized, 'labels':
  int32 [n], 'image_id', 'orig_size': (H, W), 'image_size': (h, w), 'scale_factor': (h / H,
  w / W)}` without crowd boxes.
  """

  scale: tuple[int, int] = DEFAULT_SCALE
  flip_prob: float = 0.5
  mean: tuple[float, float, float] = image_ops.IMAGENET_MEAN
  std: tuple[float, float, float] = image_ops.IMAGENET_STD

  def __call__(self, example: dict, rng: np.random.Generator | None) -> dict:
    if rng is None and self.flip_prob > 0:
      raise ValueError(
          'DetectionTrainTransform needs an np.random.Generator for its random flip, got None'
      )
    image, boxes, scale_factor = resize_keep_ratio(example['image'], example['boxes'], self.scale)
    if self.flip_prob > 0:
      image, boxes = random_flip(rng, image, boxes, self.flip_prob)
    return _pack(example, image_ops.normalize(image, self.mean, self.std), boxes, scale_factor)


@dataclasses.dataclass(frozen=True)
class DetectionEvalTransform:
  """mmdet's test pipeline: keep-ratio resize and normalise, output as the train transform
  (boxes resized for a validation loss; COCO evaluation reads the json's)."""

  scale: tuple[int, int] = DEFAULT_SCALE
  mean: tuple[float, float, float] = image_ops.IMAGENET_MEAN
  std: tuple[float, float, float] = image_ops.IMAGENET_STD

  def __call__(self, example: dict, rng: np.random.Generator | None = None) -> dict:
    del rng  # deterministic
    image, boxes, scale_factor = resize_keep_ratio(example['image'], example['boxes'], self.scale)
    return _pack(example, image_ops.normalize(image, self.mean, self.std), boxes, scale_factor)


def default_canvas_sizes(
    scale: Sequence[int] = DEFAULT_SCALE, divisor: int = 32
) -> tuple[tuple[int, int], ...]:
  """Landscape, portrait and square `(height, width)` canvases for a keep-ratio `scale` (a
  batch mixing the first two needs the square), sides rounded up to `divisor` (mmdet's
  `pad_size_divisor=32`): `(1333, 800)` gives `((800, 1344), (1344, 800), (1344, 1344))`.
  """
  long = math.ceil(max(scale) / divisor) * divisor
  short = math.ceil(min(scale) / divisor) * divisor
  return tuple(dict.fromkeys(((short, long), (long, short), (long, long))))


def collate(examples: Sequence[dict], canvas_sizes: Sequence[tuple[int, int]],
            max_boxes: int = DEFAULT_MAX_BOXES) -> dict[str, np.ndarray]:
  """Stacks transformed examples on the least-area canvas of `canvas_sizes` (ties: the first)
  that holds them all.

  An image with more than `max_boxes` (M) keeps its M largest, in order (one warning).
  Returns `{'inputs': float32 [B, H, W, 3] (zero padded), 'boxes': float32 [B, M, 4],
  'labels': int32 [B, M] (-1 for padding), 'box_mask': bool [B, M], 'image_size', 'orig_size':
  int32 [B, 2], 'scale_factor': float32 [B, 2], 'image_id': int64 [B], 'batch_mask': [B]}`.
  """
  if not examples:
    raise ValueError('collate needs at least one example')
  sizes = np.asarray([ex['image'].shape[:2] for ex in examples])
  need_h, need_w = sizes.max(axis=0)
  fitting = [c for c in canvas_sizes if c[0] >= need_h and c[1] >= need_w]
  if not fitting:
    tallest, widest = (examples[int(k)] for k in sizes.argmax(axis=0))
    raise ValueError(
        f'no canvas in {tuple(map(tuple, canvas_sizes))} holds this batch: it needs '
        f'{need_h}x{need_w} (h x w; height from image {tallest["image_id"]}, width from image '
        f'{widest["image_id"]}); add a canvas or resize to a smaller scale'
    )
  canvas = min(fitting, key=lambda c: c[0] * c[1])  # min keeps the first of equal areas
  b = len(examples)
  batch = {
      'inputs': np.zeros((b, *canvas, 3), np.float32),  # zero padding, as pad_to
      'boxes': np.zeros((b, max_boxes, 4), np.float32),
      'labels': np.full((b, max_boxes), -1, np.int32),
      'box_mask': np.zeros((b, max_boxes), bool),
      'image_size': sizes.astype(np.int32),
      'orig_size': np.asarray([ex['orig_size'] for ex in examples], np.int32),
      'scale_factor': np.asarray([ex['scale_factor'] for ex in examples], np.float32),
      'image_id': np.asarray([ex['image_id'] for ex in examples], np.int64),
      'batch_mask': np.ones(b, np.float32),
  }
  for i, ex in enumerate(examples):
    boxes = np.asarray(ex['boxes'], np.float32).reshape(-1, 4)
    labels = np.asarray(ex['labels'], np.int32)
    if len(boxes) > max_boxes:
      keep = _largest(boxes, max_boxes)
      _warn_max_boxes(ex['image_id'], len(boxes), max_boxes)
      boxes, labels = boxes[keep], labels[keep]
    h, w = sizes[i]
    batch['inputs'][i, :h, :w] = ex['image']  # written in place: no padded copy per image
    n = len(boxes)
    batch['boxes'][i, :n] = boxes
    batch['labels'][i, :n] = labels
    batch['box_mask'][i, :n] = True
  return batch


def _largest(boxes: np.ndarray, k: int) -> np.ndarray:
  """Indices of the `k` largest boxes by area, in their original order."""
  area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  return np.sort(np.argsort(-area, kind='stable')[:k])


def _warn_max_boxes(image_id: int, num_boxes: int, max_boxes: int) -> None:
  global _warned_max_boxes
  if not _warned_max_boxes:
    _warned_max_boxes = True
    warnings.warn(
        f'image {image_id} has {num_boxes} boxes, more than max_boxes={max_boxes}; keeping the '
        f'{max_boxes} largest (warned once: other images are truncated the same way silently)',
        stacklevel=3,
    )


# Values of the padding entries added by `pad_batch`; scale_factor 1 keeps a division by it
# (mapping boxes back to the original image) finite.
_PAD_VALUES = {'labels': -1, 'scale_factor': 1, 'image_id': -1}


def pad_batch(batch: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
  """Pads a `collate` batch to `batch_size` entries with masked ones (zeros, `box_mask`
  False, labels and image id -1, scale factor 1)."""
  b = len(batch['batch_mask'])
  if b > batch_size:
    raise ValueError(f'cannot pad a batch of {b} entries to the smaller batch size {batch_size}')
  out = {}
  for key, value in batch.items():
    filler = np.full((batch_size - b,) + value.shape[1:], _PAD_VALUES.get(key, 0), value.dtype)
    out[key] = np.concatenate([value, filler])
  return out
