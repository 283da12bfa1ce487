"""Segmentation inference as mmsegmentation runs it: whole image, sliding window, TTA.

Model-agnostic: every function takes `logits_fn(images [B, h, w, 3]) -> logits [B, h, w, K]`
at the input size (`make_logits_fn` wraps a Flax model). The reference is mmseg's
`EncoderDecoder` (mmseg/models/segmentors/encoder_decoder.py) and its TTA (0.x `aug_test`,
1.x `SegTTAModel`). Post-processing is jitted per shape; `evaluate_dataset` is both the
trainer's periodic evaluation and the `evaluate` tool's.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from heads.resampling import resize_bilinear
from projects.cvt_segmentation import metrics
from projects.cvt_segmentation.data.transforms import (
  IMAGENET_MEAN,
  IMAGENET_STD,
  normalize,
  rescale_size,
  resize_image,
)
from projects.tools.progress import Progress
from projects.training.configs import as_dict, config_get
from projects.training.image_ops import scale_size

LogitsFn = Callable[[jax.Array], jax.Array]
MODES = ('whole', 'slide')
# CvT needs at least 16 px per side; images (or windows) smaller than this are padded
# (bottom/right, zeros after normalization) and their logits cropped back. A no-op for
# ordinary images; it lets extreme aspect ratios run (a 10 x 3000 strip resized to
# (2048, 512) is 7 px high).
DEFAULT_MIN_SIZE = 32


def _pair(x: int | Sequence[int], what: str) -> tuple[int, int]:
  pair = (x, x) if isinstance(x, int | np.integer) else tuple(x)
  if len(pair) != 2 or any(int(v) != v or v < 1 for v in pair):
    raise ValueError(f'{what} must be a positive int or (height, width), got {x!r}')
  return int(pair[0]), int(pair[1])


@dataclasses.dataclass(frozen=True)
class InferenceSettings:
  """How to infer (`infer_logits`) and the test-time augmentation (`segment_image`)."""

  mode: str = 'whole'
  crop_size: tuple[int, int] | None = None
  stride: tuple[int, int] | None = None
  scales: tuple[float, ...] = (1.0,)  # TTA resize ratios; (1.0,) is single scale
  flip: bool = False
  min_size: int = DEFAULT_MIN_SIZE
  pad_to_crop: bool = False

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f'unknown inference mode {self.mode!r}; expected one of {MODES}')
    if self.mode == 'slide' and (self.crop_size is None or self.stride is None):
      raise ValueError("mode 'slide' needs crop_size and stride (config.eval or flags)")
    if not self.scales or any(s <= 0 for s in self.scales):
      raise ValueError(f'scales must be positive ratios, got {self.scales}')

  @property
  def tta(self) -> bool:
    return tuple(self.scales) != (1.0,) or self.flip

  def infer_kwargs(self) -> dict:
    """Keyword arguments of `infer_logits`."""
    return dict(mode=self.mode, crop_size=self.crop_size, stride=self.stride,
                min_size=self.min_size, pad_to_crop=self.pad_to_crop)


def _hw(value: Any) -> tuple[int, int] | None:
  if value is None:
    return None
  value = (value,) if isinstance(value, int) else tuple(int(v) for v in value)
  return (value * 2)[0], (value * 2)[1]


def inference_settings(config: Any, **overrides: Any) -> InferenceSettings:
  """`config.eval` (what the trainer's evaluation and the tools run), with the `overrides`
  that are not None (the command-line flags); what neither sets keeps its field default."""
  values = as_dict(config_get(config, 'eval'))
  values.update((k, v) for k, v in overrides.items() if v is not None)
  convert = dict(crop_size=_hw, stride=_hw, scales=lambda v: tuple(float(s) for s in v),
                 flip=bool, min_size=int, pad_to_crop=bool)
  return InferenceSettings(**{k: convert.get(k, lambda v: v)(v) for k, v in values.items()
                              if v is not None})


def config_test_scale(config: Any, flag: tuple[int, int] | str | None = None
                      ) -> tuple[int, int] | None:
  """The single-scale test resize `(long, short)`, None to keep the size.

  `flag` ('none' or `(long, short)`) wins, else `dataset_configs.test_scale` (an explicit
  None keeps the size), else the dataset's mmseg value.
  """
  from projects.cvt_segmentation.data import resolve_test_scale

  if flag is not None:
    return None if flag == 'none' else (int(flag[0]), int(flag[1]))
  value = as_dict(config_get(config, 'dataset_configs')).get('test_scale', 'default')
  return resolve_test_scale(config_get(config, 'dataset_name'), value)


def make_logits_fn(model: Any, variables: Any, **apply_kwargs: Any) -> LogitsFn:
  """`logits_fn` of `model.apply(variables, images, train=False)` (or its `'logits'`), jitted
  with the variables as an argument rather than baked-in constants."""
  @jax.jit
  def apply(v, images):
    return _as_logits(model.apply(v, images, train=False, **apply_kwargs))

  def logits_fn(images):
    return apply(variables, images)

  return logits_fn


def _as_logits(out: Any) -> jax.Array:
  if isinstance(out, Mapping):
    if 'logits' not in out:
      raise ValueError(f"the model returned a dict without 'logits' (keys {sorted(out)})")
    return out['logits']
  return out


def _call(logits_fn: LogitsFn, images: jax.Array, num_classes: int | None) -> jax.Array:
  logits = _as_logits(logits_fn(images))
  shape = tuple(getattr(logits, 'shape', ()))
  if len(shape) != 4 or shape[:3] != tuple(images.shape[:3]):
    raise ValueError(
        f'logits_fn must return [B, h, w, K] logits at the size of its input '
        f'{tuple(images.shape[:3])}, got shape {shape}'
    )
  if num_classes is not None and shape[3] != num_classes:
    raise ValueError(
        f'the model predicts {shape[3]} classes but {num_classes} were expected '
        '(does the checkpoint match the config and dataset?)'
    )
  return logits


def _call_padded(
    logits_fn: LogitsFn, images: jax.Array, min_size: tuple[int, int], num_classes: int | None
) -> jax.Array:
  """`logits_fn` on images padded (bottom/right, zeros) to at least `min_size`, cropped back."""
  _, h, w, _ = images.shape
  ph, pw = max(h, min_size[0]), max(w, min_size[1])
  if (ph, pw) == (h, w):
    return _call(logits_fn, images, num_classes)
  padded = jnp.pad(images, ((0, 0), (0, ph - h), (0, pw - w), (0, 0)))
  return _call(logits_fn, padded, num_classes)[:, :h, :w]


def _as_batch(images: Any) -> tuple[jax.Array, bool]:
  images = jnp.asarray(images)
  if images.ndim == 3:
    return images[None], True
  if images.ndim != 4:
    raise ValueError(f'expected images [B, h, w, C] or one image [h, w, C], got {images.shape}')
  return images, False


def whole_inference(
    logits_fn: LogitsFn, images: jax.Array, *, num_classes: int | None = None,
    min_size: int | Sequence[int] = 0) -> jax.Array:
  """Logits `[B, h, w, K]` of whole normalized images (mmseg `whole_inference`); images
  under `min_size` per axis are padded for the model and the logits cropped back."""
  images, _ = _as_batch(images)
  min_hw = (0, 0) if not min_size else _pair(min_size, 'min_size')
  return _call_padded(logits_fn, images, min_hw, num_classes)


def slide_windows(
    image_size: Sequence[int], crop_size: int | Sequence[int], stride: int | Sequence[int]
) -> list[tuple[int, int, int, int]]:
  """The `(y1, y2, x1, x2)` windows of mmseg `slide_inference`, in its order: a grid every
  `stride`, each window clamped to the image edge (`y1 = max(y2 - h_crop, 0)`), so each is
  `min(h, h_crop) x min(w, w_crop)` (an image smaller than the crop is not padded)."""
  h, w = (int(s) for s in image_size)
  (hc, wc), (hs, ws) = _pair(crop_size, 'crop_size'), _pair(stride, 'stride')
  if hs > hc or ws > wc:
    raise ValueError(f'stride {(hs, ws)} larger than crop_size {(hc, wc)} leaves pixels uncovered')
  h_grids = max(h - hc + hs - 1, 0) // hs + 1
  w_grids = max(w - wc + ws - 1, 0) // ws + 1
  windows = []
  for i in range(h_grids):
    for j in range(w_grids):
      y2, x2 = min(i * hs + hc, h), min(j * ws + wc, w)
      windows.append((max(y2 - hc, 0), y2, max(x2 - wc, 0), x2))
  return windows


def slide_count(
    image_size: Sequence[int], crop_size: int | Sequence[int], stride: int | Sequence[int]
) -> np.ndarray:
  """How many windows cover each pixel (mmseg's `count_mat`): int32 `[h, w]`, all >= 1."""
  count = np.zeros(tuple(int(s) for s in image_size), np.int32)
  for y1, y2, x1, x2 in slide_windows(image_size, crop_size, stride):
    count[y1:y2, x1:x2] += 1
  return count


@functools.partial(jax.jit, donate_argnums=0)
def _accumulate(total: jax.Array, window: jax.Array, y: jax.Array, x: jax.Array) -> jax.Array:
  # Offsets are traced, so every window of one shape shares one executable; the donated
  # total is updated in place.
  start = (0, y, x, 0)
  current = jax.lax.dynamic_slice(total, start, window.shape)
  return jax.lax.dynamic_update_slice(total, current + window.astype(total.dtype), start)


@jax.jit
def _divide(total: jax.Array, count: jax.Array) -> jax.Array:
  return total / count[None, :, :, None]


def slide_inference(
    logits_fn: LogitsFn, images: jax.Array, crop_size: int | Sequence[int],
    stride: int | Sequence[int], num_classes: int | None = None, *, pad_to_crop: bool = False,
    min_size: int | Sequence[int] = 0) -> jax.Array:
  """float32 sliding-window logits `[B, h, w, K]` (mmseg `slide_inference`): the window
  logits summed and divided by `slide_count`. `pad_to_crop` pads windows smaller than the
  crop to it for the model (mmseg runs them at their own size)."""
  images, _ = _as_batch(images)
  b, h, w, _ = images.shape
  crop = _pair(crop_size, 'crop_size')
  windows = slide_windows((h, w), crop, stride)
  min_hw = (0, 0) if not min_size else _pair(min_size, 'min_size')
  if pad_to_crop:
    min_hw = (max(min_hw[0], crop[0]), max(min_hw[1], crop[1]))
  total = None
  for y1, y2, x1, x2 in windows:
    logits = _call_padded(logits_fn, images[:, y1:y2, x1:x2], min_hw, num_classes)
    if total is None:
      total = jnp.zeros((b, h, w, logits.shape[-1]), jnp.float32)
    total = _accumulate(total, logits, y1, x1)
  count = jnp.asarray(slide_count((h, w), crop, stride), jnp.float32)
  return _divide(total, count)


def infer_logits(
    logits_fn: LogitsFn, images: jax.Array, *, mode: str = 'whole',
    crop_size: int | Sequence[int] | None = None, stride: int | Sequence[int] | None = None,
    num_classes: int | None = None, min_size: int | Sequence[int] = 0, pad_to_crop: bool = False,
) -> jax.Array:
  """Logits at the input size by `mode` ('whole' or 'slide'); `[B, h, w, K]`."""
  if mode == 'whole':
    return whole_inference(logits_fn, images, num_classes=num_classes, min_size=min_size)
  if mode == 'slide':
    if crop_size is None or stride is None:
      raise ValueError("mode 'slide' needs crop_size and stride")
    return slide_inference(
        logits_fn, images, crop_size, stride, num_classes, pad_to_crop=pad_to_crop,
        min_size=min_size)
  raise ValueError(f'unknown inference mode {mode!r}; expected one of {MODES}')


@functools.partial(jax.jit, static_argnames=('size',))
def resize_logits(logits: jax.Array, size: tuple[int, int]) -> jax.Array:
  """float32 logits `[B, h, w, K]` resized to `size` as mmseg's `resize(..., 'bilinear',
  align_corners=False)`: half-pixel centres, no antialiasing."""
  return resize_bilinear(logits.astype(jnp.float32), size)


@functools.partial(jax.jit, static_argnames=('size',))
def _resize_softmax(logits: jax.Array, size: tuple[int, int]) -> jax.Array:
  return jax.nn.softmax(resize_bilinear(logits.astype(jnp.float32), size), axis=-1)


@functools.partial(jax.jit, static_argnames=('size',))
def _resize_argmax(logits: jax.Array, size: tuple[int, int]) -> jax.Array:
  return jnp.argmax(resize_bilinear(logits.astype(jnp.float32), size), axis=-1).astype(jnp.int32)


def _output_size(output_size: Sequence[int] | None, images: jax.Array) -> tuple[int, int]:
  if output_size is None:
    return int(images.shape[-3]), int(images.shape[-2])
  return _pair(output_size, 'output_size')


def _predictor(resize: Callable[[jax.Array, tuple[int, int]], jax.Array], doc: str):
  def predict(logits_fn: LogitsFn, images: jax.Array, output_size: Sequence[int] | None = None,
              **infer_kwargs: Any) -> jax.Array:
    batch, single = _as_batch(images)
    size = _output_size(output_size, batch)
    out = resize(infer_logits(logits_fn, batch, **infer_kwargs), size)
    return out[0] if single else out

  predict.__doc__ = doc
  return predict


predict_logits = _predictor(resize_logits, """float32 `infer_logits` of normalized images
  `[B, h, w, C]` (or one `[h, w, C]`) resized to `output_size` (the label's original size;
  None keeps it): `[B, H, W, K]` or `[H, W, K]`.""")
predict_probs = _predictor(_resize_softmax, 'Softmax of `predict_logits` (mmseg `inference`).')
predict_labels = _predictor(_resize_argmax, 'int32 argmax of `predict_logits`: `[B, H, W]` or '
                            '`[H, W]`.')


# ------------------------------------------------------------- test-time augmentation


def scaled_size(
    size: Sequence[int], ratio: float, test_scale: Sequence[int] | None = None) -> tuple[int, int]:
  """`(h, w)` input size of TTA ratio `ratio` for an image of original `size`.

  With a `(long, short)` test scale as mmseg 0.x `MultiScaleFlipAug` (the protocol of
  published multi-scale results): keep-ratio rescale into `(int(long * ratio),
  int(short * ratio))`; without, as mmseg 1.x `Resize(scale_factor=ratio)`.
  """
  if test_scale is not None:
    return rescale_size(size, (int(test_scale[0] * ratio), int(test_scale[1] * ratio)))
  return scale_size(size, ratio)


def aug_inference(
    logits_fn: LogitsFn, image: np.ndarray, *, scales: Sequence[float] = (1.0,), flip: bool = False,
    output_size: Sequence[int] | None = None, test_scale: Sequence[int] | None = None,
    mean: Sequence[float] | None = IMAGENET_MEAN, std: Sequence[float] | None = IMAGENET_STD,
    **infer_kwargs: Any) -> jax.Array:
  """Multi-scale and flip test-time augmentation: float32 softmax probabilities averaged.

  Each ratio of `scales` resizes the original image to `scaled_size(...)` (OpenCV bilinear,
  as mmseg's pipeline), normalizes it with `mean`/`std` (None: `image` is normalized) and
  infers it, with `flip` also mirrored; each result is resized to `output_size` (None: the
  original) and softmaxed. With `scales=(1.0,)`, no flip and the dataset's test scale this
  is the single-scale evaluation pipeline.
  `image`: `[H, W, 3]` or a batch `[B, H, W, 3]` of one size, RGB 0-255; returns
  `[H_out, W_out, K]` (`[B, H_out, W_out, K]`).
  """
  image = np.asarray(image)
  single = image.ndim == 3
  batch = image[None] if single else image
  if batch.ndim != 4:
    raise ValueError(f'expected an image [H, W, C] or a batch [B, H, W, C], got {image.shape}')
  if not scales:
    raise ValueError('scales must hold at least one ratio')
  size = batch.shape[1:3]
  out_size = _pair(output_size, 'output_size') if output_size is not None else tuple(size)
  total, count = None, 0
  for ratio in scales:
    if ratio <= 0:
      raise ValueError(f'scale ratios must be positive, got {ratio}')
    resized = np.stack([resize_image(x, scaled_size(size, ratio, test_scale)) for x in batch])
    if mean is not None:
      resized = normalize(resized, mean, std if std is not None else (1.0, 1.0, 1.0))
    for flipped in (False, True) if flip else (False,):
      x = jnp.asarray(resized[:, :, ::-1] if flipped else resized)
      logits = infer_logits(logits_fn, x, **infer_kwargs)
      if flipped:
        logits = jnp.flip(logits, axis=2)
      probs = _resize_softmax(logits, out_size)
      total = probs if total is None else total + probs
      count += 1
  probs = total / count
  return probs[0] if single else probs


@jax.jit
def _argmax(probs: jax.Array) -> jax.Array:
  return jnp.argmax(probs, axis=-1).astype(jnp.int32)


def segment_image(logits_fn: LogitsFn, image: np.ndarray, *, scales: Sequence[float] = (1.0,),
                  flip: bool = False, output_size: Sequence[int] | None = None,
                  **kwargs: Any) -> np.ndarray:
  """mmseg's whole test pipeline from one original `[H, W, 3]` image to int32 class indices
  `[H_out, W_out]`: `aug_inference`'s arguments; single scale without flip skips the
  softmax (`predict_labels` on the test-resized image)."""
  image = np.asarray(image)
  if image.ndim != 3:
    raise ValueError(f'expected one image [H, W, C], got shape {image.shape}')
  out_size = tuple(image.shape[:2]) if output_size is None else _pair(output_size, 'output_size')
  if tuple(scales) != (1.0,) or flip:
    probs = aug_inference(logits_fn, image, scales=scales, flip=flip, output_size=out_size,
                          **kwargs)
    return np.asarray(_argmax(probs))
  test_scale = kwargs.pop('test_scale', None)
  mean, std = kwargs.pop('mean', IMAGENET_MEAN), kwargs.pop('std', IMAGENET_STD)
  x = resize_image(image, scaled_size(image.shape[:2], 1.0, test_scale))
  if mean is not None:
    x = normalize(x, mean, std if std is not None else (1.0, 1.0, 1.0))
  return np.asarray(predict_labels(logits_fn, x, out_size, **kwargs))


# ------------------------------------------------------------- padded eval batches


def flatten_shards(batch: Mapping[str, Any]) -> dict:
  """`[num_shards, b, ...]` arrays (pmap layout) -> `[num_shards * b, ...]`."""
  batch = dict(batch)
  if np.ndim(batch['inputs']) == 5:
    batch = {k: np.reshape(v, (-1,) + np.shape(v)[2:]) for k, v in batch.items()}
  return batch


def batch_logit_groups(
    logits_fn: LogitsFn, batch: Mapping[str, Any], *, exact: bool = True, **infer_kwargs: Any,
) -> Iterator[tuple[np.ndarray, jax.Array, tuple[int, int]]]:
  """`(rows [g], logits [g, h, w, K], (label_h, label_w))` per size group of the valid
  examples of an `EvalLoader` batch (`inputs [B, Hp, Wp, 3]`, `input_size`, `label_size`,
  `batch_mask`; without them the whole arrays are valid).

  With `exact` padding never reaches the model: each `(input_size, label_size)` group is
  cropped to its size and inferred alone, as mmseg tests unpadded images. `exact=False`
  infers the padded batch once (a model with global context then sees the padding).
  """
  batch = flatten_shards(batch)
  inputs = batch['inputs']
  n, hp, wp = np.shape(inputs)[:3]
  input_size = np.asarray(batch.get('input_size', np.tile([hp, wp], (n, 1))))
  if 'label_size' in batch:
    label_size = np.asarray(batch['label_size'])
  elif 'label' in batch:
    label_size = np.tile(np.shape(batch['label'])[1:3], (n, 1))
  else:
    label_size = input_size
  mask = np.asarray(batch.get('batch_mask', np.ones(n)))
  groups: dict[tuple[int, int, int, int], list[int]] = {}
  for i in np.flatnonzero(mask > 0):
    key = (*(int(s) for s in input_size[i]), *(int(s) for s in label_size[i]))
    groups.setdefault(key, []).append(int(i))
  if not exact and groups:
    all_logits = infer_logits(logits_fn, inputs, **infer_kwargs)
  for (h, w, lh, lw), rows in groups.items():
    idx = np.asarray(rows)
    if exact:
      logits = infer_logits(logits_fn, np.asarray(inputs)[idx, :h, :w], **infer_kwargs)
    else:
      logits = all_logits[idx, :h, :w]
    yield idx, logits, (lh, lw)


def predict_batch(
    logits_fn: LogitsFn, batch: Mapping[str, Any], *, exact: bool = True, **infer_kwargs: Any,
) -> list[np.ndarray | None]:
  """int32 `[label_h, label_w]` label maps of an eval batch (`batch_logit_groups`), one per
  row; None for padding rows."""
  n = np.shape(flatten_shards(batch)['inputs'])[0]
  out: list[np.ndarray | None] = [None] * n
  for idx, logits, size in batch_logit_groups(logits_fn, batch, exact=exact, **infer_kwargs):
    labels = np.asarray(_resize_argmax(logits, size))
    for row, pred in zip(idx, labels, strict=True):
      out[row] = pred
  return out


# ------------------------------------------------------------------- evaluation


@functools.partial(jax.jit, static_argnames=('size', 'num_classes', 'ignore_index'))
def _score(logits, labels, *, size, num_classes, ignore_index):
  """Confusion matrix of logits `[g, h, w, K]` resized to `size` against labels `[g, *size]`."""
  pred = jnp.argmax(resize_bilinear(logits.astype(jnp.float32), size), axis=-1)
  return metrics.confusion_matrix_jax(labels, pred, num_classes, ignore_index=ignore_index)


def evaluate_dataset(
    logits_fn: LogitsFn, batches: Iterable[Mapping[str, Any]], num_classes: int, *,
    mode: str = 'whole', crop_size: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None, ignore_index: int = metrics.IGNORE_INDEX,
    exact: bool = True, min_size: int | Sequence[int] = 0, pad_to_crop: bool = False,
    num_batches: int | None = None, progress: bool = False) -> np.ndarray:
  """int64 `[K, K]` confusion matrix (rows ground truth) at the original label resolution.

  Each example's valid logits are resized to its label size (bilinear, half-pixel
  centres), argmaxed and counted; padding rows, padded label pixels (255) and
  `ignore_index` are left out. With several processes, sum their matrices.

  `batches` is an `EvalLoader` (one pass) or any iterable of batches with `inputs` and
  `label`; `num_batches` stops an endless iterator.
  """
  if hasattr(batches, 'iterate') and hasattr(batches, 'num_batches'):  # an EvalLoader
    total = batches.num_batches if num_batches is None else min(num_batches, batches.num_batches)
    batches = batches.iterate()
  else:
    total = num_batches if num_batches is not None else _len_or_none(batches)
  infer_kwargs = dict(
      mode=mode, crop_size=crop_size, stride=stride, num_classes=num_classes,
      min_size=min_size, pad_to_crop=pad_to_crop)
  if num_batches is not None:  # islice: an endless iterator loses no batch past the last
    batches = itertools.islice(batches, num_batches)
  cm = np.zeros((num_classes, num_classes), np.int64)
  for batch in Progress(total, 'evaluate', 'batch', enabled=progress).wrap(batches):
    batch = flatten_shards(batch)
    labels = np.asarray(batch['label'])
    groups = batch_logit_groups(logits_fn, batch, exact=exact, **infer_kwargs)
    for idx, logits, (lh, lw) in groups:
      counts = _score(
          logits, labels[idx, :lh, :lw], size=(lh, lw), num_classes=num_classes,
          ignore_index=ignore_index)
      cm += np.asarray(counts, np.int64)
  return cm


def _len_or_none(x: Any) -> int | None:
  try:
    return len(x)
  except TypeError:
    return None
