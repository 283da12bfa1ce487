"""The backbone's compute kernels (attention, depthwise conv), each written per backend."""

from __future__ import annotations

from collections.abc import Sequence

import jax


def resolve(kind: str, implementation: str, implementations: Sequence[str], *,
            cpu: str = 'auto', other: str = 'auto') -> str:
  """`implementation`, checked against `implementations`; 'auto' is `cpu` on CPU, else `other`."""
  if implementation not in implementations:
    raise ValueError(f'Unknown {kind} implementation {implementation!r}; expected one of '
                     f'{tuple(implementations)}.')
  if implementation == 'auto':
    return cpu if jax.default_backend() == 'cpu' else other
  return implementation
