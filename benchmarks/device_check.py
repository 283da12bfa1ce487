r"""The accelerator check: CvT-13 forward and CvT-13 + UPerNet training, JAX against PyTorch.

One run, under 8 minutes on one H100, printing one table and writing
`benchmarks/results_gpu.json`:
- CvT-13 backbone forward (random weights) at 512x512 batch 32, 1024 batch 8 and 2048 batch 1,
  float32 and bfloat16 compute (float32 parameters), attention 'auto';
- the ADE20K config's CvT-13 + UPerNet (+ FCN auxiliary head) training step
  (`train_speed.ours_step`) at 512x512 batch 16 in bfloat16, attention 'fused' (cuDNN on a
  GPU) against 'plain' (XLA's batched einsums), with the device's peak memory;
- the same models from transformers in PyTorch on the same device (`train_speed`'s
  reference), bfloat16 under autocast, float32 with TF32 allowed (as JAX's default precision
  on GPUs), all in one process of their own.

Rows run in worker processes (a training row alone in its own, for its peak memory), each row
with a time limit; a row that raises, crashes its worker or runs out of time records its error
and the next row runs in a fresh worker. MFU is the counted FLOPs per second (forward:
`cvt_backbone.flops.cvt_flops`; training: `heads.flops.training_step_flops`, 3x the forward)
over the device's dense peak (`PEAK_TFLOPS`; on CPU the float32 matmul rate measured in the
run). The attention column is what ran, read from the lowered program (`attention.paths_in`:
plain, chunked, fused(XLA) or fused(cuDNN); the count of cuDNN's fused attention calls,
`__cudnn$fmha`, is recorded too). `--smoke` runs the same code on CPU with cvt-tiny
at tiny sizes (one timed repeat), the JAX side under `kernels.assume_backend('gpu')` (the GPU's
kernels: batched attention, library convolutions, bfloat16 'fused' as XLA's reference), and
writes JSON only to `--output`.

  benchmarks/device_check.sh --output "$OUT/results_gpu.json"      # on the GPU machine
  benchmarks/device_check.sh --parts forward,torch                  # a rerun of some rows
  python benchmarks/device_check.py --smoke --output smoke.json     # CPU: 2-3 min on 2 cores

The GPU machine has jax, flax, optax, orbax, torch and transformers but not ml_collections
(pure Python; the configs need it). Fill the git-ignored .wheels/ once where there is a network,
  pip download --no-deps --dest .wheels ml_collections
and carry it with the working tree: the workers import its wheels from PYTHONPATH, after any
installed package.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from importlib import metadata
from pathlib import Path

import train_speed  # benchmarks/, the script's folder, is on sys.path
import workers

from projects.tools import command_line

REPO = workers.REPO
DEFAULT_OUTPUT = REPO / 'benchmarks' / 'results_gpu.json'
WHEELS = REPO / '.wheels'
MARK = '@row '  # starts a worker's result lines; anything else on its stdout is a library's
DTYPES = ('bfloat16', 'float32')
PARTS_RUN = ('train', 'forward', 'torch')  # `--parts`
# What each mode runs: sizes as (size, batch); limits in seconds per row and for the run.
MODES = {
    'gpu': dict(variant='cvt-13', forward=((512, 32), (1024, 8), (2048, 1)), train=(512, 16),
                train_attention=('fused', 'plain'), warmup=2, repeats=5, torch_device='cuda',
                assume_backend=None, budget_s=460,
                limits={'device': 60, 'forward': 90, 'train': 200, 'torch_forward': 60,
                        'torch_train': 90}),
    # The test suite's: far from the limits even on 2 busy cores. One training row: 'plain'
    # differs only in the attention named, and its compile would double the run (48 s).
    'smoke': dict(variant='cvt-tiny', forward=((64, 2), (96, 1)), train=(64, 2),
                  train_attention=('fused',), warmup=0, repeats=1, torch_device='cpu',
                  assume_backend='gpu', budget_s=1200,
                  limits=dict.fromkeys(('device', 'forward', 'train', 'torch_forward',
                                        'torch_train'), 300)),
}
# Dense (no sparsity) peak TFLOP/s by device_kind, from NVIDIA's datasheets: (bfloat16, TF32).
# The first entry whose words are all in the device kind is used.
PEAK_TFLOPS = (
    (('H100', 'NVL'), None),  # not measured here: no figure rather than a wrong one
    (('H100', 'PCIe'), (756.0, 378.0)),
    (('H100',), (989.4, 494.7)),  # SXM5: 'NVIDIA H100 80GB HBM3'
    (('H200',), (989.4, 494.7)),
    (('A100',), (312.0, 156.0)),
)
# Matmul precisions under which XLA runs float32 products as TF32 on NVIDIA GPUs (None: the
# default, `jax_default_matmul_precision` unset).
TF32_PRECISIONS = ('None', 'default', 'bfloat16', 'tensorfloat32', 'high')
VERSIONS = ('jax', 'jaxlib', 'jax-cuda12-plugin', 'jax-cuda13-plugin', 'flax', 'optax',
            'orbax-checkpoint', 'ml_collections', 'numpy', 'torch', 'transformers',
            'nvidia-cudnn-cu12', 'nvidia-cudnn-cu13')


def _elapsed(start: float) -> str:
  return f'[{time.monotonic() - start:6.1f} s]'


def _median_rate(times: list[float], batch: int) -> dict:
  median = statistics.median(times)
  return {'times': times, 'median_s': median, 'images_per_s': batch / median}


# ---- JAX worker parts ---------------------------------------------------------------------


# The table's names of the attention paths (`kernels.attention.paths_in`).
_LABELS = {'fused_cudnn': 'fused(cuDNN)', 'fused_xla': 'fused(XLA)'}


def _attention_ran(requested: str, lowered) -> dict:
  """The attention label of what ran, read from the program (see the module docstring), and
  the count of cuDNN's fused attention calls in it."""
  from cvt_backbone.kernels import attention

  text = lowered.as_text(debug_info=True)
  # JAX emits cuDNN's attention as this custom call; XLA cannot replace it by other code.
  calls = text.count('__cudnn$fmha')
  paths = sorted(attention.paths_in(text))
  label = '+'.join(_LABELS.get(p, p.split('_')[0]) for p in paths) or 'none'
  if 'fused_cudnn' in paths and not calls:
    label += ' (no cuDNN call!)'
  return {'attention': label, 'attention_paths': paths, 'attention_requested': requested,
          'cudnn_fmha_calls': calls}


def _peak_memory_gb() -> float | None:
  """The device's peak memory in use by this process (None where unreported, as on CPU)."""
  import jax

  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get('peak_bytes_in_use')
  return None if peak is None else peak / 2**30


def part_device(row: dict) -> dict:
  import jax

  device = jax.devices()[0]
  result = {'platform': device.platform, 'device_kind': device.device_kind,
            'device_count': jax.device_count(),
            'matmul_precision': str(getattr(jax.config, 'jax_default_matmul_precision', None))}
  if device.platform == 'cpu':
    result['measured_peak_flops'] = workers.matmul_peak()['gflops'] * 1e9
  return result


@functools.cache
def _variables(variant: str):
  """Random CvT variables, shared by the forward rows (float32 parameters at every dtype and
  size): one initialisation compiled per worker, not one per row."""
  import jax
  import jax.numpy as jnp

  from cvt_backbone import CvTBackbone

  return jax.jit(CvTBackbone(variant=variant).init)(jax.random.PRNGKey(0),
                                                    jnp.zeros((1, 32, 32, 3)))


def part_forward(row: dict) -> dict:
  import jax
  import jax.numpy as jnp

  from cvt_backbone import CvTBackbone, get_spec
  from cvt_backbone.flops import cvt_flops

  size, batch = row['size'], row['batch']
  model = CvTBackbone(variant=row['variant'], attention=row['attention'],
                      dtype=getattr(jnp, row['dtype']))
  key = jax.random.PRNGKey(0)
  images = jax.random.normal(key, (batch, size, size, 3), jnp.float32)
  variables = _variables(row['variant'])
  start = time.perf_counter()
  lowered = jax.jit(model.apply).lower(variables, images)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  _, times = workers.run_steps(lambda: jax.block_until_ready(compiled(variables, images)),
                               row['warmup'], row['repeats'])
  return {**_median_rate(times, batch), 'compile_s': compile_s,
          'flops': cvt_flops(get_spec(row['variant']), size, size, batch)['total'],
          **_attention_ran(row['attention'], lowered)}


def part_train(row: dict) -> dict:
  from heads.flops import training_step_flops

  size, batch = row['size'], row['batch']
  model, lowered, _, step, losses, info = train_speed.ours_step(
      'upernet', row['variant'], size, batch, row['dtype'], row['attention'])
  _, times = workers.run_steps(step, row['warmup'], row['repeats'])
  return {**_median_rate(times, batch), 'compile_s': info['compile_s'],
          'flops': training_step_flops(model.flax_model, (batch, size, size, 3)),
          'peak_memory_gb': _peak_memory_gb(), 'params': info['params'],
          'first_loss': losses[0], 'last_loss': losses[-1],
          **_attention_ran(row['attention'], lowered)}


# ---- PyTorch worker parts -----------------------------------------------------------------


def _torch_device(row: dict):
  import torch

  device = torch.device(row['device'])
  if device.type == 'cuda':
    torch.backends.cuda.matmul.allow_tf32 = True  # float32 as JAX's default precision runs it
    torch.backends.cudnn.allow_tf32 = True
    torch.cuda.reset_peak_memory_stats()
  return device


def _torch_peak_memory_gb(device) -> float | None:
  import torch

  return torch.cuda.max_memory_allocated() / 2**30 if device.type == 'cuda' else None


def part_torch_forward(row: dict) -> dict:
  import torch

  device = _torch_device(row)
  size, batch = row['size'], row['batch']
  model = train_speed._hf_cvt_model(row['variant']).to(device).eval()
  images = torch.randn(batch, 3, size, size, device=device)

  def forward():
    with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16,
                                                enabled=row['dtype'] == 'bfloat16'):
      model(pixel_values=images)
    if device.type == 'cuda':
      torch.cuda.synchronize()

  _, times = workers.run_steps(forward, row['warmup'], row['repeats'])
  return {**_median_rate(times, batch), 'peak_memory_gb': _torch_peak_memory_gb(device),
          'device_name': torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}


def part_torch_train(row: dict) -> dict:
  device = _torch_device(row)
  result = train_speed.worker_torch('upernet', row['variant'], row['size'], row['batch'],
                                    row['warmup'], row['repeats'], os.cpu_count(),
                                    row['device'], row['dtype'])
  return {**_median_rate(result['times'], row['batch']),
          'peak_memory_gb': _torch_peak_memory_gb(device), 'params': result['params'],
          'first_loss': result['first_loss'], 'last_loss': result['last_loss']}


PARTS = {'device': part_device, 'forward': part_forward, 'train': part_train,
         'torch_forward': part_torch_forward, 'torch_train': part_torch_train}


def worker(rows: list[dict]) -> None:
  """Runs `rows` in order, printing each one's result line; a row's exception is its result."""
  from cvt_backbone import kernels

  for row in rows:
    try:
      with kernels.assume_backend(row['assume_backend']):
        result = PARTS[row['part']](row)
    except Exception as e:  # noqa: BLE001 (the row's error is recorded and the next row runs)
      traceback.print_exc()
      message = ' '.join(f'{type(e).__name__}: {e}'.split())[:600]
      # PyTorch out of memory is a finding (its attention logits grow with pixels squared).
      key = 'oom' if type(e).__name__ == 'OutOfMemoryError' else 'error'
      result = {key: message}
      if key == 'oom':
        sys.modules['torch'].cuda.empty_cache()
    if folder := os.environ.get('DEVICE_CHECK_IMPORTS'):  # the test's record of the imports
      Path(folder, f'{os.getpid()}.json').write_text(json.dumps(sorted(sys.modules)))
    print(MARK + json.dumps(result), flush=True)


# ---- The run ------------------------------------------------------------------------------


def _worker_env(smoke: bool) -> dict:
  env = workers.environment()
  env['PYTHONPATH'] = os.pathsep.join([env['PYTHONPATH'],
                                       *sorted(str(p) for p in WHEELS.glob('*.whl'))])
  if smoke:
    env['JAX_PLATFORMS'] = 'cpu'
    train_speed.xla_flags.set_training_flags(env)  # XLA:CPU's, as the project mains set them
  return env


def _run_worker(rows: list[dict], env: dict, limits: dict, deadline: float,
                report) -> tuple[list[dict], str]:
  """Runs `rows` in one worker: the finished rows' results and the next row's error."""
  cmd = [sys.executable, os.path.abspath(__file__), '--worker', json.dumps(rows)]
  results = []
  with tempfile.TemporaryFile('w+') as stderr:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    lines = queue.Queue()
    threading.Thread(target=lambda: [*map(lines.put, proc.stdout), lines.put(None)],
                     daemon=True).start()
    try:
      for row in rows:
        limit = limits[row['part']]
        row_deadline = min(time.monotonic() + limit, deadline)
        line = ''
        while not line.startswith(MARK):
          try:
            line = lines.get(timeout=max(0.0, row_deadline - time.monotonic()))
          except queue.Empty:
            return results, (f'timed out after {limit} s' if row_deadline < deadline else
                             'timed out: the run\'s time budget was spent')
          if line is None:
            proc.wait()
            stderr.seek(0)
            tail = ' | '.join(stderr.read().strip().splitlines()[-3:])
            return results, f'worker exited with status {proc.returncode}: {tail}'
        results.append({**row, **json.loads(line[len(MARK):])})
        report(results[-1])
      return results, ''
    finally:
      proc.kill()
      proc.wait()


def run_rows(rows: list[dict], env: dict, limits: dict, deadline: float, report) -> list[dict]:
  """Each row with its result, measured in one worker process while its rows end.

  A row past its limit (or the run's deadline) or whose worker exits gets an 'error', and the
  rows after it run in a fresh worker. `report(row)` is called as each row ends.
  """
  results, pending = [], list(rows)
  while pending:
    done, error = [], 'skipped: the run\'s time budget was spent'
    if time.monotonic() < deadline:
      done, error = _run_worker(pending, env, limits, deadline, report)
    results += done
    pending = pending[len(done):]
    if pending:
      results.append({**pending.pop(0), 'error': error})
      report(results[-1])
  return results


def plan(mode: str, parts: tuple[str, ...] = PARTS_RUN) -> list[list[dict]]:
  """The rows of a run in groups, each group in a worker of its own, the most wanted first:
  the device and the first training row, the second training row (each alone for its peak
  memory), PyTorch's rows (quick: nothing to compile), the forward rows."""
  settings = MODES[mode]
  common = dict(variant=settings['variant'], warmup=settings['warmup'],
                repeats=settings['repeats'], assume_backend=settings['assume_backend'])
  size, batch = settings['train']
  train = [dict(common, part='train', size=size, batch=batch, dtype='bfloat16', attention=name)
           for name in settings['train_attention'] if 'train' in parts]
  forward = [dict(common, part='forward', size=size, batch=batch, dtype=dtype, attention='auto')
             for dtype in DTYPES for size, batch in settings['forward'] if 'forward' in parts]
  torch = [dict(row, part=f'torch_{row["part"]}', attention='eager',
                device=settings['torch_device'])
           for row in train[:1] + forward if 'torch' in parts]
  groups = [[dict(common, part='device'), *train[:1]], train[1:], torch, forward]
  return [group for group in groups if group]


def peak_flops(device: dict, dtype: str) -> tuple[float | None, str]:
  """The peak FLOP/s an MFU of `dtype` compute is measured against, and what it is."""
  if device.get('platform') == 'cpu':
    return device['measured_peak_flops'], 'the measured float32 matmul rate (jnp.dot 2048^2)'
  kind = device.get('device_kind', '?')
  peaks = next((p for words, p in PEAK_TFLOPS if all(w in kind for w in words)), None)
  if peaks is None:
    return None, f'no peak known for {kind!r}'
  if dtype == 'bfloat16':
    return peaks[0] * 1e12, f'{kind} dense bfloat16 {peaks[0]} TFLOP/s'
  precision = device['matmul_precision']
  if precision in TF32_PRECISIONS:
    return peaks[1] * 1e12, (f'{kind} dense TF32 {peaks[1]} TFLOP/s (float32 matmuls run as '
                             f'TF32: matmul precision {precision})')
  return None, f'float32 at matmul precision {precision}: no peak in the table'


def _label(row: dict) -> str:
  return f'{row["part"]} {row["size"]}x{row["size"]} b{row["batch"]} {row["dtype"]}'


def _fmt(value, spec: str, width: int) -> str:
  return f'{"-":>{width}}' if value is None else f'{value:>{width}{spec}}'


def table(rows: list[dict]) -> list[str]:
  header = (f'{"part":<8} | {"input":>13} | {"dtype":<8} | {"attention":<22} | {"img/s":>8} | '
            f'{"MFU %":>6} | {"peak mem GB":>11} | {"compile s":>9} | {"torch img/s":>11} | '
            f'{"ratio":>6}')
  lines = [header, '-' * len(header)]
  for row in rows:
    torch = row.get('torch', {})
    torch_rate = ('OOM' if 'oom' in torch else 'error' if 'error' in torch else
                  _fmt(torch.get('images_per_s'), '.1f', 11))
    ratio = (row['images_per_s'] / torch['images_per_s']
             if 'images_per_s' in row and 'images_per_s' in torch else None)
    mfu = None if row.get('mfu') is None else 100 * row['mfu']
    attention = 'error' if 'error' in row else row['attention']
    lines.append(
        f'{row["part"]:<8} | {row["size"]:>5}x{row["size"]:<4}b{row["batch"]:<2} | '
        f'{row["dtype"]:<8} | {attention:<22} | {_fmt(row.get("images_per_s"), ".1f", 8)} | '
        f'{_fmt(mfu, ".1f", 6)} | {_fmt(row.get("peak_memory_gb"), ".2f", 11)} | '
        f'{_fmt(row.get("compile_s"), ".1f", 9)} | {torch_rate:>11} | '
        f'{"-" if ratio is None else f"{ratio:.2f}x":>6}')
  return lines


def build_parser() -> argparse.ArgumentParser:
  parser = command_line.parser(
      'device_check.py', __doc__.splitlines()[0],
      epilog='exit status: 0 when every row ran (PyTorch out of memory is a result), 1 when '
             'any failed (its error is printed and recorded), 2 for bad arguments.')
  parser.add_argument('--smoke', action='store_true',
                      help='the same code on CPU: cvt-tiny, tiny sizes, one repeat')
  parser.add_argument('--output', type=Path,
                      help=f'the JSON results (default: {DEFAULT_OUTPUT.relative_to(REPO)}; with '
                           '--smoke none unless given)')
  parser.add_argument('--parts', type=train_speed.choice_names('part', PARTS_RUN),
                      default=PARTS_RUN,
                      help=f'comma-separated parts to run, of {",".join(PARTS_RUN)} (torch: '
                           'the PyTorch rows of the other parts given), e.g. to rerun the rows '
                           'a run had no time left for')
  parser.add_argument('--worker', help=argparse.SUPPRESS)
  return parser


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  if args.worker:
    workers.exit_with_parent()  # a killed run leaves no worker behind
    worker(json.loads(args.worker))
    return command_line.EXIT_OK

  from cvt_backbone.tools import OutputWriteError, write_json

  mode = 'smoke' if args.smoke else 'gpu'
  output = args.output or (None if args.smoke else DEFAULT_OUTPUT)
  settings, start = MODES[mode], time.monotonic()
  deadline = start + settings['budget_s']
  env = _worker_env(args.smoke)
  assumed = settings['assume_backend']
  print(f'{_elapsed(start)} device check ({mode}): {settings["variant"]}, '
        f'{f"kernels chosen as on {assumed}, " if assumed else ""}time budget '
        f'{settings["budget_s"]} s', flush=True)

  def report(row):
    if 'error' in row or 'oom' in row:
      print(f'{_elapsed(start)} {_label(row) if "size" in row else row["part"]}: '
            f'{"error" if "error" in row else "out of memory"}: {row.get("error") or row["oom"]}',
            flush=True)
    elif row['part'] == 'device':
      print(f'{_elapsed(start)} device: {row["device_kind"]} ({row["platform"]})', flush=True)
    else:
      compile_s = f', compile {row["compile_s"]:.1f} s' if 'compile_s' in row else ''
      print(f'{_elapsed(start)} {_label(row)} {row["attention"]}: '
            f'{row["images_per_s"]:.1f} img/s{compile_s}', flush=True)

  results = [row for group in plan(mode, args.parts)
             for row in run_rows(group, env, settings['limits'], deadline, report)]
  device = results[0]
  ours = [row for row in results if row['part'] in ('train', 'forward')]
  theirs = {(row['part'], row['size'], row['batch'], row['dtype']): row
            for row in results if row['part'].startswith('torch_')}
  peaks = {dtype: peak_flops(device, dtype) for dtype in DTYPES}
  for row in ours:
    peak = peaks[row['dtype']][0]
    torch = theirs.get((f'torch_{row["part"]}', row['size'], row['batch'], row['dtype']), {})
    for result in (row, torch):
      if 'flops' in row and 'images_per_s' in result and peak:
        result['mfu'] = row['flops'] / result['median_s'] / peak
    row['torch'] = torch

  errors = [f'{_label(row) if "size" in row else row["part"]}: {row["error"]}'
            for row in results if 'error' in row]
  elapsed = time.monotonic() - start
  lines = table(ours)
  print()
  print(f'{device.get("device_kind", "?")}: {settings["variant"]}; MFU of bfloat16 rows against '
        f'{peaks["bfloat16"][1]}; of float32 rows against {peaks["float32"][1]}; PyTorch '
        f'(transformers, eager attention) under bfloat16 autocast or float32 (TF32 on GPUs); '
        f'ratio: ours / PyTorch images per second; median of {settings["repeats"]} after '
        f'{1 + settings["warmup"]} untimed')
  print('\n'.join(lines))
  for error in errors:
    print(f'error: {error}')
  print(f'{len(ours)} rows, {len(errors)} errors, {elapsed:.0f} s')
  if output is not None:
    versions = {}
    for name in VERSIONS:
      with contextlib.suppress(metadata.PackageNotFoundError):
        versions[name] = metadata.version(name)
    try:
      write_json({'mode': mode, 'variant': settings['variant'], **{
          k: device.get(k) for k in ('platform', 'device_kind', 'device_count',
                                     'matmul_precision')},
                  'peaks': {dtype: {'flops': peak, 'source': source}
                            for dtype, (peak, source) in peaks.items()},
                  'python': sys.version.split()[0], 'versions': versions,
                  'warmup': settings['warmup'], 'repeats': settings['repeats'],
                  'rows': ours, 'device': device, 'errors': errors, 'elapsed_s': elapsed,
                  'table': lines}, output)
    except OutputWriteError as e:
      print(f'error: {e}', file=sys.stderr)
      return command_line.EXIT_FAILED
    print(f'wrote {output}')
  return command_line.EXIT_FAILED if errors else command_line.EXIT_OK


if __name__ == '__main__':
  sys.exit(main())
