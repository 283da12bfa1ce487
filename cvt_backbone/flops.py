"""Analytic forward FLOPs of CvT from its architecture and the input size (multiply-add = 2).

XLA's cost analysis counts a loop body once, and CvT's attention runs in loops (query and key
blocks; on CPU one step per (image, head)): CvT-13 at 1024x1024 it reports 182 of 611 GFLOP,
at 2048x2048 683 of 7,754. Counted: embedding convs, the q/k/v depthwise convs with their
BatchNorm as one multiply-add, the q/k/v, output and MLP Linears, both attention products
(cls token included) and the classifier head. Not counted: norms, biases, softmax,
activations, residuals; on loop-free programs XLA's count is 0.6-1.0% above this for
CvT-13/21 and 4-10% for cvt-tiny (tests/cvt_backbone/test_flops.py).
"""

from __future__ import annotations

from cvt_backbone.cvt import CvTSpec
from cvt_backbone.tools import is_int

# The per-op keys of `stage_flops`, in the order of the forward pass.
OPS = ('patch_embed', 'conv_proj', 'qkv', 'attention', 'attn_out', 'mlp')


def _conv_out(n: int, kernel: int, stride: int, padding: int) -> int:
  return (n + 2 * padding - kernel) // stride + 1


def stage_flops(spec: CvTSpec, height: int, width: int, batch: int = 1,
                in_chans: int = 3) -> dict[str, dict[str, int]]:
  """`{'stage1': {op: FLOPs for the batch, for each op of OPS}, ...}` of a CvT backbone."""
  for name, value in (('batch', batch), ('in_chans', in_chans)):
    if not (is_int(value) and value >= 1):
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
  """FLOPs of a CvT backbone (`num_classes` 0) or classifier for the batch: each op of `OPS`
  summed over the stages, 'head' and 'total'."""
  if not (is_int(num_classes) and num_classes >= 0):
    raise ValueError(f'num_classes must be an integer >= 0; got {num_classes!r}.')
  stages = stage_flops(spec, height, width, batch, in_chans)
  out = {op: sum(stage[op] for stage in stages.values()) for op in OPS}
  out['head'] = 2 * int(batch) * spec.embed_dims[-1] * num_classes
  out['total'] = sum(out.values())
  return out
