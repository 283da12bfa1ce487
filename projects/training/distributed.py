"""Multi-process runs through `jax.distributed`: one process per host (or per local group).

`initialize(...)` starts JAX's distributed runtime when the run is one of several
processes, from explicit settings (coordinator address, number of processes, process id:
the `--coordinator_address`, `--num_processes`, `--process_id` flags of the projects'
`main.py`) or from a cluster JAX detects itself (SLURM, Cloud TPU pods, ...), and does
nothing for a single process. On CPUs the collectives go through gloo.
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)


def _cluster_detected() -> bool:
  """A multi-process launch by a cluster manager JAX knows how to read."""
  slurm_tasks = int(os.environ.get('SLURM_NTASKS', '1') or 1)
  tpu_hosts = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  return slurm_tasks > 1 or ',' in tpu_hosts


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Starts `jax.distributed` for a multi-process run; returns whether it did.

  Args:
    coordinator_address: `host:port` of process 0's coordinator service.
    num_processes: processes in the run; None or 1 with no cluster detected: a
      single-process run (nothing to do).
    process_id: this process, in `[0, num_processes)`.

  Raises:
    ValueError: explicit settings that are incomplete or out of range.
  """
  explicit = [coordinator_address, num_processes, process_id]
  if any(v is not None for v in explicit):
    if num_processes is None or num_processes <= 1:
      if num_processes is not None and num_processes < 1:
        raise ValueError(f'num_processes must be >= 1, got {num_processes}.')
      return False
    if coordinator_address is None or process_id is None:
      raise ValueError('A multi-process run needs --coordinator_address, --num_processes and '
                       f'--process_id; got {coordinator_address!r}, {num_processes!r}, '
                       f'{process_id!r}.')
    if not 0 <= process_id < num_processes:
      raise ValueError(f'process_id {process_id} is not in [0, {num_processes}).')
  elif not _cluster_detected():
    return False
  # CPU devices of different processes exchange data through gloo (TCP); GPUs and TPUs
  # use their own collectives, which this setting does not touch.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address, num_processes, process_id)
  log.info('Process %d of %d, %d local of %d devices.', jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())
  return True
