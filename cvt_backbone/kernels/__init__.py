"""The backbone's compute kernels (attention, depthwise conv), each written per backend.

'auto' picks each kernel for the backend JAX runs on; `assume_backend` makes those choices as
another backend would, so the accelerator code runs (and is tested) on a CPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import jax

BACKENDS = ('cpu', 'gpu', 'tpu')

# Part of jit's cache key: a function traced under one assumption is traced again under another.
_ASSUMED = jax.make_user_context(default_value=None)


@contextlib.contextmanager
def assume_backend(backend: str | None) -> Iterator[None]:
  """Every 'auto' kernel choice traced inside is made as on `backend` ('cpu', 'gpu' or 'tpu';
  None: the backend JAX runs on). The kernels still run where JAX runs: on a CPU, 'gpu' runs
  the library convolutions, batched attention and, in half precision, the XLA reference of
  `jax.nn.dot_product_attention` in place of cuDNN's."""
  if backend is not None and backend not in BACKENDS:
    raise ValueError(f'Unknown backend {backend!r}; expected one of {BACKENDS} or None.')
  with _ASSUMED(backend):
    yield


def backend() -> str:
  """The backend 'auto' choices are made for: `assume_backend`'s, else JAX's default."""
  return _ASSUMED.value or jax.default_backend()


def resolve(kind: str, implementation: str, implementations: Sequence[str], *,
            cpu: str = 'auto', other: str = 'auto') -> str:
  """`implementation`, checked against `implementations`; 'auto' is `cpu` on CPU, else `other`."""
  if implementation not in implementations:
    raise ValueError(f'Unknown {kind} implementation {implementation!r}; expected one of '
                     f'{tuple(implementations)}.')
  if implementation == 'auto':
    return cpu if backend() == 'cpu' else other
  return implementation
