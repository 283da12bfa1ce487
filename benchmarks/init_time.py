r"""Model initialisation time as Scenic's trainers do it: eager `init` vs the compiled one.

Scenic's `train_utils.initialize_model` calls `flax_model.init(rngs, x, train=False,
debug=False)` outside jit, so a plain Flax module initialises op by op. The project's
segmentation models (`PretrainedBackboneInit`) compile `init` as one program. Each side runs
in its own fresh process (compile caches off), on the same model and input:

  python benchmarks/init_time.py [--model cvt_upernet] [--variant cvt-tiny] [--size 32,48]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import workers


def _measure(model_name: str, variant: str, size: tuple[int, int], eager: bool) -> dict:
  import jax
  import jax.numpy as jnp

  import heads
  from projects.cvt_segmentation import models

  cls = models.get_model_cls(model_name)
  config = cls.default_model_config()
  config.backbone.variant = variant
  import ml_collections

  model = cls(ml_collections.ConfigDict({'model': config}), {'num_classes': 150})
  x = jnp.zeros((2, *size, 3), jnp.float32)
  # Eager: the plain Segmentor's init, as Scenic runs any Flax module.
  init = (lambda r, v: heads.Segmentor.init(model.flax_model, r, v, train=False, debug=False)
          ) if eager else (lambda r, v: model.flax_model.init(r, v, train=False, debug=False))
  start = time.perf_counter()
  variables = init(jax.random.PRNGKey(0), x)
  jax.block_until_ready(variables)
  first = time.perf_counter() - start
  return {'side': 'eager' if eager else 'compiled', 'seconds': first,
          'params': sum(v.size for v in jax.tree.leaves(variables['params']))}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='cvt_upernet')
  parser.add_argument('--variant', default='cvt-tiny')
  parser.add_argument('--size', default='32,48', help='H,W of the dummy input')
  parser.add_argument('--side', choices=('eager', 'compiled'), help=argparse.SUPPRESS)
  args = parser.parse_args()
  size = tuple(int(s) for s in args.size.split(','))
  if args.side:
    print(json.dumps(_measure(args.model, args.variant, size, args.side == 'eager')))
    return
  results = [workers.run(__file__, ['--model', args.model, '--variant', args.variant,
                                     '--size', args.size, '--side', side], side)
             for side in ('eager', 'compiled')]
  if None in results:
    sys.exit(1)
  print(f'{args.model} ({args.variant}), input 2x{size[0]}x{size[1]}, '
        f'{results[0]["params"]:,} params:')
  for r in results:
    print(f'  {r["side"]:>8} init: {r["seconds"]:.1f} s')
  print(f'  speed-up: {results[0]["seconds"] / results[1]["seconds"]:.1f}x')


if __name__ == '__main__':
  main()
