"""ONNX export through `jax2onnx`, with symbolic batch, height and width.

`to_onnx` traces the function once and returns the serialized ModelProto; `onnxruntime` then
runs it at any size the symbolic dimensions allow. Where jax2onnx 0.17 gets symbolic sizes
wrong, the conversion is corrected here rather than in the models.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import numpy as np

from cvt_backbone.tools import is_int


def _fix_symbolic_concatenate() -> None:
  """jax2onnx's `jnp.concatenate` keeps only the first operand's symbolic axis size.

  (`[b, 1, C]` and `[b, h*w, C]` give `[b, 1, C]`, so a later slice of the cls token off is
  empty); the sum of the sizes is right for ints and `jax.export` dimensions alike.
  """
  from jax2onnx.plugins.jax.numpy import concatenate

  plugin = concatenate.JnpConcatenatePlugin
  if getattr(plugin, '_cvt_fixed', False):
    return
  wrong = plugin.abstract_eval

  def abstract_eval(*arrays, dimension: int = 0, axis: int | None = None):
    out = wrong(*arrays, dimension=dimension, axis=axis)
    axis_ = (dimension if axis is None else axis) % len(out.shape)
    shape = list(out.shape)
    shape[axis_] = sum(a.shape[axis_] for a in arrays)
    return out.update(shape=tuple(shape))

  plugin.ensure_abstract_eval_bound()
  plugin._PRIM.def_abstract_eval(abstract_eval)  # noqa: SLF001
  plugin._cvt_fixed = True


def _fix_symbolic_pad() -> None:
  """jax2onnx's `lax.pad` takes only int pads: symbolic ones (chunked attention's) go in as a tensor."""
  from jax2onnx.plugins._ir_shapes import _ensure_value_metadata, _stamp_type_and_shape
  from jax2onnx.plugins.jax.lax import _index_utils, pad

  plugin = pad.PadPlugin
  if getattr(plugin, '_cvt_fixed', False):
    return
  int_lower = plugin.lower

  def lower(self, ctx, eqn):
    config = eqn.params['padding_config']
    if all(is_int(lo) and is_int(hi) and interior == 0 for lo, hi, interior in config):
      return int_lower(self, ctx, eqn)
    (data_var, value_var), (out_var,) = eqn.invars, eqn.outvars
    data = ctx.get_value_for_var(data_var, name_hint=ctx.fresh_name('pad_data'))
    value = ctx.get_value_for_var(value_var, name_hint=ctx.fresh_name('pad_cval'),
                                  prefer_np_dtype=np.dtype(data_var.aval.dtype))
    pads = _index_utils._lower_i64_vector(  # noqa: SLF001
        ctx, [lo for lo, _, _ in config] + [hi for _, hi, _ in config], 'pad_pads')
    out = ctx.builder.Pad(data, pads, value, mode='constant', _outputs=[ctx.fresh_name('Pad')])
    out.type = data.type
    _stamp_type_and_shape(out, tuple(out_var.aval.shape))
    _ensure_value_metadata(ctx, out)
    ctx.bind_value_for_var(out_var, out)

  plugin.lower = lower
  plugin._cvt_fixed = True


def to_onnx(fn: Callable[[jax.Array], Mapping[str, jax.Array]], spec: jax.ShapeDtypeStruct, *,
            input_name: str = 'images') -> bytes:
  """A serialized ONNX model of `fn(x) -> {name: array}`.

  Args:
    fn: a jax-traceable function of one array returning a dict of arrays.
    spec: the input's shape and dtype; dimensions may be `jax.export.symbolic_shape` ones.
    input_name: the ONNX input's name.

  Returns:
    The ModelProto's bytes: one input `input_name`, the outputs named by `fn`'s keys in order.
  """
  import jax2onnx

  _fix_symbolic_concatenate()
  _fix_symbolic_pad()
  names = list(jax.eval_shape(fn, spec))
  model = jax2onnx.to_onnx(lambda x: tuple(fn(x)[k] for k in names), [spec],
                           input_names=[input_name], output_names=names)
  # jax2onnx stamps intermediate shapes that are wrong for symbolic sizes (onnxruntime then
  # re-uses buffers of the wrong size); onnxruntime infers them itself.
  del model.graph.value_info[:]
  for value in model.graph.output:
    for dim in value.type.tensor_type.shape.dim:
      if dim.HasField('dim_param'):
        dim.ClearField('dim_param')
  return model.SerializeToString()

