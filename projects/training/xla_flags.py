"""XLA settings of the training processes, set in the environment before JAX starts.

XLA:CPU's default concurrency-optimised scheduler computes parts of the backward pass early
and holds them; the memory-minimising one does not. CvT-13 + UPerNet at 512x512 batch 2:
XLA's temporaries 4.0 -> 3.0 GB, the step 11.4 -> 10.4 s on 2 cores
(`benchmarks/train_speed.py`). XLA reads `XLA_FLAGS` once, when JAX creates its first
backend: the project mains call `set_training_flags` on import.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

TRAINING_FLAGS = ('--xla_cpu_enable_concurrency_optimized_scheduler=false',)


def set_training_flags(environ: MutableMapping[str, str] = os.environ) -> None:
  """Adds `TRAINING_FLAGS` to `environ['XLA_FLAGS']`, keeping any value the user gave."""
  flags = environ.get('XLA_FLAGS', '')
  for flag in TRAINING_FLAGS:
    if flag.split('=')[0] not in flags:
      flags = f'{flags} {flag}'.strip()
  environ['XLA_FLAGS'] = flags
