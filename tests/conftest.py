"""Shared test settings."""

import os
import tempfile

import jax

from tests import scenic_support

# Scenic tests run against the real Scenic: installed, or the snapshot beside the checkout.
scenic_support.use_snapshot()

# Numerics are compared against references in float32; XLA:CPU defaults are
# already exact, but GPUs/TPUs would otherwise use reduced-precision passes.
jax.config.update('jax_default_matmul_precision', 'highest')

# XLA:CPU compiles dominate the suite's time, and many tests (and the training
# subprocesses, which inherit the variable) compile the same programs: share them
# through JAX's persistent cache, in a fresh folder unless one is given.
if not os.environ.get('JAX_COMPILATION_CACHE_DIR'):
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='cvt-dense-jax-cache-')
jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)

# The datasets' file index (projects/training/data_index.py) lives in the user cache: tests
# and their subprocesses keep theirs in a fresh folder, not in the user's ~/.cache.
os.environ['XDG_CACHE_HOME'] = tempfile.mkdtemp(prefix='cvt-dense-test-cache-')
