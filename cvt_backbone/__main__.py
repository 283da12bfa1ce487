"""`python -m cvt_backbone`: a smoke run of a random backbone, or `convert` (`cvt-convert`)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from cvt_backbone import CvTBackbone, count_params, cvt_flops
from cvt_backbone.cvt import MIN_INPUT_SIZE, VARIANTS
from cvt_backbone.tools import HelpFormatter, at_least


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog='python -m cvt_backbone',
      description='Build a CvT backbone with random weights, run one random image through it '
      '(compile, then a timed run) and print its FLOPs (cvt_flops), their rate and each output '
      'map: shape [1, H, W, C], stride, finite. A check that JAX, the model and the device '
      'work; no weights are read.',
      epilog='python -m cvt_backbone convert SRC OUT [...] runs cvt-convert instead (see '
      '`python -m cvt_backbone convert --help`).',
      formatter_class=HelpFormatter)
  parser.add_argument('--variant', default='cvt-13', choices=sorted(VARIANTS),
                      help='architecture (cvt-tiny is a small one for tests)')
  parser.add_argument('--height', type=at_least(MIN_INPUT_SIZE), default=512,
                      help=f'input image height in pixels (at least {MIN_INPUT_SIZE}; the maps '
                      'are about H/4, H/8, H/16 high)')
  parser.add_argument('--width', type=at_least(MIN_INPUT_SIZE), default=768,
                      help=f'input image width in pixels (at least {MIN_INPUT_SIZE})')
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv[:1] == ['convert']:
    from cvt_backbone.weights.converted import main as convert_main

    return convert_main(argv[1:])
  args = parse_args(argv)
  model = CvTBackbone(variant=args.variant)
  images = jax.random.normal(jax.random.PRNGKey(0), (1, args.height, args.width, 3))
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), images)
  forward = jax.jit(model.apply)
  jax.block_until_ready(forward(variables, images))  # compile
  start = time.perf_counter()
  features = jax.block_until_ready(forward(variables, images))
  seconds = time.perf_counter() - start
  gflop = cvt_flops(model.resolved_spec, args.height, args.width)['total'] / 1e9
  print(f'{args.variant} backbone, {count_params(variables["params"]):,} parameters, '
        f'input [1, {args.height}, {args.width}, 3], {gflop:.3g} GFLOP, {seconds * 1e3:.0f} ms '
        f'({gflop / seconds:.0f} GFLOP/s) on {jax.devices()[0]}')
  for name, feature in features.items():
    print(f'  {name}: shape {list(feature.shape)}  stride {model.output_strides[name]}  '
          f'finite {bool(jnp.isfinite(feature).all())}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
