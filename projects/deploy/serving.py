"""What `cvt-export` serializes: the model a user serves, as `apply(variables, images) -> dict`.

Segmentation and detection take uint8 RGB images `[B, H, W, 3]` and normalise them inside
(ImageNet mean and std on the 0-255 scale, as `predict`); the backbone takes normalized
float32 images. Every function is written for symbolic `B, H, W` (`jax.export`), and at the
size it is given equals what the projects' tools compute for an image already at that size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cvt_backbone.cvt import MIN_INPUT_SIZE
from projects.training import image_ops

# mmdet's `pad_size_divisor`: the detector's inputs are padded (bottom/right, zeros after
# normalisation) to multiples of it, as `predict`'s canvases are.
DETECTION_SIZE_DIVISOR = 32


@dataclasses.dataclass(frozen=True)
class Servable:
  """`apply(variables, images)` -> `{output name: array}` and what `PATH.json` says of it."""

  kind: str  # 'segmentation', 'detection' or 'backbone'
  apply: Callable[[Any, jax.Array], dict[str, jax.Array]]
  variables: Any
  input_dtype: str  # 'uint8' or 'float32'
  outputs: Mapping[str, str]  # name -> '[B, H, W] int32: ...'
  metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def normalized_inside(self) -> bool:
    return self.input_dtype == 'uint8'

  def bound(self) -> Callable[[jax.Array], dict[str, jax.Array]]:
    """`images -> outputs` with the variables as constants (StableHLO, ONNX)."""
    return lambda images: self.apply(self.variables, images)


def normalize(images: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
  """uint8 `[B, H, W, 3]` -> `image_ops.normalize` (traced: it is array arithmetic) in `dtype`."""
  return image_ops.normalize(images).astype(dtype)


def segmentation(flax_model: Any, variables: Any, *, logits: bool = False,
                 metadata: Mapping[str, Any] | None = None) -> Servable:
  """Class map `classes [B, H, W]` int32 (and float32 `logits [B, H, W, K]`) at the input
  size: `inference.predict_labels` of whole-image inference."""

  def apply(v, images):
    out = flax_model.apply(v, normalize(images), train=False)
    scores = (out['logits'] if isinstance(out, Mapping) else out).astype(jnp.float32)
    result = {'classes': jnp.argmax(scores, axis=-1).astype(jnp.int32)}
    if logits:
      result['logits'] = scores
    return result

  outputs = {'classes': '[B, H, W] int32: the class of each pixel'}
  if logits:
    outputs['logits'] = '[B, H, W, K] float32: the logits (before softmax) of each pixel'
  return Servable('segmentation', apply, variables, 'uint8', outputs, metadata or {})


def detection(model: Any, variables: Any, *, dtype: Any = jnp.float32,
              metadata: Mapping[str, Any] | None = None) -> Servable:
  """`DetectionModel.detect` (NMS inside) of images padded to `DETECTION_SIZE_DIVISOR`, boxes
  in input pixels clipped to the image: `boxes [B, K, 4]`, `scores [B, K]`, `classes [B, K]`
  (valid first, by decreasing score), `num_detections [B]`."""
  d = DETECTION_SIZE_DIVISOR

  def apply(v, images):
    b, h, w, _ = images.shape
    ph, pw = (h + d - 1) // d * d, (w + d - 1) // d * d
    x = jnp.pad(normalize(images, dtype), ((0, 0), (0, ph - h), (0, pw - w), (0, 0)))
    outputs = model.flax_model.apply(v, x, train=False)
    size = jnp.broadcast_to(jnp.stack([jnp.asarray(h), jnp.asarray(w)]).astype(jnp.float32),
                            (b, 2))
    found = model.detect(outputs, (ph, pw), size, jnp.ones((b, 2), jnp.float32))
    return {'boxes': found['boxes'], 'scores': found['scores'],
            'classes': found['classes'].astype(jnp.int32),
            'num_detections': jnp.sum(found['valid'], axis=1).astype(jnp.int32)}

  outputs = {
      'boxes': '[B, K, 4] float32: x1, y1, x2, y2 in input pixels (zeros past num_detections)',
      'scores': '[B, K] float32: decreasing (zeros past num_detections)',
      'classes': '[B, K] int32: contiguous class indices (-1 past num_detections)',
      'num_detections': '[B] int32: how many of the K entries are detections'}
  return Servable('detection', apply, variables, 'uint8', outputs, metadata or {})


def backbone(model: Any, variables: Any, metadata: Mapping[str, Any] | None = None) -> Servable:
  """The stage maps `{stage name: [B, h_s, w_s, C_s]}` of normalized float32 images."""
  shapes = jax.eval_shape(lambda x: model.apply(variables, x),
                          jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  outputs = {k: f'[B, h, w, {v.shape[3]}] float32, stride {64 // v.shape[1]} (h about H / '
                f'{64 // v.shape[1]})' for k, v in shapes.items()}
  return Servable('backbone', lambda v, x: dict(model.apply(v, x)), variables, 'float32',
                  outputs, metadata or {})


def input_spec(servable: Servable, static: tuple[int | None, int, int] | None = None
               ) -> jax.ShapeDtypeStruct:
  """`[B, H, W, 3]` of the servable's dtype: symbolic `b, h, w` (h, w >= the CvT minimum), or
  `static` `(batch or None, h, w)` (a None batch stays symbolic)."""
  if static is None:
    b, h, w = jax.export.symbolic_shape(
        'b, h, w', constraints=(f'h >= {MIN_INPUT_SIZE}', f'w >= {MIN_INPUT_SIZE}'))
  else:
    batch, h, w = static
    b = jax.export.symbolic_shape('b')[0] if batch is None else batch
  return jax.ShapeDtypeStruct((b, h, w, 3), np.dtype(servable.input_dtype))
