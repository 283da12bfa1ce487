"""Shared test settings: float32 matmuls at full precision for numerical comparisons."""

import jax

# Numerics are compared against references in float32; XLA:CPU defaults are
# already exact, but GPUs/TPUs would otherwise use reduced-precision passes.
jax.config.update('jax_default_matmul_precision', 'highest')
