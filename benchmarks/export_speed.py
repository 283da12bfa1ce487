"""Exported CvT backbones (cvt-export) against the in-process jitted model, on CPU.

A converted backbone of random weights (the variant's architecture; weights do not change
the speed) is exported once per format with symbolic batch, height and width; each
(runtime, size) then runs in its own process, so peak RSS is that runtime's alone
(interpreter and framework included). Prints the median latency, images/s, its ratio to the
jitted model at the same size, and peak RSS; the StableHLO artifact also runs at 2048x2048
(bounded memory: 'auto' attention at symbolic sizes runs in fixed blocks).

  python benchmarks/export_speed.py                            # CvT-13: 512, 1024; StableHLO 2048
  python benchmarks/export_speed.py --variant cvt-tiny --sizes 64 --large 128 --repeats 2

Needs the export extra (TensorFlow, jax2onnx, onnxruntime) for the SavedModel and ONNX rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

import workers

RUNTIMES = ('jit', 'stablehlo', 'savedmodel', 'onnx')


def _load(runtime: str, artifact: str, weights: str):
  """`run(images) -> outputs` of one runtime; only that runtime's framework is imported."""
  import numpy as np

  if runtime == 'jit':
    import jax

    from cvt_backbone.weights.converted import load_backbone

    model, variables = load_backbone(weights)
    apply = jax.jit(lambda x: model.apply(variables, x))
    return lambda x: jax.block_until_ready(apply(x))
  if runtime == 'stablehlo':
    import jax
    from jax import export

    with open(artifact, 'rb') as f:
      call = export.deserialize(f.read()).call
    return lambda x: jax.block_until_ready(call(x))
  if runtime == 'savedmodel':
    import tensorflow as tf

    serve = tf.saved_model.load(artifact).signatures['serving_default']
    return lambda x: {k: v.numpy() for k, v in serve(images=tf.constant(x)).items()}
  import onnxruntime as ort

  session = ort.InferenceSession(artifact, providers=['CPUExecutionProvider'])
  return lambda x: session.run(None, {'images': np.asarray(x)})


def worker(runtime: str, artifact: str, weights: str, size: int, batch: int,
           repeats: int) -> dict:
  import numpy as np

  run = _load(runtime, artifact, weights)
  images = np.random.default_rng(0).normal(size=(batch, size, size, 3)).astype(np.float32)
  # The first call compiles (jit, StableHLO, SavedModel) or plans (ONNX).
  first, times = workers.run_steps(lambda: run(images), 0, repeats)
  return {'runtime': runtime, 'size': size, 'batch': batch, 'first_s': first,
          'median_s': statistics.median(times), 'peak_rss_gb': workers.peak_rss_gb()}


def _export(variant: str, folder: str) -> tuple[str, dict[str, str]]:
  """A converted backbone of random weights and its artifacts: `(weights, {runtime: path})`."""
  import jax
  import numpy as np

  from cvt_backbone import CvTBackbone, get_spec
  from cvt_backbone.weights.converted import save_converted
  from projects.deploy import export

  weights = os.path.join(folder, f'{variant}.msgpack')
  variables = CvTBackbone(variant=variant).init(jax.random.PRNGKey(0),
                                                np.zeros((1, 32, 32, 3), np.float32))
  save_converted(weights, jax.tree.map(np.asarray, variables), {
      'variant': variant, 'spec': get_spec(variant).to_dict(), 'activation': 'quick_gelu',
      'num_classes': 0, 'backbone_only': True, 'in_chans': 3,
      'source': {'file': 'random', 'sha256': '', 'naming': 'flax'}, 'converter': 'benchmark'})
  paths = {'jit': ''}
  for fmt in RUNTIMES[1:]:
    path = os.path.join(folder, f'backbone.{fmt}')
    if export.main(['--backbone', weights, '--format', fmt, '--output', path]) == 0:
      paths[fmt] = path
  return weights, paths


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--variant', default='cvt-13')
  parser.add_argument('--sizes', default='512,1024', help='square sizes, every runtime')
  parser.add_argument('--large', type=int, default=2048, help='square size, StableHLO only')
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--json', help='also write the results to this file')
  parser.add_argument('--worker', nargs=5, help=argparse.SUPPRESS)
  args = parser.parse_args()

  if args.worker:
    workers.exit_with_parent()  # a killed run leaves no worker behind
    runtime, artifact, weights, size, batch = args.worker
    print(json.dumps(worker(runtime, artifact, weights, int(size), int(batch), args.repeats)))
    return

  with tempfile.TemporaryDirectory() as folder:
    weights, paths = _export(args.variant, folder)
    jobs = [(r, s) for s in (int(v) for v in args.sizes.split(',')) for r in RUNTIMES]
    jobs += [('jit', args.large), ('stablehlo', args.large)] if args.large else []
    results = [r for runtime, size in jobs if runtime in paths and (
        r := workers.run(__file__, ['--worker', runtime, paths[runtime], weights, str(size),
                                    str(args.batch)], f'{runtime} {size}'))]
  base = {r['size']: r['median_s'] for r in results if r['runtime'] == 'jit'}
  print(f'{args.variant} backbone, float32, batch {args.batch}, {os.cpu_count()} CPU cores; '
        f'median of {args.repeats} after one warm-up call, each row its own process')
  header = (f'{"size":>10} | {"runtime":<10} | {"first s":>8} | {"median s":>8} | '
            f'{"img/s":>7} | {"vs jit":>6} | {"peak RSS GB":>11}')
  print(header)
  print('-' * len(header))
  for r in results:
    ratio = base[r['size']] / r['median_s'] if r['size'] in base else float('nan')
    print(f'{r["size"]:>5}x{r["size"]:<4} | {r["runtime"]:<10} | {r["first_s"]:8.2f} | '
          f'{r["median_s"]:8.3f} | {r["batch"] / r["median_s"]:7.2f} | {ratio:6.2f} | '
          f'{r["peak_rss_gb"]:11.2f}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=2)


if __name__ == '__main__':
  main()
