"""A synthetic detection dataset: coloured, textured shapes on a noisy textured background.

A small detector reaches a useful COCO AP on it in minutes on CPU: every class has its own
shape, hue and texture, while 2 to 6 objects per image, box sides spanning about 5x (10 to
48 px at 128x128), touching and overlapping objects and noise keep detection non-trivial.
Boxes are each shape's full extent; a placement that would leave an earlier object less
than `_MIN_VISIBLE` visible is redrawn. Example `k` is a pure function of `(seed, split, k)`.
"""

from __future__ import annotations

import colorsys

import numpy as np

from projects.training.datasets import DatasetError
from projects.training.image_ops import resize_image

SHAPES = ('rectangle', 'ellipse', 'triangle', 'ring', 'cross')
# Texture of each class, in SHAPES order: a second cue besides shape and hue.
_TEXTURES = ('solid', 'stripes', 'checker', 'solid', 'stripes')
_SPLITS = {'train': 0, 'val': 1, 'validation': 1, 'test': 2}
# Share of an object's pixels that must stay visible under the objects drawn after it;
# below about a half, a box drawn around the full shape is guesswork even for a person.
_MIN_VISIBLE = 0.6
# Probability that an object is placed against an earlier one (touching or overlapping)
# rather than anywhere: uniform placement alone rarely makes objects touch.
_ATTACH_PROB = 0.4
_PLACEMENT_TRIES = 10


class SyntheticDetection:
  """Random-access synthetic split with `CocoDetection`'s items (`image_id` k + 1, no crowd),
  objects back to front.

  Args:
    image_size: `(height, width)`, at least 32x32.
    num_classes: 1 to 5 (`SHAPES[:num_classes]`).
    split: 'train', 'val' ('validation' is the same split) or 'test'.
    objects_per_image: `(min, max)` per image (fewer if a placement fails, rarely).
    box_size: `(min, max)` long side of a box as a fraction of `min(image_size)`.
  """

  def __init__(self, num_images: int = 512, image_size: tuple[int, int] = (128, 128),
               num_classes: int = 4, seed: int = 0, split: str = 'train',
               objects_per_image: tuple[int, int] = (2, 6),
               box_size: tuple[float, float] = (0.08, 0.375)):
    if not 1 <= num_classes <= len(SHAPES):
      raise DatasetError(f'the synthetic dataset draws {len(SHAPES)} shapes {SHAPES}: '
                         f'num_classes must be in [1, {len(SHAPES)}], got {num_classes}')
    if min(image_size) < 32:
      raise DatasetError(f'the synthetic dataset needs image_size of at least 32x32, got '
                         f'{tuple(image_size)}')
    if split not in _SPLITS:
      raise ValueError(f'split must be one of {sorted(_SPLITS)}, got {split!r}')
    if not 1 <= objects_per_image[0] <= objects_per_image[1]:
      raise ValueError(f'objects_per_image must be (min, max) with 1 <= min <= max, got '
                       f'{tuple(objects_per_image)}')
    if not 0 < box_size[0] <= box_size[1] <= 1:
      raise ValueError(f'box_size must be (min, max) fractions in (0, 1], got {tuple(box_size)}')
    self.num_images = num_images
    self.image_size = (int(image_size[0]), int(image_size[1]))
    self.num_classes = num_classes
    self.seed = seed
    self.split = 'val' if split == 'validation' else split
    self.objects_per_image = tuple(objects_per_image)
    self.box_size = tuple(box_size)
    self.class_names = SHAPES[:num_classes]
    # COCO numbers categories from 1 (`coco.coco_ground_truth`, results files).
    self.label_to_category_id = np.arange(1, num_classes + 1)
    # Evenly spaced hues, alternating brightness, so neighbouring hues still differ.
    hsv = [(c / num_classes, 0.85, 0.95 - 0.2 * (c % 2)) for c in range(num_classes)]
    self._colors = np.array([colorsys.hsv_to_rgb(*x) for x in hsv], np.float32) * 255

  def __len__(self) -> int:
    return self.num_images

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < self.num_images:
      raise IndexError(f'index {index} out of range for {self.num_images} images')
    rng = np.random.default_rng([self.seed, _SPLITS[self.split], index])
    image, boxes, labels = self._draw(rng)
    return {
        'image': image,
        'boxes': boxes,
        'labels': labels,
        'crowd': np.zeros(len(labels), bool),
        'image_id': index + 1,
        'orig_size': self.image_size,
    }

  def _draw(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    h, w = self.image_size
    image = _background(rng, h, w)
    owner = np.full((h, w), -1, np.int16)  # index of the object on top of each pixel
    areas, boxes, labels = [], [], []
    lo, hi = self.objects_per_image
    for _ in range(int(rng.integers(lo, hi + 1))):
      label = int(rng.integers(self.num_classes))
      for _ in range(_PLACEMENT_TRIES):
        window, mask = self._place(rng, SHAPES[label], boxes)
        if mask.any() and _keeps_visible(owner, window, mask, areas):
          break
      else:
        continue
      ys, xs = np.nonzero(mask)
      y0, x0 = window[0].start, window[1].start
      boxes.append([x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1])
      areas.append(int(mask.sum()))
      labels.append(label)
      owner[window][mask] = len(labels) - 1
      color = self._colors[label] * rng.uniform(0.85, 1.1) + rng.uniform(-15, 15, 3)
      fill = color * _texture(rng, _TEXTURES[label], mask.shape)[..., None]
      # A darker rim separates touching objects of one class, as edges do in photographs.
      fill[_rim(mask)] *= 0.6
      image[window][mask] = fill[mask]
    image += rng.normal(0, 6, image.shape).astype(np.float32)  # sensor-like pixel noise
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return image, np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int32)

  def _place(
      self, rng: np.random.Generator, shape: str, boxes: list
  ) -> tuple[tuple[slice, slice], np.ndarray]:
    """Draws a shape's size and position; returns its pixel window and mask in it."""
    h, w = self.image_size
    side = min(h, w)
    lo, hi = self.box_size
    # Log-uniform long side, so small and large objects are equally common.
    long = side * np.exp(rng.uniform(np.log(lo), np.log(hi)))
    short = long * rng.uniform(0.6, 1.0)
    bh, bw = (long, short) if rng.random() < 0.5 else (short, long)
    if boxes and rng.random() < _ATTACH_PROB:
      # Just outside a side of an earlier box: the two touch, overlap a little or nearly touch.
      x1, y1, x2, y2 = boxes[int(rng.integers(len(boxes)))]
      reach = rng.uniform(0.4, 1.05)  # centre distance from that side, in half box sizes
      side_index = int(rng.integers(4))
      if side_index < 2:  # left or right side
        cx = x1 - reach * bw / 2 if side_index == 0 else x2 + reach * bw / 2
        cy = rng.uniform(y1, y2)
      else:  # top or bottom side
        cx = rng.uniform(x1, x2)
        cy = y1 - reach * bh / 2 if side_index == 2 else y2 + reach * bh / 2
    else:
      cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    # Whole shapes only: the box is the drawn extent, never cut by the image border.
    top = float(np.clip(cy - bh / 2, 0, h - bh))
    left = float(np.clip(cx - bw / 2, 0, w - bw))
    window = (
        slice(int(top), min(int(np.ceil(top + bh)), h)),
        slice(int(left), min(int(np.ceil(left + bw)), w)),
    )
    # Pixel centres in the shape's frame, [-1, 1] across the box on each axis.
    v = (np.arange(window[0].start, window[0].stop) + 0.5 - (top + bh / 2)) / (bh / 2)
    u = (np.arange(window[1].start, window[1].stop) + 0.5 - (left + bw / 2)) / (bw / 2)
    v, u = v[:, None], u[None, :]
    if shape == 'triangle' and rng.random() < 0.5:
      v = -v  # apex up or down
    return window, _shape_mask(shape, u, v)


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Pixels of `shape` given pixel-centre coordinates `u [1, w]`, `v [h, 1]` in [-1, 1]."""
  inside = (np.abs(u) <= 1) & (np.abs(v) <= 1)
  if shape == 'rectangle':
    return inside
  if shape == 'ellipse':
    return u**2 + v**2 <= 1
  if shape == 'triangle':  # apex at (0, -1), base along v = 1
    return inside & (np.abs(u) <= (v + 1) / 2)
  if shape == 'ring':
    r2 = u**2 + v**2
    return (r2 <= 1) & (r2 >= 0.4)
  if shape == 'cross':
    return inside & ((np.abs(u) <= 0.33) | (np.abs(v) <= 0.33))
  raise ValueError(f'unknown shape {shape!r}; expected one of {SHAPES}')


def _keeps_visible(
    owner: np.ndarray, window: tuple[slice, slice], mask: np.ndarray, areas: list[int]
) -> bool:
  """Whether painting `mask [h, w]` at `window` leaves each earlier object (`owner [H, W]`:
  the top one per pixel, -1 none; `areas`: full pixel counts) `_MIN_VISIBLE` visible."""
  if not areas:
    return True
  n = len(areas)
  visible = np.bincount(owner[owner >= 0], minlength=n)
  under = owner[window][mask]
  covered = np.bincount(under[under >= 0], minlength=n)
  return bool(np.all(visible - covered >= _MIN_VISIBLE * np.asarray(areas)))


def _rim(mask: np.ndarray) -> np.ndarray:
  """Pixels of `mask` with a 4-neighbour outside it (or on the window's edge)."""
  padded = np.pad(mask, 1)
  interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
  return mask & ~interior


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  """Low-saturation texture `[h, w, 3]` float32: smooth noise plus faint stripes."""
  base = rng.uniform(60, 190) + rng.uniform(-12, 12, 3)  # grey with a faint tint
  coarse = rng.uniform(-40, 40, (max(h // 16, 2), max(w // 16, 2), 1)).astype(np.float32)
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  angle, period = rng.uniform(0, np.pi), rng.uniform(5, 20)
  phase = 2 * np.pi * (np.cos(angle) * xx + np.sin(angle) * yy) / period
  stripes = rng.uniform(0, 15) * np.sin(phase)
  return (base + resize_image(coarse, (h, w)) + stripes[..., None]).astype(np.float32)


def _texture(rng: np.random.Generator, kind: str, shape: tuple[int, int]) -> np.ndarray:
  """Multiplicative brightness pattern in (0, 1] over an object's window."""
  if kind == 'solid':
    return np.ones(shape, np.float32)
  period = rng.uniform(3, 5)
  yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
  if kind == 'stripes':
    cells = np.floor((xx + yy) / period) % 2
  else:
    cells = (np.floor(xx / period) + np.floor(yy / period)) % 2
  return np.where(cells == 0, 1.0, 0.65).astype(np.float32)
