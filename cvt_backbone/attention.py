"""Multi-head attention kernels for CvT: plain, query-chunked and fused.

All three compute the same function,

  out[b, t, n, :] = softmax_s(scale * <q[b, t, n], k[b, s, n]>) @ v[b, s, n],

on `[B, T, N, H]` tensors (batch, tokens, heads, head dim), the layout of
`jax.nn.dot_product_attention`. They differ only in memory:

- 'plain' materializes the `[B, N, Tq, Tk]` logits: fastest for small inputs.
- 'chunked' maps over blocks of queries (`lax.map`), so peak memory is
  `[B, N, chunk, Tk]` and grows linearly with the number of queries. Each
  block is rematerialized in the backward pass, so training memory is linear
  too. This is what makes stage 1 of CvT usable at 1024 px and beyond: a
  1024x2048 image has 131,072 queries and 32,768 keys, 17 GB of fp32 logits.
- 'fused' calls `jax.nn.dot_product_attention`, which uses cuDNN's flash
  attention on GPUs that support it and XLA elsewhere.

'auto' picks by backend, dtype and the size of the logits (`choose_implementation`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

IMPLEMENTATIONS = ('auto', 'plain', 'chunked', 'fused')

# Logits above this size are computed in query chunks by 'auto'.
DEFAULT_MEMORY_BUDGET_BYTES = 256 * 2**20

# Logits-sized float32 buffers XLA keeps alive around the softmax (logits,
# exponentials, normalized weights): measured about 2.5 for CvT-13 at 1024 px.
SOFTMAX_BUFFERS = 3


def _check_implementation(implementation: str) -> None:
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f'Unknown attention implementation {implementation!r}; expected one of {IMPLEMENTATIONS}.')


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
  """The implementation 'auto' resolves to for these sizes."""
  backend = backend or jax.default_backend()
  # cuDNN flash attention: linear memory, fastest; it needs half precision.
  if backend == 'gpu' and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return 'fused'
  if SOFTMAX_BUFFERS * logits_bytes(batch, heads, q_len, kv_len) <= budget_bytes:
    return 'plain'
  return 'chunked'


def _plain(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
  logits = jnp.einsum('bqnh,bknh->bnqk', q, k, preferred_element_type=jnp.float32)
  # Softmax in float32 whatever the compute dtype.
  weights = jax.nn.softmax(logits * scale, axis=-1).astype(v.dtype)
  return jnp.einsum('bnqk,bknh->bqnh', weights, v)


def _chunked(q: jax.Array, k: jax.Array, v: jax.Array, scale: float, chunk: int) -> jax.Array:
  batch, q_len, heads, head_dim = q.shape
  chunk = max(1, min(chunk, q_len))
  num_chunks = math.ceil(q_len / chunk)
  pad = num_chunks * chunk - q_len
  # Padded query rows are computed and dropped: softmax is per query, so they
  # cannot affect the real rows.
  q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
  q = q.reshape(batch, num_chunks, chunk, heads, head_dim).swapaxes(0, 1)
  block = jax.checkpoint(lambda q_block: _plain(q_block, k, v, scale))
  out = lax.map(block, q)
  out = out.swapaxes(0, 1).reshape(batch, num_chunks * chunk, heads, head_dim)
  return out[:, :q_len]


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    implementation: str = 'auto',
    chunk_size: int | None = None,
    budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
) -> jax.Array:
  """Multi-head attention.

  Args:
    q: queries `[B, Tq, N, H]`.
    k: keys `[B, Tk, N, H]`.
    v: values `[B, Tk, N, H]`.
    scale: multiplier of the logits (CvT uses the full stage width: `D**-0.5`).
    implementation: 'auto', 'plain', 'chunked' or 'fused'.
    chunk_size: queries per block for 'chunked'; by default the largest block
      whose logits fit in `budget_bytes`.
    budget_bytes: memory budget for the logits, used by 'auto' and to size chunks.

  Returns:
    `[B, Tq, N, H]` in the dtype of `v`.
  """
  _check_implementation(implementation)
  batch, q_len, heads, _ = q.shape
  kv_len = k.shape[1]
  if implementation == 'auto':
    implementation = choose_implementation(batch, heads, q_len, kv_len, q.dtype, budget_bytes)
  if implementation == 'plain':
    return _plain(q, k, v, scale)
  if implementation == 'fused':
    return jax.nn.dot_product_attention(q, k, v, scale=scale).astype(v.dtype)
  if chunk_size is None:
    chunk_size = chunk_size_for_budget(batch, heads, kv_len, budget_bytes)
  return _chunked(q, k, v, scale, chunk_size)
