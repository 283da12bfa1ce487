"""Feature extraction at 1024x1024: the memory-budget plan (chunked) against plain attention.

Issue 7's check: extracting a 1024x1024 image with the automatic plan under a small
budget (query-chunked stage-1 attention) gives the same stage maps as plain attention
within 1e-4, with far less memory. CvT-13 stage 1 at 1024 px has 65,536 queries over
16,384 keys: 4 GiB of float32 logits, 8 GiB with their exponentials.

Each path runs in its own process (peak RSS is that path's alone, interpreter and JAX
included) through `projects.feature_extraction`: the image is read and normalized as
the `cvt-extract` command does, then `FeatureExtractor` runs it. Prints the plan of
each path, compile and run times, the peak RSS before and after extraction, and the
max abs difference per stage; exits 1 if one exceeds the tolerance.

  python benchmarks/extraction_check.py                        # CvT-13, random weights
  python benchmarks/extraction_check.py --checkpoint cvt-13.msgpack --image photo.jpg
  python benchmarks/extraction_check.py --size 512 --budget-mb 64
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import workers

TOLERANCE = 1e-4


def worker(args: argparse.Namespace) -> dict:
  import jax
  import jax.numpy as jnp

  from cvt_backbone.cvt import CvTBackbone
  from projects.feature_extraction import FeatureExtractor, images, planning

  start = time.perf_counter()
  if args.checkpoint:
    from cvt_backbone.weights.converted import load_backbone

    backbone, variables = load_backbone(args.checkpoint)
  else:
    backbone = CvTBackbone(variant=args.variant)
    variables = jax.jit(backbone.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  load_s = time.perf_counter() - start
  pixels = images.normalize(images.read_image(args.image))[None]
  _, height, width, _ = pixels.shape
  budget_mb = args.budget_mb
  if args.attention == 'plain':
    # Exactly what plain attention needs (plus 1 MiB), so that its plan is checked too.
    stages = planning.stage_attention(backbone.resolved_spec, height, width)
    budget_mb = max(s.working_bytes(1) for s in stages) / 2**20 + 1
  extractor = FeatureExtractor(backbone, variables, memory_budget_mb=budget_mb,
                               attention=args.attention)
  plan = extractor.plan(height, width, 1)
  rss_before = workers.peak_rss_gb()
  maps = {}
  # The first call compiles, then runs.
  first_s, times = workers.run_steps(lambda: maps.update(extractor(pixels)), 0, args.repeats)
  np.savez(args.features, **{name: value[0] for name, value in maps.items()})
  return {
      'plan': planning.describe_plan(plan, height, width, 1, extractor.spec),
      'budget_mb': budget_mb,
      'estimated_gib': plan.estimated_bytes / 2**30,
      'load_s': load_s,
      'first_s': first_s,
      'run_s': min(times) if times else float('nan'),
      'rss_before_gib': rss_before,
      'rss_peak_gib': workers.peak_rss_gb(),
      'size': f'{height}x{width}',
  }


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--checkpoint', help='a converted checkpoint (default: random weights)')
  parser.add_argument('--variant', default='cvt-13', help='variant for random weights')
  parser.add_argument('--image', help='an image file (default: a random {size}x{size} image)')
  parser.add_argument('--size', type=int, default=1024, help='side of the random image')
  parser.add_argument('--budget-mb', type=float, default=512,
                      help='memory budget of the planned path (default %(default)g MiB)')
  parser.add_argument('--repeats', type=int, default=1, help='timed runs after the first')
  parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
  parser.add_argument('--attention', default='auto', help=argparse.SUPPRESS)
  parser.add_argument('--features', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    workers.exit_with_parent()  # a killed run leaves no worker behind
    print(json.dumps(worker(args)))
    return 0

  from projects.training.images import displayed_size

  with tempfile.TemporaryDirectory() as tmp:
    if args.image is None:
      # Smooth structure plus noise: closer to a photo than pure noise, and seeded.
      rng = np.random.default_rng(0)
      yy, xx = np.mgrid[0:args.size, 0:args.size] / args.size
      base = np.stack([np.sin(6 * xx + 2 * yy), np.cos(5 * yy - 3 * xx), np.sin(9 * xx * yy)], -1)
      pixels = np.clip(127.5 + 80 * base + 30 * rng.standard_normal(base.shape), 0, 255)
      args.image = os.path.join(tmp, 'image.png')
      from PIL import Image

      Image.fromarray(pixels.astype(np.uint8)).save(args.image)
    height, width = displayed_size(args.image)
    common = ['--image', args.image, '--variant', args.variant, '--repeats', str(args.repeats)]
    if args.checkpoint:
      common += ['--checkpoint', args.checkpoint]
    print(f'{args.checkpoint or args.variant + " (random weights)"}, {height}x{width} image, '
          f'{os.cpu_count()} CPU cores')
    results = {}
    for name, attention in (('planned', 'auto'), ('plain', 'plain')):
      features = os.path.join(tmp, f'{name}.npz')
      results[name] = workers.run(__file__, ['--worker', *common, '--attention', attention,
                                             '--budget-mb', str(args.budget_mb),
                                             '--features', features], name)
      if results[name] is None:
        return 1
      results[name]['features'] = dict(np.load(features))
      r = results[name]
      print(f'{name:>8} (budget {r["budget_mb"]:g} MiB): {r["plan"]}')
      print(f'{"":>8}  load/init {r["load_s"]:.1f} s, first call (compile + run) '
            f'{r["first_s"]:.1f} s, run {r["run_s"]:.1f} s; peak RSS {r["rss_before_gib"]:.2f} GiB '
            f'before extraction, {r["rss_peak_gib"]:.2f} GiB after '
            f'(estimate {r["estimated_gib"]:.2f} GiB + weights)')
  failed = False
  for stage, plain in results['plain']['features'].items():
    diff = float(np.abs(results['planned']['features'][stage] - plain).max())
    ok = diff <= TOLERANCE
    failed |= not ok
    print(f'{stage}: {tuple(plain.shape)}, max |planned - plain| = {diff:.3g} '
          f'(max |plain| {float(np.abs(plain).max()):.3g}) {"ok" if ok else "FAIL"} '
          f'(tolerance {TOLERANCE:g})')
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
