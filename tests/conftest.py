"""Shared test settings."""

import collections
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

# CI runs `pytest -n 2 --dist loadfile`: each file whole on one of two workers, handed out in
# the order below (xdist's own order, by number of tests, left these multi-minute files of few
# tests to the end, where one worker ran on alone). Longest first, so the files that end the
# run are short. Seconds: the file alone on the busy 2-core machine.
LONGEST_FILES = (
    'tests/projects/test_distributed_restart.py',  # 243
    'tests/projects/test_distributed.py',  # 231
    'tests/projects/test_export.py',  # 229
)


def pytest_configure(config):
  config.option.loadscopereorder = False  # xdist keeps the collection order set below


def pytest_collection_modifyitems(items):
  """The files of LONGEST_FILES first, in its order; then the others by number of tests, as
  xdist would (a stable sort: each file's tests keep their order)."""
  file_of = lambda item: item.nodeid.partition('::')[0]
  counts = collections.Counter(map(file_of, items))
  rank = {path: i for i, path in enumerate(LONGEST_FILES)}
  items.sort(key=lambda item: (rank.get(file_of(item), len(rank)), -counts[file_of(item)]))
