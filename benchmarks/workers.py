"""What the benchmark scripts share: the repository on sys.path, measurements in fresh worker
processes, their peak RSS, step timing and the machine's float32 matmul rate.

Imported as `import workers` (benchmarks/, a script's folder, is on sys.path).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cvt_backbone.tools import exit_with_parent  # noqa: E402,F401  (every worker calls it)


def environment(**extra: str) -> dict:
  """A worker's environment: this one with the repository first on PYTHONPATH, JAX's compile
  cache off (each measurement compiles afresh) and TensorFlow's logging quiet, plus `extra`."""
  path = os.pathsep.join(filter(None, [str(REPO), os.environ.get('PYTHONPATH')]))
  return dict(os.environ, PYTHONPATH=path, JAX_ENABLE_COMPILATION_CACHE='false',
              TF_CPP_MIN_LOG_LEVEL='3', **extra)


def run(script: str, argv: list[str], label: str, env: dict | None = None) -> dict | None:
  """Runs `python script *argv` in a fresh process: the JSON of its last stdout line, or None
  after printing `worker LABEL failed (exit N): ` and its last lines."""
  proc = subprocess.run([sys.executable, os.path.abspath(script), *argv], capture_output=True,
                        text=True, env=environment() if env is None else env)
  lines = proc.stdout.strip().splitlines()
  if proc.returncode != 0 or not lines:
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    print(f'  worker {label} failed (exit {proc.returncode}): {" | ".join(tail)}',
          file=sys.stderr, flush=True)
    return None
  return json.loads(lines[-1])


def peak_rss_gb() -> float:
  """This process's peak RSS in GiB (VmHWM: `getrusage`'s ru_maxrss would carry the parent's
  peak over fork and exec)."""
  with open('/proc/self/status') as f:
    kib = next(int(line.split()[1]) for line in f if line.startswith('VmHWM:'))
  return kib / 2**20


def run_steps(step, warmup: int, steps: int) -> tuple[float, list[float]]:
  """Runs `step()` 1 + warmup + steps times: (first step seconds, timed step seconds)."""
  start = time.perf_counter()
  step()
  first_s = time.perf_counter() - start
  for _ in range(warmup):
    step()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return first_s, times


def matmul_peak() -> dict:
  """`{'gflops': ...}`: the best of 5 float32 `jnp.dot`s of 2048x2048 matrices."""
  import jax
  import jax.numpy as jnp

  n = 2048
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  _, times = run_steps(lambda: jax.block_until_ready(dot(a, a)), 0, 5)
  return {'gflops': 2 * n**3 / min(times) / 1e9}
