"""Builds CvT-13 as a backbone, runs one 512x768 image and prints each output.

  python -m cvt_backbone [--variant cvt-13] [--height 512] [--width 768]
"""

import argparse
import time

import jax
import jax.numpy as jnp

from cvt_backbone import CvTBackbone, count_params


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--variant', default='cvt-13')
  parser.add_argument('--height', type=int, default=512)
  parser.add_argument('--width', type=int, default=768)
  args = parser.parse_args(argv)

  model = CvTBackbone(variant=args.variant)
  images = jax.random.normal(jax.random.PRNGKey(0), (1, args.height, args.width, 3))
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), images)
  forward = jax.jit(model.apply)
  jax.block_until_ready(forward(variables, images))  # compile
  start = time.perf_counter()
  features = jax.block_until_ready(forward(variables, images))
  seconds = time.perf_counter() - start
  print(f'{args.variant} backbone, {count_params(variables["params"]):,} parameters, '
        f'input [1, {args.height}, {args.width}, 3], {seconds * 1e3:.0f} ms on {jax.devices()[0]}')
  for name, feature in features.items():
    print(f'  {name}: shape {list(feature.shape)}  stride {model.output_strides[name]}  '
          f'finite {bool(jnp.isfinite(feature).all())}')


if __name__ == '__main__':
  main()
