"""How the training processes compile their step: XLA flags set before JAX starts, the step
compiled ahead once per batch structure, and the compiler's freed heap handed back."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from projects.training import loop, xla_flags

from . import trainer_support as support


def test_training_flags_join_the_users_flags_without_overriding_them():
  environ = {}
  xla_flags.set_training_flags(environ)
  assert environ['XLA_FLAGS'] == '--xla_cpu_enable_concurrency_optimized_scheduler=false'
  environ = {'XLA_FLAGS': '--xla_force_host_platform_device_count=4'}
  xla_flags.set_training_flags(environ)
  assert environ['XLA_FLAGS'].split() == [
      '--xla_force_host_platform_device_count=4',
      '--xla_cpu_enable_concurrency_optimized_scheduler=false']
  # A user's own choice of the same flag stays, and a second call adds nothing.
  environ = {'XLA_FLAGS': '--xla_cpu_enable_concurrency_optimized_scheduler=true'}
  xla_flags.set_training_flags(environ)
  xla_flags.set_training_flags(environ)
  assert environ['XLA_FLAGS'] == '--xla_cpu_enable_concurrency_optimized_scheduler=true'


def test_the_project_mains_set_the_flags_before_jax_starts():
  """Importing a main sets them; XLA reads them when JAX creates its backend, later."""
  code = ('import os, jax; import projects.cvt_segmentation.main, projects.cvt_detection.main; '
          'print(os.environ["XLA_FLAGS"]); '
          'from jax._src import xla_bridge; print(xla_bridge.backends_are_initialized())')
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                        cwd=support.REPO, env=env, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  flags, initialized = done.stdout.split()[-2:]
  assert flags == '--xla_cpu_enable_concurrency_optimized_scheduler=false'
  assert initialized == 'False'


def test_compiled_steps_compile_once_per_batch_structure(monkeypatch):
  released = []
  monkeypatch.setattr(loop, 'release_freed_memory', lambda: released.append(1))
  traces = []

  def step(state, batch):
    traces.append(jax.tree.map(jnp.shape, batch))
    return state + jnp.sum(batch['x']), {'n': batch['x'].shape[0]}

  steps = loop.CompiledSteps(jax.jit(step, donate_argnums=(0,)))
  state = jnp.zeros(())
  for rows in (2, 2, 3, 2):
    state, _ = steps(state, {'x': jnp.ones((rows, 4))})
  assert float(state) == 36.0
  assert len(traces) == 2 and len(released) == 2  # shapes (2, 4) and (3, 4), once each


def test_release_freed_memory_returns_heap_pages():
  def resident():
    return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')

  # Small blocks (below the mmap threshold) land on the heap; one allocated after them pins
  # the heap's top, so freeing them returns nothing to the OS by itself, as with the
  # compiler's working memory.
  blocks = [np.ones(16_000, np.uint8).tobytes() for _ in range(20_000)]
  pin = np.ones(16_000, np.uint8).tobytes()
  before = resident()
  del blocks
  freed = resident()
  loop.release_freed_memory()
  released = resident()
  assert freed > before - 64 * 2**20, (before, freed)
  assert released < freed - 200 * 2**20, (freed, released)
  del pin
