"""ONNX export through `jax2onnx`, with symbolic batch, height and width.

`to_onnx` traces the function once and returns the serialized ModelProto; `onnxruntime` then
runs it at any size the symbolic dimensions allow. Where jax2onnx 0.17 goes wrong (symbolic
sizes, functions it replaces while tracing), its plugins are corrected here, for the rest of
the process, rather than the models rewritten.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from unittest import mock

import jax
import numpy as np
from jax._src.export import shape_poly


def _subgraphs(graph):
  for node in graph.node:
    for attr in node.attribute:
      yield from ([attr.g] if attr.HasField('g') else attr.graphs)


def _names_used(graph) -> set[str]:
  """Names read by the nodes of `graph` and of its loop bodies, and its outputs."""
  used = {value.name for value in graph.output}
  for node in graph.node:
    used.update(node.input)
  for sub in _subgraphs(graph):
    used |= _names_used(sub)
  return used


def _drop_unused_initializers(graph) -> None:
  """jax2onnx leaves constants no node reads in loop bodies; onnxruntime warns of each."""
  used = _names_used(graph)
  kept = [init for init in graph.initializer if init.name in used]
  if len(kept) < len(graph.initializer):
    del graph.initializer[:]
    graph.initializer.extend(kept)
  for sub in _subgraphs(graph):
    _drop_unused_initializers(sub)


def _fix_symbolic_pad() -> None:
  """jax2onnx's `lax.pad` takes neither symbolic pads (chunked attention's) nor symbolic
  shapes: the pads go in as a tensor."""
  from jax2onnx.plugins._ir_shapes import _ensure_value_metadata, _stamp_type_and_shape
  from jax2onnx.plugins.jax.lax import _index_utils, pad

  plugin = pad.PadPlugin
  if getattr(plugin, '_cvt_fixed', False):
    return
  interior_lower = plugin.lower  # Refuses interior padding, which ONNX's Pad lacks.

  def lower(self, ctx, eqn):
    config = eqn.params['padding_config']
    if any(interior for _, _, interior in config):
      return interior_lower(self, ctx, eqn)
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


def _fast_connected_check() -> None:
  """jax2onnx checks each equation's outputs against every node's outputs (quadratic: 90% of
  the tiny backbone's conversion); a value made by a node of the graph is connected at once."""
  from jax2onnx.converter import output_binding

  slow = output_binding._value_is_graph_connected  # noqa: SLF001
  if getattr(slow, '_cvt_fixed', False):
    return

  def connected(ctx, value) -> bool:
    node = value.producer()
    return (node is not None and node.graph is ctx.builder.nodes) or slow(ctx, value)

  connected._cvt_fixed = True
  output_binding._value_is_graph_connected = connected  # noqa: SLF001


def _small_constant_broadcasts() -> None:
  """jax2onnx stores a broadcast constant at its full size: 4 MB for each attention block's
  `[1024, 1024]` key-block mask; large ones stay broadcasts (ONNX Expand)."""
  from jax2onnx.plugins.jax.lax import broadcast_in_dim

  inline = broadcast_in_dim._maybe_inline_constant_broadcast  # noqa: SLF001
  if getattr(inline, '_cvt_fixed', False):
    return

  def small_inline(ctx, out_var, x_val, shape, bdims, op_shape) -> bool:
    return (all(isinstance(d, int) for d in shape) and math.prod(shape) <= 4096
            and inline(ctx, out_var, x_val, shape, bdims, op_shape))

  small_inline._cvt_fixed = True
  broadcast_in_dim._maybe_inline_constant_broadcast = small_inline  # noqa: SLF001


def _keep_jax_functions() -> None:
  """jax2onnx swaps `jax.numpy` and `jax.lax` functions for ops of its own while tracing, and
  some are wrong: `jnp.concatenate` keeps the first operand's symbolic axis size (`[b, 1, C]`
  and `[b, h*w, C]` give `[b, 1, C]`: CvT's tokens without the cls token are empty),
  `jnp.shape` returns a traced array (Python checks of shapes fail), `lax.fori_loop` and
  `jnp.clip` go wrong under `vmap` (the detector's NMS per image). The originals lower to
  `lax` primitives, which it converts."""
  from jax2onnx.plugins import _patching, plugin_system

  plugin_system.import_all_plugins()
  for plugin in {type(p) for p in plugin_system.PLUGIN_REGISTRY.values()}:
    if not issubclass(plugin, plugin_system.PrimitiveLeafPlugin) or '_cvt_kept' in vars(plugin):
      continue
    specs = plugin.binding_specs

    def kept(cls, specs=specs):
      return [s for s in specs() if not (isinstance(s, _patching.MonkeyPatchSpec) and
                                         str(s.target) in ('jax.numpy', 'jax.lax'))]

    plugin.binding_specs = classmethod(kept)
    plugin._cvt_kept = True


def _fix_batch_norm_fallback() -> None:
  """jax2onnx's `flax.linen.BatchNorm` falls back to flax's own call (at init, as the detector's
  `level_shapes` does for symbolic sizes) passing `use_running_average` again, which flax refuses
  when the module was built with it."""
  from jax2onnx.plugins.flax.linen.batch_norm import BatchNormPlugin

  make = BatchNormPlugin._make_patch  # noqa: SLF001
  if getattr(make, '_cvt_fixed', False):
    return

  def make_patch(orig_fn):
    def orig(self, x, use_running_average=None, *, mask=None):
      if self.use_running_average is not None:
        use_running_average = None  # Merged from the module's own setting already.
      return orig_fn(self, x, use_running_average=use_running_average, mask=mask)
    return make(orig)

  make_patch._cvt_fixed = True
  BatchNormPlugin._make_patch = staticmethod(make_patch)  # noqa: SLF001


def _symbolic_ir_shapes() -> None:
  """A few jax2onnx plugins (`lax.rem`, the integer `%` of the detector's top-k under `vmap`)
  build `ir.Shape`s of symbolic sizes directly, which calls `int` on them: the dims go in as
  jax2onnx's symbolic labels."""
  import types

  import onnx_ir
  from jax2onnx.plugins._ir_shapes import _to_ir_dim_for_shape
  from jax2onnx.plugins.jax.lax import clamp, copy, rem, select

  def shape(dims, *args, **kwargs):
    return onnx_ir.Shape([_to_ir_dim_for_shape(d) for d in dims], *args, **kwargs)

  for module in (clamp, copy, rem, select):
    if module.ir is onnx_ir:
      module.ir = types.SimpleNamespace(**{**vars(onnx_ir), 'Shape': shape})


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

  _fix_symbolic_pad()
  _fast_connected_check()
  _keep_jax_functions()
  _small_constant_broadcasts()
  _fix_batch_norm_fallback()
  _symbolic_ir_shapes()
  names = []  # In fn's order: a traced dict comes back with sorted keys.
  jax.eval_shape(lambda x: names.extend(fn(x)), spec)
  # jax2onnx deep-copies gathers' sizes; a deep copy of a symbolic size copies its scope, which
  # fails once the scope has cached bounds (and would not compare with the original's sizes).
  serde = logging.getLogger('onnx_ir.serde')
  level = serde.level
  serde.setLevel(logging.ERROR)  # A warning per constant shape of unknown type: hundreds.
  try:
    with mock.patch.object(shape_poly._DimExpr, '__deepcopy__', lambda self, memo: self):  # noqa: SLF001
      model = jax2onnx.to_onnx(lambda x: tuple(fn(x)[k] for k in names), [spec],
                               input_names=[input_name], output_names=names)
  finally:
    serde.setLevel(level)
  _drop_unused_initializers(model.graph)
  # jax2onnx stamps intermediate shapes that are wrong for symbolic sizes (onnxruntime then
  # re-uses buffers of the wrong size); onnxruntime infers them itself.
  del model.graph.value_info[:]
  for value in model.graph.output:
    for dim in value.type.tensor_type.shape.dim:
      if dim.HasField('dim_param'):
        dim.ClearField('dim_param')
  return model.SerializeToString()

