"""Colour palettes and the pictures segmentation `predict` writes: palette PNG masks (mode
'P': pixel values are class indices) and overlays. The ADE20K and Cityscapes palettes are
mmsegmentation's (mmseg/datasets/ade.py and cityscapes.py METAINFO).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

ADE20K_PALETTE = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80),
    (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7),
    (150, 5, 61), (120, 120, 70), (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4),
    (255, 51, 7), (204, 70, 3), (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255),
    (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255),
    (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10), (7, 255, 255),
    (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),
    (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255),
    (140, 140, 140), (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0),
    (153, 255, 0), (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255),
    (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255), (0, 255, 112), (0, 255, 133),
    (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0), (0, 143, 255), (51, 255, 0),
    (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0), (0, 255, 153),
    (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20),
    (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194),
    (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255),
    (0, 255, 163), (255, 153, 0), (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255),
    (163, 255, 0), (255, 235, 0), (8, 184, 170), (133, 0, 255), (0, 255, 92), (184, 0, 255),
    (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255),
    (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),
    (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255),
    (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255),
    (255, 255, 0), (0, 153, 255), (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0),
    (173, 0, 255), (0, 245, 255), (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255),
    (184, 255, 0), (0, 133, 255), (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255),
)  # fmt: skip
CITYSCAPES_PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
)  # fmt: skip
PALETTE_NAMES = ('ade20k', 'cityscapes', 'auto')
# Colour of label 255 (ignore) in masks and overlays: black, as mmseg leaves it unpainted.
IGNORE_COLOR = (0, 0, 0)


def generated_palette(num_colors: int) -> np.ndarray:
  """uint8 `[num_colors, 3]` of the PASCAL VOC bit-interleaved palette (up to 256 colours)."""
  out = np.zeros((num_colors, 3), np.uint8)
  for i in range(num_colors):
    c, r, g, b = i, 0, 0, 0
    for bit in range(8):
      r |= ((c >> 0) & 1) << (7 - bit)
      g |= ((c >> 1) & 1) << (7 - bit)
      b |= ((c >> 2) & 1) << (7 - bit)
      c >>= 3
    out[i] = r, g, b
  return out


def get_palette(name: str, num_classes: int, dataset_name: str | None = None) -> np.ndarray:
  """uint8 `[K, 3]` colours of classes `0 .. K - 1` (K at most 255: 255 is the ignore value).

  'auto' takes the palette of `dataset_name` (ADE20K or Cityscapes), else ADE20K's when it
  has enough colours, else a generated one.
  """
  if not 1 <= num_classes <= 255:
    raise ValueError(f'palette masks hold 1 to 255 classes, got num_classes={num_classes}')
  if name == 'auto':
    if dataset_name in ('ade20k', 'cityscapes'):
      name = dataset_name
    else:
      name = 'ade20k' if num_classes <= len(ADE20K_PALETTE) else 'generated'
  tables = {'ade20k': ADE20K_PALETTE, 'cityscapes': CITYSCAPES_PALETTE}
  if name == 'generated':
    return generated_palette(num_classes)
  if name not in tables:
    raise ValueError(f'unknown palette {name!r}; expected one of {PALETTE_NAMES}')
  table = np.asarray(tables[name], np.uint8)
  if num_classes > len(table):
    raise ValueError(
        f'the {name} palette has {len(table)} colours but the model predicts {num_classes} '
        "classes; use --palette auto"
    )
  return table[:num_classes]


def _lookup_table(palette) -> np.ndarray:
  """`[256, 3]` uint8: the palette, then black, with `IGNORE_COLOR` at 255."""
  palette = np.asarray(palette, np.uint8).reshape(-1, 3)
  if len(palette) > 255:
    raise ValueError(f'a mask palette holds at most 255 class colours, got {len(palette)}')
  lut = np.zeros((256, 3), np.uint8)
  lut[: len(palette)] = palette
  lut[255] = IGNORE_COLOR
  return lut


def _check_labels(labels: np.ndarray) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 2:
    raise ValueError(f'expected a [H, W] label map, got shape {labels.shape}')
  if labels.size and (labels.min() < 0 or labels.max() > 255):
    raise ValueError(f'labels must be in [0, 255], found [{labels.min()}, {labels.max()}]')
  return labels.astype(np.uint8)


def colorize(labels: np.ndarray, palette: Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
  """uint8 `[H, W, 3]` of a label map `[H, W]`: `palette[label]`, `IGNORE_COLOR` for 255."""
  return _lookup_table(palette)[_check_labels(labels)]


def mask_image(labels: np.ndarray, palette: Sequence[Sequence[int]] | np.ndarray) -> Image.Image:
  """A mode 'P' PIL image whose pixel values are the `[H, W]` labels, coloured by `palette`."""
  labels = np.ascontiguousarray(_check_labels(labels))
  image = Image.frombytes('P', (labels.shape[1], labels.shape[0]), labels.tobytes())
  image.putpalette(_lookup_table(palette).reshape(-1).tolist())
  return image


def background_classes(class_names: Sequence[str] | None) -> tuple[int, ...]:
  """Indices of the classes named 'background' (any case); ADE20K and Cityscapes have none."""
  return tuple(i for i, name in enumerate(class_names or ()) if name.lower() == 'background')


def overlay_image(
    image: np.ndarray, labels: np.ndarray, palette: Sequence[Sequence[int]] | np.ndarray,
    alpha: float = 0.5, transparent: Sequence[int] = ()) -> np.ndarray:
  """uint8 `[H, 2 W, 3]`: the image, and beside it the image blended with the coloured mask
  at `alpha` (mmseg's visualiser: 0.5); label 255 and the `transparent` classes (the
  background, which would grey the whole picture) are left unblended."""
  image = np.asarray(image)
  labels = _check_labels(labels)
  if image.shape[:2] != labels.shape:
    raise ValueError(f'image size {image.shape[:2]} != label map size {labels.shape}')
  color = colorize(labels, palette).astype(np.float32)
  blend = (1 - alpha) * image.astype(np.float32) + alpha * color
  keep = np.isin(labels, np.asarray([255, *transparent], np.int64))
  blend = np.where(keep[..., None], image, np.rint(blend))
  return np.concatenate([image, blend.astype(np.uint8)], axis=1)
