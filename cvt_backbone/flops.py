"""Analytic forward FLOPs of CvT, counted from the architecture and the input size.

XLA's cost analysis (`jax.jit(f).lower(...).compile().cost_analysis()['flops']`)
counts the body of a `lax.map`, `lax.scan` or `while` loop once, whatever its trip
count. CvT's attention runs in such loops: the query and key blocks of 'chunked'
attention, and on CPU one loop step per (image, head) pair even for 'plain'. So XLA
undercounts it: CvT-13 at 1024x1024 182 vs 611 GFLOP, at 2048x2048 683 vs 7,754, and
even at 224x224 batch 8 (plain attention) 66 vs 73. These functions count the work
itself, so a FLOP rate derived from them means the same at every size and for every
attention implementation.

What is counted, with one multiply-add = 2 FLOPs (XLA's convention):
- 'patch_embed': the strided conv token embedding, `2 * k*k*C_in * C_out` per output
  position, output sizes exactly as the model pads (`CvTSpec.output_sizes`);
- 'conv_proj': the depthwise convolutions of q, k and v (`2 * k*k` per output
  element; k and v at `stride_kv`), plus their BatchNorm folded into one
  multiply-add per element (inference);
- 'qkv': the q, k and v Linear layers, `2 * D * D` per token (cls token included);
- 'attention': logits `2 * Tq * Tk * D` and weighted sum `2 * Tq * Tk * D` (D the
  stage width, all heads; Tq, Tk with the cls token where a stage has one: the last);
- 'attn_out': the output Linear, `2 * D * D` per query;
- 'mlp': fc1 and fc2, `2 * 2 * D * hidden` per token;
- 'head' (classifier only): `2 * D * num_classes` for the cls token.

Not counted: LayerNorms, Linear and conv biases, softmax, activations, residual
additions, reshapes. XLA's count includes this elementwise work, so on a program
without loops (on CPU: `attention='fused'`, or 'plain' with one image and one head)
it is never below this count and a little above it, measured in
tests/cvt_backbone/test_flops.py: 0.6-1.0% for CvT-13 and CvT-21, 3% for a spec with
narrow MLPs and stride-1 keys, 4-10% for `cvt-tiny`, whose widths of 16-48 make its
matrix products small next to the elementwise work. The tests also check every
product op by op, exactly, against the dots and convolutions the model traces.
"""

from __future__ import annotations

import numbers

import numpy as np

from cvt_backbone.cvt import CvTSpec

# The per-op keys of `stage_flops`, in the order of the forward pass.
OPS = ('patch_embed', 'conv_proj', 'qkv', 'attention', 'attn_out', 'mlp')


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _conv_out(n: int, kernel: int, stride: int, padding: int) -> int:
  return (n + 2 * padding - kernel) // stride + 1


def stage_flops(spec: CvTSpec, height: int, width: int, batch: int = 1,
                in_chans: int = 3) -> dict[str, dict[str, int]]:
  """Forward FLOPs of each stage of a CvT backbone, per op.

  Args:
    spec: the architecture (`get_spec(name)`, `CvTBackbone(...).resolved_spec` or
      `CvT(...).resolved_spec`).
    height: input height in pixels.
    width: input width in pixels.
    batch: images per batch; every count is proportional to it.
    in_chans: channels of the input images.

  Returns:
    `{'stage1': {'patch_embed': ..., 'conv_proj': ..., 'qkv': ..., 'attention': ...,
    'attn_out': ..., 'mlp': ...}, 'stage2': ..., ...}` in FLOPs (a multiply-add is 2),
    for the whole batch. See the module docstring for what each op holds.

  Raises:
    ValueError: a batch or channel count below 1, or an input too small for a stage.
  """
  for name, value in (('batch', batch), ('in_chans', in_chans)):
    if not (_is_int(value) and value >= 1):
      raise ValueError(f'{name} must be an integer >= 1; got {value!r}.')
  batch, channels = int(batch), int(in_chans)
  sizes = spec.output_sizes(height, width)  # Checks the sizes.
  stages = {}
  for i, (h, w) in enumerate(sizes):
    dim, kernel = spec.embed_dims[i], spec.kernel_qkv[i]
    hidden = int(dim * spec.mlp_ratios[i])  # As `Block` sizes fc1.
    cls = 1 if spec.cls_token[i] else 0
    # The conv projections pad kernel // 2 on every side (`ConvProjection`).
    q_grid, kv_grid = (
        _conv_out(h, kernel, s, kernel // 2) * _conv_out(w, kernel, s, kernel // 2)
        for s in (spec.stride_q[i], spec.stride_kv[i]))
    # The cls token skips the conv projections and joins q, k and v in front.
    tokens_q, tokens_kv = q_grid + cls, kv_grid + cls
    tokens = h * w + cls
    per_image = {
        'patch_embed': 2 * h * w * dim * spec.patch_sizes[i]**2 * channels,
        # k*k multiply-adds per output element, then the BatchNorm's one.
        'conv_proj': 2 * (kernel**2 + 1) * dim * (q_grid + 2 * kv_grid),
        'qkv': 2 * dim * dim * (tokens_q + 2 * tokens_kv),
        'attention': 2 * 2 * tokens_q * tokens_kv * dim,
        'attn_out': 2 * tokens_q * dim * dim,
        'mlp': 2 * 2 * tokens * dim * hidden,
    }
    # The embedding runs once per stage, every other op once per block.
    stages[f'stage{i + 1}'] = {
        op: batch * per_image[op] * (1 if op == 'patch_embed' else spec.depths[i]) for op in OPS}
    channels = dim
  return stages


def cvt_flops(spec: CvTSpec, height: int, width: int, batch: int = 1, *,
              num_classes: int = 0, in_chans: int = 3) -> dict[str, int]:
  """Total forward FLOPs of a CvT backbone or classifier, with a per-op breakdown.

  Args:
    spec: the architecture (`get_spec(name)` or a model's `resolved_spec`).
    height: input height in pixels.
    width: input width in pixels.
    batch: images per batch; every count is proportional to it.
    num_classes: classes of the `CvT` classifier head; 0 for `CvTBackbone`.
    in_chans: channels of the input images.

  Returns:
    A dict of FLOPs for the whole batch: one entry per op of `OPS` summed over the
    stages, 'head' (0 without a classifier), and 'total'. Per-stage counts:
    `stage_flops`.

  Raises:
    ValueError: a batch, channel or class count out of range, or an input too
      small for a stage.
  """
  if not (_is_int(num_classes) and num_classes >= 0):
    raise ValueError(f'num_classes must be an integer >= 0; got {num_classes!r}.')
  stages = stage_flops(spec, height, width, batch, in_chans)
  out = {op: sum(stage[op] for stage in stages.values()) for op in OPS}
  out['head'] = 2 * int(batch) * spec.embed_dims[-1] * num_classes
  out['total'] = sum(out.values())
  return out
