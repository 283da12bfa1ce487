r"""Runs a command as several local JAX processes: multi-process training on one machine.

  python -m projects.training.launch --num_processes 2 --devices_per_process 2 -- \
    python -m projects.cvt_segmentation.main --config=CONFIG.py --workdir=DIR

Each process gets `--coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=i`
appended (the flags of the projects' `main.py`), and with `--devices_per_process` that many
CPU devices (`--xla_force_host_platform_device_count`), so a laptop runs what a cluster
runs: one process per host, each feeding its slice of every batch. If a process fails,
the others are stopped and the launcher exits with its code; on success it exits 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time


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
