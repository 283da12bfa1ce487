"""Which attention to run for an image size and a memory budget, and how much memory it takes.

Stage 1 of CvT attends globally: its `H/4 * W/4` queries each see all `H/8 * W/8` keys, so
a 1024x2048 image has 131,072 x 32,768 float32 logits (16 GiB per head). The budget bounds
that working memory: plain attention when it fits, else query chunks of the largest size
that fits. The other activations are estimated for the log only. XLA:CPU measured a little
above the estimate (CvT-13 at 1024x1024: 1.7 GiB peak RSS with a 512 MiB budget, 0.8 GiB
of it before extraction; plain attention 10.9 GiB, estimated 8.3 GiB).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

from cvt_backbone.cvt import CvTSpec, get_spec
from cvt_backbone.kernels import attention as attention_lib

DEFAULT_MEMORY_BUDGET_MB = 2048.0

# Below this many queries per chunk the automatic plan gives up rather than run a
# `lax.map` of tens of thousands of tiny matmuls (a 1024x2048 image has 131,072
# stage-1 queries). A forced `chunk_size` may go lower.
MIN_AUTO_CHUNK_SIZE = 64

# Logits-sized buffers alive during the softmax: the factor of
# `attention.chunk_size_for_budget` (tests check the two agree).
_SOFTMAX_BUFFERS = attention_lib.SOFTMAX_BUFFERS

# Besides attention, a stage-1 block holds about a dozen and a half buffers the size
# of the stage-1 map: its input, the norm, q, k, v, the attention output and its
# projection, the residual sums, and the 4x-wide MLP hidden layer before and after
# the activation (4 + 4).
_ACTIVATION_MAPS = 16


class MemoryBudgetError(ValueError):
  """The memory budget cannot hold the requested attention: the largest chunk it allows (0:
  not one query), the chunk the request needs (None: plain attention), the budget needed."""

  def __init__(self, message: str, *, allowed_chunk_size: int, needed_chunk_size: int | None,
               needed_budget_mb: float):
    super().__init__(message)
    self.allowed_chunk_size = allowed_chunk_size
    self.needed_chunk_size = needed_chunk_size
    self.needed_budget_mb = needed_budget_mb


@dataclasses.dataclass(frozen=True)
class StageAttention:
  """The attention of one stage at one input size: `q_len` queries over `kv_len` keys."""

  name: str
  heads: int
  grid: tuple[int, int]
  q_len: int
  kv_len: int

  def bytes_per_query(self, batch: int) -> int:
    """Working bytes of one query row for a batch: float32 logits and exponentials."""
    return _SOFTMAX_BUFFERS * attention_lib.logits_bytes(batch, self.heads, 1, self.kv_len)

  def working_bytes(self, batch: int, chunk_size: int | None = None) -> int:
    """Working bytes of the whole attention (`chunk_size` None) or of one query chunk."""
    rows = self.q_len if chunk_size is None else min(chunk_size, self.q_len)
    return rows * self.bytes_per_query(batch)


class AttentionPlan(NamedTuple):
  """`CvTBackbone.attention` and `attention_chunk_size` (None unless 'chunked'), and the
  estimated peak of attention plus the other activations (weights excluded)."""

  implementation: str
  chunk_size: int | None
  estimated_bytes: int


def _conv_out(n: int, kernel: int, stride: int, padding: int) -> int:
  return (n + 2 * padding - kernel) // stride + 1


def stage_attention(spec: CvTSpec, height: int, width: int) -> tuple[StageAttention, ...]:
  """The attention sizes of every stage for a `height` x `width` input: queries and keys of
  the 'dw_bn' projections (strides `stride_q`, `stride_kv`, padding `kernel // 2`), + cls."""
  out = []
  for i, (h, w) in enumerate(spec.output_sizes(height, width)):
    k, sq, skv = spec.kernel_qkv[i], spec.stride_q[i], spec.stride_kv[i]
    cls = int(spec.cls_token[i])
    q_len = _conv_out(h, k, sq, k // 2) * _conv_out(w, k, sq, k // 2) + cls
    kv_len = _conv_out(h, k, skv, k // 2) * _conv_out(w, k, skv, k // 2) + cls
    out.append(StageAttention(f'stage{i + 1}', spec.num_heads[i], (h, w), q_len, kv_len))
  return tuple(out)


def activation_bytes(spec: CvTSpec, height: int, width: int, batch: int) -> int:
  """Estimated float32 activations other than attention logits: the input and stage-1 buffers."""
  (h1, w1), *_ = spec.output_sizes(height, width)
  stage1_map = 4 * batch * h1 * w1 * spec.embed_dims[0]
  return 4 * batch * height * width * 3 + _ACTIVATION_MAPS * stage1_map


def format_bytes(n: float) -> str:
  """1536 -> '1.5 KiB'; binary units as the budget flag (MiB)."""
  for unit in ('B', 'KiB', 'MiB', 'GiB'):
    if abs(n) < 1024 or unit == 'GiB':
      return f'{n:,.0f} {unit}' if unit == 'B' else f'{n:,.1f} {unit}'
    n /= 1024
  raise AssertionError('unreachable')


def _mb_at_least(n_bytes: int) -> float:
  """The budget in MiB, rounded up to 0.1, that holds `n_bytes`."""
  return math.ceil(n_bytes / 2**20 * 10) / 10


def _either(options: list[str]) -> str:
  """['a', 'b', 'c'] -> 'A, b or c'."""
  text = options[-1] if len(options) == 1 else ', '.join(options[:-1]) + ' or ' + options[-1]
  return text[0].upper() + text[1:]


def _describe(stage: StageAttention, height: int, width: int, batch: int) -> str:
  heads = f'{stage.heads} head' + ('s' if stage.heads > 1 else '')
  return (f'{height}x{width} images in batches of {batch}: {stage.name} attention has '
          f'{stage.q_len:,} queries over {stage.kv_len:,} keys ({heads}), '
          f'{format_bytes(stage.bytes_per_query(batch))} per query')


def check_settings(budget_mb: float, implementation: str, chunk_size: int | None) -> None:
  """Raises ValueError for settings no image size can satisfy (checked before any work)."""
  if implementation not in attention_lib.IMPLEMENTATIONS:
    raise ValueError(f'Unknown attention implementation {implementation!r}; expected one of '
                     f'{attention_lib.IMPLEMENTATIONS}.')
  if not 0 < budget_mb < float('inf'):
    raise ValueError(f'The memory budget must be a positive number of MiB; got {budget_mb}.')
  if chunk_size is not None:
    if chunk_size < 1:
      raise ValueError(f'The chunk size must be at least 1 query; got {chunk_size}.')
    if implementation in ('plain', 'fused'):
      raise ValueError(f'A chunk size applies to chunked attention, not {implementation!r}.')


def plan_attention(
    height: int, width: int, batch: int, budget_mb: float, spec: CvTSpec | str, *,
    implementation: str = 'auto', chunk_size: int | None = None,
    min_chunk_size: int = MIN_AUTO_CHUNK_SIZE) -> AttentionPlan:
  """The attention implementation and query chunk for an input size under a memory budget.

  `budget_mb` is in MiB (2**20 bytes). `implementation` 'auto' is plain if it fits, else
  chunked; 'fused' counts as 'plain' (in float32 `jax.nn.dot_product_attention`
  materializes the logits too). A forced `chunk_size` implies 'chunked' and is checked.
  MemoryBudgetError names the chunk size the budget allows and the budget needed.
  """
  check_settings(budget_mb, implementation, chunk_size)
  if batch < 1:
    raise ValueError(f'The batch must be at least 1; got {batch}.')
  spec = get_spec(spec) if isinstance(spec, str) else spec
  budget = int(budget_mb * 2**20)
  stages = stage_attention(spec, height, width)
  largest = max(stages, key=lambda s: s.working_bytes(batch))
  # Stages whose whole attention fits do not limit the chunk; of the others, the one with
  # the costliest query row does (stage 1 for the released models).
  over = [s for s in stages if s.working_bytes(batch) > budget]
  binding = max(over, key=lambda s: s.bytes_per_query(batch)) if over else largest
  allowed = (budget // binding.bytes_per_query(batch) if over
             else max(s.q_len for s in stages))
  where = _describe(binding, height, width, batch)

  def error(message: str, needed_chunk: int | None, needed: int) -> MemoryBudgetError:
    return MemoryBudgetError(message, allowed_chunk_size=allowed, needed_chunk_size=needed_chunk,
                             needed_budget_mb=_mb_at_least(needed))

  if implementation == 'auto':
    implementation = 'plain' if chunk_size is None and not over else 'chunked'

  if implementation in ('plain', 'fused'):
    needed = largest.working_bytes(batch)
    if over:
      raise error(
          f'{implementation.capitalize()} attention needs {format_bytes(needed)}, over the '
          f'memory budget of {budget_mb:g} MiB, on {_describe(largest, height, width, batch)}. '
          f'Raise the budget to at least {_mb_at_least(needed):g} MiB, or use chunked '
          f'attention (the budget allows chunks of {allowed:,} queries).', None, needed)
  elif chunk_size is None:
    needed_chunk = min(min_chunk_size, binding.q_len)
    if allowed < needed_chunk:
      needed = binding.working_bytes(batch, needed_chunk)
      options = [f'raise the budget to at least {_mb_at_least(needed):g} MiB']
      if batch > 1:
        options.append('use smaller batches')
      if allowed:
        options.append(f'force a chunk size of {allowed:,}')
      raise error(
          f'A memory budget of {budget_mb:g} MiB is too small for {where}: the budget allows '
          f'chunks of {allowed:,} queries, and chunks of {needed_chunk:,} queries (the smallest '
          f'the automatic plan uses) need {format_bytes(needed)}. {_either(options)}.',
          needed_chunk, needed)
    chunk_size = allowed
  else:
    needed = max(s.working_bytes(batch, chunk_size) for s in stages)
    if needed > budget:
      instead = (f'use a chunk size of {allowed:,}' if allowed
                 else 'use smaller batches' if batch > 1 else 'use a smaller image')
      raise error(
          f'A chunk size of {chunk_size:,} queries needs {format_bytes(needed)}, over the '
          f'memory budget of {budget_mb:g} MiB, on {where}. Raise the budget to at least '
          f'{_mb_at_least(needed):g} MiB or {instead}.', chunk_size, needed)
  attention_bytes = max(s.working_bytes(batch, chunk_size) for s in stages)
  return AttentionPlan(implementation, chunk_size,
                       attention_bytes + activation_bytes(spec, height, width, batch))


def describe_plan(plan: AttentionPlan, height: int, width: int, batch: int,
                  spec: CvTSpec | str) -> str:
  """One log line: the choice, the stage-1 logits it avoids or holds, the estimated peak."""
  spec = get_spec(spec) if isinstance(spec, str) else spec
  stages = stage_attention(spec, height, width)
  largest = max(stages, key=lambda s: s.working_bytes(batch))
  logits = attention_lib.logits_bytes(batch, largest.heads, largest.q_len, largest.kv_len)
  what = (f'chunked attention, {plan.chunk_size:,} queries per chunk'
          if plan.implementation == 'chunked' else f'{plan.implementation} attention')
  others = activation_bytes(spec, height, width, batch)
  return (f'{height}x{width}, batch {batch}: {what} ({largest.name}: {largest.q_len:,} x '
          f'{largest.kv_len:,} logits, {format_bytes(logits)} in full); estimated peak '
          f'{format_bytes(plan.estimated_bytes)} (attention '
          f'{format_bytes(plan.estimated_bytes - others)}, other activations '
          f'{format_bytes(others)})')
