"""XLA settings of the training processes, set in the environment before JAX starts.

XLA:CPU orders a program for concurrency by default, starting work as early as its inputs
allow. In a training step that computes parts of the backward pass (weight gradients,
rematerialised blocks) during the forward pass and holds their results there; the
memory-minimising scheduler keeps them where they belong. CvT-13 + UPerNet at 512x512
batch 2: XLA's temporary buffers 4.0 -> 3.0 GB and the step 11.4 -> 10.4 s on 2 cores
(`benchmarks/train_speed.py`). XLA reads `XLA_FLAGS` once, when JAX creates its first
backend, and compile-time options do not reach this one: `set_training_flags` must run
before anything computes with JAX (the project mains call it on import).
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
