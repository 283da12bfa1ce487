r"""Multi-process runs: `initialize` (what each process's `main` calls) and the local launcher.

  python -m projects.training.launch --num_processes 2 --devices_per_process 2 -- \
    python -m projects.cvt_segmentation.main --config=CONFIG.py --workdir=DIR

The launcher appends `--coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=i`
(the flags of the projects' `main.py`) to each process's command and, with
`--devices_per_process`, gives it that many CPU devices, so a laptop runs what a cluster
runs: one process per host, each feeding its slice of every batch. If a process fails, the
others are stopped and the launcher exits with its code; on success it exits 0.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time

log = logging.getLogger(__name__)

# Settings a cluster tunes, in seconds (environment variables, read by every process):
# how long processes wait for each other at start, and how long a silent one lives.
INIT_TIMEOUT = 'CVT_DISTRIBUTED_INIT_TIMEOUT'
HEARTBEAT_TIMEOUT = 'CVT_DISTRIBUTED_HEARTBEAT_TIMEOUT'
_DEFAULT_SECONDS = {INIT_TIMEOUT: 600, HEARTBEAT_TIMEOUT: 100}


def _seconds(name: str) -> int:
  value = os.environ.get(name, '').strip()
  if not value:
    return _DEFAULT_SECONDS[name]
  if not value.isdigit() or int(value) == 0:
    raise ValueError(f'{name} must be a positive whole number of seconds, got {value!r}.')
  return int(value)


def _cluster_detected() -> bool:
  """A multi-process launch by a cluster manager JAX knows how to read."""
  slurm_tasks = int(os.environ.get('SLURM_NTASKS', '1') or 1)
  tpu_hosts = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  return slurm_tasks > 1 or ',' in tpu_hosts


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Starts `jax.distributed` for a multi-process run; returns whether it did.

  From explicit settings (all three, or `num_processes` None or 1 for a single process) or
  from a cluster JAX detects itself (SLURM, Cloud TPU pods); nothing for one process.

  Raises:
    ValueError: explicit settings that are incomplete or out of range.
  """
  import jax

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
  init_timeout, heartbeat_timeout = _seconds(INIT_TIMEOUT), _seconds(HEARTBEAT_TIMEOUT)
  # CPU devices of different processes exchange data through gloo (TCP); GPUs and TPUs
  # use their own collectives, which these settings do not touch. The CPU backend's start
  # exchanges device lists through the coordinator, with timeouts in minutes.
  minutes = math.ceil(init_timeout / 60)
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.config.update('jax_cpu_get_local_topology_timeout_minutes', minutes)
  jax.config.update('jax_cpu_get_global_topology_timeout_minutes', minutes + 1)
  jax.distributed.initialize(coordinator_address, num_processes, process_id,
                             initialization_timeout=init_timeout,
                             heartbeat_timeout_seconds=heartbeat_timeout)
  _connect_cpu_collectives()
  log.info('Process %d of %d, %d local of %d devices.', jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def _connect_cpu_collectives() -> None:
  """Connects gloo now, while the processes are in step (`jax.distributed.initialize` returns
  in all of them together).

  Gloo connects the devices of a collective at its first run and waits 30 s for a late peer
  (JAX offers no setting), so a process still compiling its first step on a busy machine
  killed the run. Connections are kept per device group: made here for the all-device
  reduction of a data-parallel step and the per-process gathers (`process_allgather`), later
  collectives wait for a slow peer without that limit.
  """
  import jax
  import numpy as np
  from jax.experimental import multihost_utils
  from jax.sharding import NamedSharding, PartitionSpec

  if jax.default_backend() != 'cpu':
    return
  mesh = jax.make_mesh((jax.device_count(),), ('all',))
  zeros = jax.make_array_from_process_local_data(
      NamedSharding(mesh, PartitionSpec('all')), np.zeros(jax.local_device_count(), np.float32))
  jax.block_until_ready(
      jax.jit(jax.numpy.sum, out_shardings=NamedSharding(mesh, PartitionSpec()))(zeros))
  multihost_utils.sync_global_devices('gloo connected')


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def launch(command: list[str], num_processes: int, devices_per_process: int | None = None,
           port: int | None = None, grace_seconds: float = 10.0) -> int:
  """Starts `num_processes` copies of `command` and waits; returns the exit code."""
  port = port or free_port()
  env = dict(os.environ)
  if devices_per_process:
    env['JAX_PLATFORMS'] = 'cpu'
    flags = env.get('XLA_FLAGS', '')
    env['XLA_FLAGS'] = (f'{flags} --xla_force_host_platform_device_count='
                        f'{devices_per_process}').strip()
  procs = []
  for i in range(num_processes):
    args = command + [f'--coordinator_address=127.0.0.1:{port}',
                      f'--num_processes={num_processes}', f'--process_id={i}']
    procs.append(subprocess.Popen(args, env=env))
  try:
    while True:
      codes = [p.poll() for p in procs]
      failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
      if failed:
        i, code = failed[0]
        print(f'launch: process {i} of {num_processes} exited with code {code}; stopping the '
              'others.', file=sys.stderr, flush=True)
        _stop(procs, grace_seconds)
        return code if code > 0 else 128 - code
      if all(c == 0 for c in codes):
        return 0
      time.sleep(0.2)
  except KeyboardInterrupt:
    _stop(procs, grace_seconds)
    return 130


def _stop(procs: list[subprocess.Popen], grace_seconds: float) -> None:
  for p in procs:
    if p.poll() is None:
      p.send_signal(signal.SIGTERM)
  deadline = time.monotonic() + grace_seconds
  for p in procs:
    try:
      p.wait(max(deadline - time.monotonic(), 0))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      description='Run a command as several local JAX processes.',
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument('--num_processes', type=int, default=2, help='processes to start')
  parser.add_argument('--devices_per_process', type=int, default=None,
                      help='CPU devices per process (None: the machine\'s own devices)')
  parser.add_argument('--port', type=int, default=None,
                      help='coordinator port on 127.0.0.1 (default: a free one)')
  parser.add_argument('command', nargs=argparse.REMAINDER,
                      help='the command, after --, e.g. python -m projects.cvt_segmentation.main')
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ['--'] else args.command
  if not command:
    parser.error('give the command to run after --')
  if args.num_processes < 1:
    parser.error(f'--num_processes must be >= 1, got {args.num_processes}')
  return launch(command, args.num_processes, args.devices_per_process, args.port)


if __name__ == '__main__':
  sys.exit(main())
