"""Multi-head attention for CvT on `[B, T, N, H]` tensors: plain, query-chunked and fused.

All compute `softmax(scale * q k^T) v` per (batch, head); they differ in memory. 'plain'
materializes the `[B, N, Tq, Tk]` logits (fastest when small); 'chunked' maps over query
blocks, rematerialized in the backward pass, so memory grows linearly with the queries (a
1024x2048 image's stage 1 has 131,072 queries x 32,768 keys: 17 GB of float32 logits);
'fused' is `jax.nn.dot_product_attention`: cuDNN flash attention on a GPU in half precision,
XLA's reference elsewhere. 'auto' picks by backend (`kernels.backend`), dtype and logits size. Sizes may be symbolic (`jax.export`): an exported model's
'auto' is then 'chunked' in blocks that fit every image size. `progress_hook` reports each
block's end to the host.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools
import logging
import numbers
import re
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cvt_backbone import kernels

IMPLEMENTATIONS = ('auto', 'plain', 'chunked', 'fused')

# Logits above this size are computed in query chunks by 'auto'.
DEFAULT_MEMORY_BUDGET_BYTES = 256 * 2**20

# Logits-sized float32 buffers counted per query when sizing chunks: an upper
# bound. With the softmax normalizing the weights XLA kept about 2.5 alive; with
# the normalization moved to the output (`_attend`) about 1 (CvT-13 at 1024 px,
# plain: 4.3 GiB above the model for 4 GiB of logits; benchmarks/extraction_check.py).
SOFTMAX_BUFFERS = 3

# Chunks of at most this many logits (32 MB in float32) run fastest on CPU: larger
# blocks fall out of cache (CvT-13 at 1024 px, stage 2: 4,096 queries x 4,096 keys
# per block 0.38 s, 2,048 per block 0.18 s). Smaller blocks never use more memory.
MAX_BLOCK_LOGITS = 2**23

# With many keys, 'chunked' also splits the keys (an online softmax over key
# blocks, as flash attention): the logits of a block stay in cache instead of a
# full row of keys. CvT-13 stage 1 at 2048 px (262,144 queries over 65,536 keys):
# 42.5 s with query blocks only, 14.9 s with 1,024 x 1,024 blocks.
KEY_BLOCK = 1024
QUERY_BLOCK_WITH_KEY_BLOCKS = 1024


def check_chunk_size(chunk_size: Any, name: str = 'chunk_size') -> None:
  """None (sized from the memory budget) or a positive integer; `name` is the caller's field."""
  # bool is an int subclass and 2.0 would pass as a slice bound: both are refused.
  if chunk_size is not None and not (
      isinstance(chunk_size, numbers.Integral) and not isinstance(chunk_size, (bool, np.bool_))
      and chunk_size >= 1):
    raise ValueError(f'{name} must be None or an integer >= 1; got {chunk_size!r}.')


def _known(*sizes: Any) -> bool:
  """True when every size is a number, False when some are symbolic (`jax.export`)."""
  return all(isinstance(size, numbers.Integral) for size in sizes)


def _ceil_div(a: Any, b: Any) -> Any:
  """ceil(a / b) for integers and symbolic sizes alike."""
  return (a + b - 1) // b


def logits_bytes(batch: int, heads: int, q_len: int, kv_len: int) -> int:
  """Bytes of the float32 attention logits `[B, N, Tq, Tk]`."""
  return 4 * batch * heads * q_len * kv_len


def chunk_size_for_budget(batch: int, heads: int, kv_len: int, budget_bytes: int) -> int:
  """Largest query chunk whose float32 logits (and softmax buffers) fit in `budget_bytes`."""
  per_query = SOFTMAX_BUFFERS * logits_bytes(batch, heads, 1, kv_len)
  return max(1, budget_bytes // per_query)


def choose_implementation(
    batch: int,
    heads: int,
    q_len: int,
    kv_len: int,
    dtype,
    budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    backend: str | None = None,
) -> str:
  """The implementation 'auto' resolves to for these sizes; 'chunked' for symbolic ones
  (known only when an exported model runs), whose memory is bounded for every size."""
  backend = backend or kernels.backend()
  # cuDNN flash attention: linear memory, fastest; it needs half precision.
  if backend == 'gpu' and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return 'fused'
  if not _known(batch, q_len, kv_len):
    return 'chunked'
  if SOFTMAX_BUFFERS * logits_bytes(batch, heads, q_len, kv_len) <= budget_bytes:
    return 'plain'
  return 'chunked'


def fused_implementation(dtype) -> str:
  """The `jax.nn.dot_product_attention` implementation 'fused' runs: 'cudnn' on a GPU in
  half precision (cuDNN's flash attention takes no float32), else 'xla'."""
  half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
  return 'cudnn' if half and jax.default_backend() == 'gpu' else 'xla'


def _fused(q: jax.Array, k: jax.Array, v: jax.Array, scale: float, implementation: str):
  """`jax.nn.dot_product_attention` in the scope `paths_in` reads."""
  with jax.named_scope(f'attention_fused_{implementation}'):
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=implementation)


def paths_in(program: str) -> set[str]:
  """The attention paths a lowered program runs, from the scopes `attention` names them by
  (`jax.jit(f).lower(...).as_text(debug_info=True)`): 'plain_per_head', 'plain_batched',
  'chunked_per_head', 'chunked_batched', 'fused_xla' or 'fused_cudnn'."""
  return set(re.findall(r'attention_((?:plain|chunked)_(?:per_head|batched)|fused_(?:xla|cudnn))',
                        program))


def _attend(q: jax.Array, k: jax.Array, v_t: jax.Array, scale: float) -> jax.Array:
  """One block of queries: q `[..., Tq, H]`, k `[..., Tk, H]`, v_t `[..., H, Tk]`.

  Both products contract both operands' minor axis, and the softmax is normalized on the
  `[..., Tq, H]` output, not the `[..., Tq, Tk]` weights: one pass less over the largest.
  """
  logits = jnp.einsum('...qh,...kh->...qk', q, k, preferred_element_type=jnp.float32) * scale
  # Softmax in float32 whatever the compute dtype.
  weights = jnp.exp(logits - logits.max(axis=-1, keepdims=True))
  out = jnp.einsum('...qk,...hk->...qh', weights.astype(v_t.dtype), v_t,
                   preferred_element_type=jnp.float32)
  return (out / weights.sum(axis=-1, keepdims=True)).astype(v_t.dtype)


def _attend_key_blocks(q: jax.Array, k: jax.Array, v_t: jax.Array, scale: float) -> jax.Array:
  """`_attend` with an online softmax over blocks of about `KEY_BLOCK` keys (`lax.scan`).

  Padded keys of the last block are masked; every block holds a real key, so the running
  maximum is finite after the first.
  """
  *lead, kv_len, head_dim = k.shape
  num_blocks = _ceil_div(kv_len, KEY_BLOCK)
  # Equal blocks, or `KEY_BLOCK`s for symbolic sizes (simpler expressions for `jax.export`).
  block = _ceil_div(kv_len, num_blocks) if _known(kv_len) else KEY_BLOCK
  pad = num_blocks * block - kv_len
  k = jnp.pad(k, [(0, 0)] * len(lead) + [(0, pad), (0, 0)])
  v_t = jnp.pad(v_t, [(0, 0)] * (len(lead) + 1) + [(0, pad)])
  k_blocks = jnp.moveaxis(k.reshape(*lead, num_blocks, block, head_dim), -3, 0)
  v_blocks = jnp.moveaxis(v_t.reshape(*lead, v_t.shape[-2], num_blocks, block), -2, 0)
  valid = (jnp.arange(num_blocks * block) < kv_len).reshape(num_blocks, block)

  def step(carry, blocks):
    running_max, normalizer, out = carry
    k_block, v_block, valid_block = blocks
    logits = jnp.einsum('...qh,...kh->...qk', q, k_block,
                        preferred_element_type=jnp.float32) * scale
    logits = jnp.where(valid_block, logits, -jnp.inf)
    new_max = jnp.maximum(running_max, logits.max(axis=-1))
    weights = jnp.exp(logits - new_max[..., None])
    correction = jnp.exp(running_max - new_max)
    normalizer = normalizer * correction + weights.sum(axis=-1)
    out = out * correction[..., None] + jnp.einsum(
        '...qk,...hk->...qh', weights.astype(v_block.dtype), v_block,
        preferred_element_type=jnp.float32)
    return (new_max, normalizer, out), None

  rows = q.shape[:-1]
  init = (jnp.full(rows, -jnp.inf, jnp.float32), jnp.zeros(rows, jnp.float32),
          jnp.zeros((*rows, v_t.shape[-2]), jnp.float32))
  (_, normalizer, out), _ = lax.scan(step, init, (k_blocks, v_blocks, valid))
  return (out / normalizer[..., None]).astype(v_t.dtype)


# `progress(done, total)`: `done` of the layer's `total` units of work are finished.
ProgressFn = Callable[[int, int], None]
# Inside the trace: `report(index, count, result)` says that unit `index` (traced) of
# `count` ends with `result`.
_Report = Callable[[Any, int, jax.Array], None]


# The active `progress_hook`: its function and the numbering of the layers traced under it.
_HOOK: contextvars.ContextVar[tuple[Callable[[int, int, int], None], Iterator[int]] | None] = (
    contextvars.ContextVar('attention_progress_hook', default=None))


@contextlib.contextmanager
def progress_hook(fn: Callable[[int, int, int], None]) -> Iterator[None]:
  """Every attention layer traced inside calls `fn(layer, done, total)` on the host.

  Layers are numbered 0, 1, ... in the order they are traced (a CvT's blocks, stage by stage);
  `progress` of `attention` gives `done` and `total`. Enter it inside the function being
  traced (a `jax.jit`'s body): outside it nothing is traced and the program is unchanged.
  """
  token = _HOOK.set((fn, itertools.count()))
  try:
    yield
  finally:
    _HOOK.reset(token)


def _callback(progress: ProgressFn, done: Any, total: int, result: jax.Array) -> None:
  """Calls `progress(done, total)` on the host once `result` is computed (one element of it
  is an argument, so the callback waits for the unit)."""
  jax.debug.callback(lambda d, _: progress(int(d), total), done, result.reshape(-1)[0])


def _use_key_blocks(kv_len: int) -> bool:
  return kv_len >= 4 * KEY_BLOCK


def _attend_chunked(q: jax.Array, k: jax.Array, v_t: jax.Array, scale: float,
                    chunk: int | None, report: _Report | None = None) -> jax.Array:
  """Attention over equal blocks of at most `chunk` queries (`lax.map`; None: at once), each
  over key blocks when there are 4 `KEY_BLOCK`s of keys or more, or an unknown number
  (symbolic sizes); `report` is traced in after each block."""
  q_len, kv_len = q.shape[-2], k.shape[-2]
  attend = _attend
  if chunk is not None and (not _known(kv_len) or _use_key_blocks(kv_len)):
    attend = _attend_key_blocks
  if chunk is None or (_known(q_len) and chunk >= q_len):
    # Rematerialized too: the backward pass recomputes the logits (one more Q K^T) instead
    # of keeping the softmax of every (batch, head) pair from the forward pass (CvT-13 +
    # UPerNet training at 256x256 batch 8: 270 MB of stage-1 probabilities).
    out = jax.checkpoint(lambda q, k, v_t: attend(q, k, v_t, scale))(q, k, v_t)
    if report is not None:
      report(0, 1, out)
    return out
  num_chunks = _ceil_div(q_len, chunk)
  if _known(q_len):
    chunk = _ceil_div(q_len, num_chunks)  # Equal blocks: less padding.
  pad = num_chunks * chunk - q_len
  # Padded query rows are computed and dropped: softmax is per query, so they
  # cannot affect the real rows.
  q = jnp.pad(q, [(0, 0)] * (q.ndim - 2) + [(0, pad), (0, 0)])
  q = jnp.moveaxis(q.reshape(*q.shape[:-2], num_chunks, chunk, q.shape[-1]), -3, 0)
  # Rematerialized in the backward pass: training memory stays linear too.
  block = jax.checkpoint(lambda q_block: attend(q_block, k, v_t, scale))
  if report is None:
    out = lax.map(block, q)
  else:
    def reported(args):
      index, q_block = args
      result = block(q_block)
      report(index, num_chunks, result)
      return result

    out = lax.map(reported, (jnp.arange(num_chunks), q))
  out = jnp.moveaxis(out, 0, -3)  # [..., num_chunks, chunk, H]
  return out.reshape(*out.shape[:-3], num_chunks * chunk, out.shape[-1])[..., :q_len, :]


def _multi_head(q: jax.Array, k: jax.Array, v: jax.Array, scale: float, chunk: int | None,
                per_head: bool, progress: ProgressFn | None = None) -> jax.Array:
  """`[B, T, N, H]` attention, optionally in query blocks and one (batch, head) at a time.

  XLA:CPU runs batched matrix products (a batch of heads) 3-4x slower than the
  same products one head at a time, so on CPU the (batch, head) pairs are
  mapped over (`per_head`): CvT-13 at 1024 px, stage 2 (3 heads) 0.49 s ->
  0.18 s, stage 3 (6 heads) 0.12 s -> 0.024 s. Elsewhere the batched form is used.
  """
  with jax.named_scope(f"attention_{'plain' if chunk is None else 'chunked'}_"
                       f"{'per_head' if per_head else 'batched'}"):
    batch, q_len, heads, head_dim = q.shape
    q, k, v_t = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 3, 1)
    if per_head:
      pairs = batch * heads
      flat = lambda x: x.reshape(pairs, *x.shape[2:])
      if progress is None:
        out = lax.map(lambda qkv: _attend_chunked(*qkv, scale, chunk),
                      (flat(q), flat(k), flat(v_t)))
      else:
        def pair_of(args):
          pair, *qkv = args
          report = lambda i, n, result: _callback(progress, pair * n + i + 1, pairs * n, result)
          return _attend_chunked(*qkv, scale, chunk, report)

        out = lax.map(pair_of, (jnp.arange(pairs), flat(q), flat(k), flat(v_t)))
      out = out.reshape(batch, heads, q_len, head_dim)
    else:
      report = None if progress is None else (
          lambda i, n, result: _callback(progress, i + 1, n, result))
      out = _attend_chunked(q, k, v_t, scale, chunk, report)
    return out.transpose(0, 2, 1, 3)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    implementation: str = 'auto',
    chunk_size: int | None = None,
    budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    progress: ProgressFn | None = None,
) -> jax.Array:
  """q `[B, Tq, N, H]`, k and v `[B, Tk, N, H]` -> `[B, Tq, N, H]` in the dtype of `v`.

  Args:
    chunk_size: the most queries per 'chunked' block; by default the most whose logits fit
      in `budget_bytes` (also what 'auto' compares with), capped at `MAX_BLOCK_LOGITS`.
    progress: `progress(done, total)` on the host as each unit ends: a query block of one
      (batch, head) pair on CPU, of all pairs elsewhere, or the unchunked layer. None: no
      callback in the program.
  """
  kernels.resolve('attention', implementation, IMPLEMENTATIONS)
  check_chunk_size(chunk_size)
  if progress is None and (hook := _HOOK.get()) is not None:
    fn, layers = hook
    progress = functools.partial(fn, next(layers))
  batch, q_len, heads, _ = q.shape
  kv_len = k.shape[1]
  chosen = implementation == 'auto'
  if chosen:
    implementation = choose_implementation(batch, heads, q_len, kv_len, q.dtype, budget_bytes)
  per_head = kernels.backend() == 'cpu'
  if not _known(batch, q_len, kv_len) and implementation == 'chunked':
    # Sizes known only at run time: blocks of at most this many queries by `KEY_BLOCK` keys
    # per (batch, head) pair, whatever the image size.
    chunk_size = chunk_size or QUERY_BLOCK_WITH_KEY_BLOCKS
    return _multi_head(q, k, v, scale, chunk_size, per_head, progress)
  if implementation == 'plain':
    return _multi_head(q, k, v, scale, None, per_head, progress)
  if implementation == 'fused':
    fused = fused_implementation(q.dtype)
    try:
      out = _fused(q, k, v, scale, fused)
    except (NotImplementedError, ValueError, RuntimeError) as error:
      if not (chosen and fused == 'cudnn'):
        raise
      # cuDNN refuses some shapes and versions while tracing: 'auto' then takes XLA's.
      logging.getLogger(__name__).warning('cuDNN attention refused %s: %s; using XLA attention',
                                          tuple(q.shape), error)
      out = _fused(q, k, v, scale, 'xla')
    out = out.astype(v.dtype)
    if progress is not None:
      _callback(progress, 1, 1, out)
    return out
  if chunk_size is None:
    chunk_size = chunk_size_for_budget(batch, heads, kv_len, budget_bytes)
  pairs = batch * heads  # (batch, head) pairs computed together.
  if per_head:
    # One pair at a time: the same memory holds `pairs` times more queries.
    chunk_size, pairs = chunk_size * pairs, 1
  if _use_key_blocks(kv_len):
    cap = QUERY_BLOCK_WITH_KEY_BLOCKS // pairs
  else:
    cap = MAX_BLOCK_LOGITS // (pairs * kv_len)
  chunk_size = min(chunk_size, max(1, cap))
  return _multi_head(q, k, v, scale, chunk_size, per_head, progress)
