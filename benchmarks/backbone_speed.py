"""CvT-13 forward pass: this package (JAX) against Hugging Face `CvtModel` (PyTorch), side by side.

Each measurement runs in its own process, so peak RSS is that model's alone
(interpreter and framework included, as a user would see it). Both models run
float32 inference on the same random inputs with random weights of the same
architecture (weights do not change the speed). Prints one table: resolution,
batch, median latency, images/s, the forward pass's GFLOP and the achieved
GFLOP/s with their share of the machine's measured float32 matmul throughput,
peak RSS, and the ratios.

FLOPs are counted analytically from the architecture (`cvt_backbone.flops.cvt_flops`,
a multiply-add = 2 FLOPs), the same count for both models. XLA's cost analysis of
our compiled forward pass is shown beside it ('XLA GFLOP') but not used for the
rates: it counts the body of a loop once, and our attention runs in loops (query
blocks of chunked attention, and on CPU one step per (image, head) pair), so it
falls short of the work done: 182 of 611 GFLOP at 1024, 683 of 7,754 at 2048.

  python benchmarks/backbone_speed.py                       # 224x8, 512, 1024, 2048
  python benchmarks/backbone_speed.py --sizes 224x8,512 --repeats 5
  python benchmarks/backbone_speed.py --torch-threads 2     # the default: the machine's cores

Needs the test extra (torch, transformers) for the reference column.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import workers

# Hugging Face's reference stops at 1024: at 2048 it needs about 4x the 8.9 GB it
# takes at 1024 (stage 1 logits grow with the square of the pixel count).
REFERENCE_MAX_SIZE = 1024


def worker_jax(size: int, batch: int, repeats: int, dtype: str, attention: str) -> dict:
  import jax
  import jax.numpy as jnp

  from cvt_backbone import CvTBackbone

  model = CvTBackbone(variant='cvt-13', attention=attention, dtype=getattr(jnp, dtype))
  images = jax.random.normal(jax.random.PRNGKey(0), (batch, size, size, 3), jnp.float32)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), images[:1])
  start = time.perf_counter()
  compiled = jax.jit(model.apply).lower(variables, images).compile()
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  run = lambda: jax.block_until_ready(compiled(variables, images))
  _, times = workers.run_steps(run, 0, repeats)  # after one warm-up call
  return {'times': times, 'compile_s': compile_s, 'xla_flops': float(cost.get('flops', 0.0)),
          'device': str(jax.devices()[0])}


def worker_torch(size: int, batch: int, repeats: int, threads: int) -> dict:
  import torch
  from transformers import CvtConfig, CvtModel

  torch.set_num_threads(threads)
  torch.manual_seed(0)
  model = CvtModel(CvtConfig(), add_pooling_layer=False).eval()  # CvtConfig() is CvT-13.
  images = torch.randn(batch, 3, size, size)
  with torch.inference_mode():
    _, times = workers.run_steps(lambda: model(pixel_values=images), 0, repeats)
  return {'times': times, 'compile_s': 0.0, 'device': f'cpu ({threads} threads)'}


def _run_worker(args: list[str]) -> dict | None:
  return workers.run(__file__, ['--worker', *args], ' '.join(args))


def _parse_sizes(text: str) -> list[tuple[int, int]]:
  sizes = []
  for item in text.split(','):
    size, _, batch = item.partition('x')
    sizes.append((int(size), int(batch or 1)))
  return sizes


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sizes', default='224x8,512,1024,2048',
                      help='comma-separated SIZE[xBATCH] square inputs')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  parser.add_argument('--attention', default='auto')
  parser.add_argument('--torch-threads', type=int, default=os.cpu_count())
  parser.add_argument('--skip-reference', action='store_true')
  parser.add_argument('--json', help='also write the results to this file')
  parser.add_argument('--worker', nargs='+', help=argparse.SUPPRESS)
  args = parser.parse_args()

  if args.worker:
    workers.exit_with_parent()  # a killed run leaves no worker behind
    kind, *rest = args.worker
    if kind == 'peak':
      result = workers.matmul_peak()
    elif kind == 'jax':
      size, batch = int(rest[0]), int(rest[1])
      result = worker_jax(size, batch, args.repeats, args.dtype, args.attention)
    else:
      size, batch = int(rest[0]), int(rest[1])
      result = worker_torch(size, batch, args.repeats, args.torch_threads)
    result['peak_rss_gb'] = workers.peak_rss_gb()
    print(json.dumps(result))
    return

  # Here, not at the top: the workers measure their own RSS and the torch one imports no JAX.
  from cvt_backbone import get_spec
  from cvt_backbone.flops import cvt_flops

  peak = _run_worker(['peak'])
  peak_gflops = peak['gflops'] if peak else float('nan')
  print(f'CvT-13 forward, {args.dtype} (reference float32), {os.cpu_count()} CPU cores; '
        f'float32 matmul peak (jnp.dot 2048^2): {peak_gflops:.1f} GFLOP/s')
  print('GFLOP: analytic count of the forward pass (cvt_backbone.flops, multiply-add = 2), '
        'the same for both;\n% peak: GFLOP/s over the matmul peak; XLA GFLOP: cost analysis of '
        'our program, loop bodies counted once.')
  header = (f'{"input":>14} | {"impl":<22} | {"median s":>8} | {"img/s":>7} | {"GFLOP":>7} | '
            f'{"GFLOP/s":>7} | {"% peak":>6} | {"XLA GFLOP":>9} | {"peak RSS GB":>11} | '
            f'{"speed-up":>8} | {"RSS ratio":>9}')
  print(header)
  print('-' * len(header))
  rows = []
  spec = get_spec('cvt-13')
  for size, batch in _parse_sizes(args.sizes):
    ours = _run_worker(['jax', str(size), str(batch)])
    ref = None
    if not args.skip_reference and size <= REFERENCE_MAX_SIZE:
      ref = _run_worker(['torch', str(size), str(batch)])
    flops = cvt_flops(spec, size, size, batch)['total']
    for name, result in (('cvt-dense (JAX)', ours), ('HF CvtModel (PyTorch)', ref)):
      if result is None:
        continue
      median = statistics.median(result['times'])
      gflops = flops / median / 1e9
      xla_gflop = result.get('xla_flops')
      row = {'size': size, 'batch': batch, 'impl': name, 'median_s': median,
             'images_per_s': batch / median, 'gflop': flops / 1e9, 'gflops': gflops,
             'matmul_peak_share': gflops / peak_gflops, 'peak_rss_gb': result['peak_rss_gb'],
             'compile_s': result['compile_s'], 'device': result['device']}
      if xla_gflop is not None:
        row['xla_gflop'] = xla_gflop / 1e9
      speedup = rss_ratio = ''
      if name.startswith('cvt-dense') and ref is not None:
        speedup = f'{statistics.median(ref["times"]) / median:.2f}x'
        rss_ratio = f'{result["peak_rss_gb"] / ref["peak_rss_gb"]:.2f}'
        row['speedup'] = statistics.median(ref['times']) / median
        row['rss_ratio'] = result['peak_rss_gb'] / ref['peak_rss_gb']
      rows.append(row)
      xla_text = '' if xla_gflop is None else f'{xla_gflop / 1e9:9.1f}'
      print(f'{f"{size}x{size} b{batch}":>14} | {name:<22} | {median:8.3f} | {batch / median:7.2f} | '
            f'{flops / 1e9:7.1f} | {gflops:7.1f} | {100 * gflops / peak_gflops:5.0f}% | '
            f'{xla_text:>9} | {result["peak_rss_gb"]:11.2f} | {speedup:>8} | {rss_ratio:>9}',
            flush=True)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'matmul_peak_gflops': peak_gflops, 'flops': 'analytic (cvt_backbone.flops)',
                 'rows': rows}, f, indent=1)


if __name__ == '__main__':
  main()
