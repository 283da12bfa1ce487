"""A synthetic segmentation dataset: coloured, textured shapes on textured backgrounds.

A small CvT learns it in minutes on CPU: every class has its own hue and texture (local
cues at stride 4) and shape; class 0, the background, is a low-saturation texture. Example
`i` is a pure function of `(seed, split, i)`, drawn when read (no memory).
"""

from __future__ import annotations

import colorsys

import numpy as np

from projects.cvt_segmentation.data.transforms import resize_image

SHAPES = ('disc', 'rectangle', 'triangle', 'ellipse', 'ring', 'diamond', 'cross')
# Foreground textures, cycled with a different period than SHAPES so that classes
# beyond len(SHAPES) still differ in texture.
_TEXTURES = ('solid', 'stripes', 'checker')
_SPLITS = {'train': 0, 'validation': 1, 'test': 2}


def synthetic_class_names(num_classes: int) -> tuple[str, ...]:
  """Names of the synthetic classes: 'background', then shape names ('disc', 'disc_2'...)."""
  names = ['background']
  for c in range(1, num_classes):
    shape, repeat = SHAPES[(c - 1) % len(SHAPES)], (c - 1) // len(SHAPES)
    names.append(shape if repeat == 0 else f'{shape}_{repeat + 1}')
  return tuple(names)


def _class_color(c: int, num_classes: int) -> np.ndarray:
  # Hues evenly spaced around the circle; saturated, bright (background is greyish).
  hue = (c - 1) / max(num_classes - 1, 1)
  value = 0.95 if (c - 1) % 2 == 0 else 0.75
  return np.array(colorsys.hsv_to_rgb(hue, 0.9, value), np.float32) * 255


class SyntheticSegmentation:
  """Random-access synthetic split: `ds[i]` is `{'image': uint8 [H, W, 3], 'label': uint8
  [H, W] in [0, num_classes) (0 the background), 'name'}`; 2 to 255 classes, images at
  least 8x8, 1 to `max_objects` shapes each; each `split` its own images."""

  def __init__(self, num_classes: int = 6, image_size: tuple[int, int] = (64, 64),
               num_examples: int = 1000, seed: int = 0, split: str = 'train', max_objects: int = 4):
    if not 2 <= num_classes <= 255:
      raise ValueError(f'num_classes must be in [2, 255] (background included), got {num_classes}')
    if min(image_size) < 8:
      raise ValueError(f'image_size must be at least 8x8, got {tuple(image_size)}')
    if split not in _SPLITS:
      raise ValueError(f'split must be one of {sorted(_SPLITS)}, got {split!r}')
    self.num_classes = num_classes
    self.image_size = (int(image_size[0]), int(image_size[1]))
    self.num_examples = num_examples
    self.seed = seed
    self.split = split
    self.max_objects = max_objects
    self.class_names = synthetic_class_names(num_classes)

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < self.num_examples:
      raise IndexError(f'index {index} out of range for {self.num_examples} examples')
    rng = np.random.default_rng([self.seed, _SPLITS[self.split], index])
    image, label = self._draw(rng)
    return {'image': image, 'label': label, 'name': f'synthetic_{self.split}_{index:06d}'}

  def _draw(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = self.image_size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    image = _background(rng, h, w, yy, xx)
    label = np.zeros((h, w), np.uint8)
    for _ in range(int(rng.integers(1, self.max_objects + 1))):
      c = int(rng.integers(1, self.num_classes))
      mask = _shape_mask(rng, SHAPES[(c - 1) % len(SHAPES)], h, w, yy, xx)
      texture = _TEXTURES[(c - 1) % len(_TEXTURES)]
      color = _class_color(c, self.num_classes) + rng.uniform(-12, 12, 3)
      fill = color * _texture(rng, texture, yy, xx, min(h, w))[..., None]
      image[mask] = fill[mask]
      label[mask] = c
    image += rng.normal(0, 4, image.shape)  # sensor-like noise on every pixel
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), label


def _background(rng, h, w, yy, xx) -> np.ndarray:
  kind = rng.integers(3)
  base = rng.uniform(70, 190) + rng.uniform(-15, 15, 3)  # grey with a faint tint
  if kind == 0:  # smooth noise: coarse random grid, bilinearly upsampled
    coarse = rng.uniform(-35, 35, (max(h // 8, 2), max(w // 8, 2), 1)).astype(np.float32)
    tex = resize_image(coarse, (h, w))
  elif kind == 1:  # linear gradient in a random direction
    angle = rng.uniform(0, 2 * np.pi)
    t = (np.cos(angle) * xx / w + np.sin(angle) * yy / h)[..., None]
    tex = (t - t.mean()) * rng.uniform(40, 90)
  else:  # stripes
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(4, 12)
    t = np.cos(angle) * xx + np.sin(angle) * yy
    tex = (20 * np.sin(2 * np.pi * t / period))[..., None]
  return (base + tex).astype(np.float32)


def _shape_mask(rng, shape, h, w, yy, xx) -> np.ndarray:
  side = min(h, w)
  r = max(rng.uniform(0.12, 0.28) * side, 3.0)
  cy, cx = rng.uniform(0, h), rng.uniform(0, w)
  angle = rng.uniform(0, np.pi)
  # Coordinates in the shape's rotated frame.
  u = np.cos(angle) * (xx - cx) + np.sin(angle) * (yy - cy)
  v = -np.sin(angle) * (xx - cx) + np.cos(angle) * (yy - cy)
  if shape == 'disc':
    return u**2 + v**2 <= r**2
  if shape == 'rectangle':
    return (np.abs(u) <= r) & (np.abs(v) <= r * rng.uniform(0.5, 1.0))
  if shape == 'triangle':  # equilateral: three half-planes
    inside = np.ones_like(u, bool)
    for k in range(3):
      a = angle + 2 * np.pi * k / 3
      inside &= np.cos(a) * (xx - cx) + np.sin(a) * (yy - cy) <= r / 2
    return inside
  if shape == 'ellipse':
    return (u / r) ** 2 + (v / (0.5 * r)) ** 2 <= 1
  if shape == 'ring':
    d2 = u**2 + v**2
    return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
  if shape == 'diamond':
    return np.abs(u) + np.abs(v) <= r
  if shape == 'cross':
    arm = 0.35 * r
    return ((np.abs(u) <= r) & (np.abs(v) <= arm)) | ((np.abs(v) <= r) & (np.abs(u) <= arm))
  raise ValueError(f'unknown shape {shape!r}')


def _texture(rng, kind, yy, xx, side) -> np.ndarray:
  """Multiplicative brightness pattern in (0, 1]."""
  if kind == 'solid':
    return np.ones_like(yy)
  period = max(side / 10, 3.0) * rng.uniform(0.8, 1.2)
  if kind == 'stripes':
    return np.where(np.floor((xx + yy) / period) % 2 == 0, 1.0, 0.7).astype(np.float32)
  cells = (np.floor(xx / period) + np.floor(yy / period)) % 2
  return np.where(cells == 0, 1.0, 0.7).astype(np.float32)
