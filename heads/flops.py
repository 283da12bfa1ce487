"""Analytic forward FLOPs (multiply-add = 2) of any model of this package: a `CvTBackbone`, a
`Segmentor`, a `Detector`, or a lone neck or head on given feature shapes, for MFU.

The model runs on shapes only (`jax.eval_shape`: nothing is computed or allocated; 2 s for
CvT-13 + UPerNet at 2048x2048) with each `Conv`/`Dense` call intercepted and counted from its
output and kernel shapes, `2 * N * Ho * Wo * kh * kw * C_in / groups * C_out`. A CvT is
`cvt_backbone.cvt_flops` (attention included), not entered; any other layer with a kernel is
an error, never a silent undercount. Not counted, as `cvt_flops` leaves out norms: biases,
norms, activations, resizes and pools. XLA's cost analysis counts these and leaves out
multiply-adds with zero padding: on loop-free programs it is 1% below to 3.5% above this count
(cvt-tiny models with narrow heads at 128 px, tests/heads/test_flops.py), 3.7% above for
CvT-13 + UPerNet at 512x512 (mostly the 150-class logits resized to 512x512, by matmuls in
`jax.image.resize`). That model (150 classes, train mode with the FCN auxiliary head) is
427.8 GFLOP per 512x512 image forward: backbone 69.9, decode head 355.9 (232 of them the
fusion conv), auxiliary head 1.9.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cvt_backbone.cvt import CvT, CvTBackbone
from cvt_backbone.flops import cvt_flops, stage_flops
from heads import dense_conv

# Layers counted from their kernel `[..., C_in / groups, C_out]`: each output element takes
# `prod(kernel.shape[:-1])` multiply-adds.
COUNTED = (nn.Conv, nn.Dense, dense_conv.Conv)


def _shape_struct(shape: Any) -> jax.ShapeDtypeStruct:
  if hasattr(shape, 'shape'):
    return jax.ShapeDtypeStruct(tuple(shape.shape), getattr(shape, 'dtype', jnp.float32))
  return jax.ShapeDtypeStruct(tuple(int(n) for n in shape), jnp.float32)


def _part(root: nn.Module, path: Sequence[str], module: nn.Module) -> str:
  """The result key of a module: the root's attribute holding it ('backbone', 'neck',
  'decode_head', ...), 'backbone' for a lone backbone, 'head' for a lone head or neck."""
  if path and isinstance(getattr(root, path[0], None), nn.Module):
    return path[0]
  return 'backbone' if isinstance(module, (CvTBackbone, CvT)) else 'head'


def _count(module: nn.Module, inputs: Any, call_kwargs: dict[str, Any]) -> tuple[dict, int]:
  """`({part: FLOPs}, FLOPs of frozen backbone stages)` of one forward pass."""
  if isinstance(inputs, Mapping):
    inputs = {name: _shape_struct(shape) for name, shape in inputs.items()}
  else:
    inputs = _shape_struct(inputs)
  rngs = {'params': jax.random.key(0), 'dropout': jax.random.key(1)}
  # Variables from `init_with_output` (a subclass's `init` may read a checkpoint), counted on
  # `apply`: `init` also runs train-only modules (`Segmentor`'s auxiliary head).
  _, variables = jax.eval_shape(
      functools.partial(module.init_with_output, **call_kwargs), rngs, inputs)
  counts: dict[str, int] = {}
  frozen = [0]
  inside_backbone = [False]

  def add(part: str, flops: int) -> None:
    counts[part] = counts.get(part, 0) + int(flops)

  def interceptor(next_fun, args, kwargs, context):
    layer = context.module
    if inside_backbone[0] or context.method_name != '__call__':
      return next_fun(*args, **kwargs)
    if isinstance(layer, (CvTBackbone, CvT)):
      n, h, w, c = args[0].shape
      spec = layer.resolved_spec
      num_classes = layer.num_classes if isinstance(layer, CvT) else 0
      add(_part(module, layer.path, layer),
          cvt_flops(spec, h, w, n, num_classes=num_classes, in_chans=c)['total'])
      if getattr(layer, 'frozen_stages', 0):
        stages = list(stage_flops(spec, h, w, n, c).values())[:layer.frozen_stages]
        frozen[0] += sum(sum(stage.values()) for stage in stages)
      inside_backbone[0] = True
      try:
        return next_fun(*args, **kwargs)
      finally:
        inside_backbone[0] = False
    out = next_fun(*args, **kwargs)
    if isinstance(layer, COUNTED):
      kernel = layer.get_variable('params', 'kernel')
      add(_part(module, layer.path, layer),
          2 * math.prod(out.shape) * math.prod(kernel.shape[:-1]))
    elif layer.has_variable('params', 'kernel'):
      raise ValueError(
          f"model_flops counts CvT and the layers nn.Conv, nn.Dense and heads' dense_conv.Conv; "
          f"{type(layer).__name__} at {'/'.join(layer.path)} has a kernel it cannot count.")
    return out

  def forward(variables, inputs):
    with nn.intercept_methods(interceptor):
      return module.apply(variables, inputs, rngs={'dropout': jax.random.key(1)},
                          mutable=True, **call_kwargs)

  jax.eval_shape(forward, variables, inputs)
  return counts, frozen[0]


def model_flops(module: nn.Module, inputs: Any, **call_kwargs: Any) -> dict[str, int]:
  """Forward FLOPs of `module(inputs, **call_kwargs)` for the whole batch, by part.

  Args:
    module: an unbound model: `CvTBackbone`, `Segmentor`, `Detector` (or a subclass), or a
      lone head or neck.
    inputs: the images' shape `(N, H, W, C)`, or `{level: (N, H_i, W_i, C_i)}` feature shapes
      for a head or neck (arrays or `jax.ShapeDtypeStruct`s work too).
    **call_kwargs: passed to the call, e.g. `train=True`, which counts the train-only
      auxiliary head of a `Segmentor`.

  Returns:
    `{part: FLOPs, ..., 'total': sum}`, the parts named by the model's attributes
    ('backbone', 'neck', 'decode_head', 'auxiliary_head', 'head'); a lone backbone is
    'backbone', a lone head or neck 'head'.
  """
  counts, _ = _count(module, inputs, call_kwargs)
  return {**counts, 'total': sum(counts.values())}


def training_step_flops(module: nn.Module, inputs: Any, **call_kwargs: Any) -> int:
  """FLOPs of one training step: the train-mode forward and twice it for the backward pass
  (input and weight gradients; the usual MFU convention, PaLM appendix B), less the backward
  pass of the backbone's `frozen_stages`, which sit behind a `stop_gradient`."""
  counts, frozen = _count(module, inputs, {'train': True, **call_kwargs})
  return 3 * sum(counts.values()) - 2 * frozen
