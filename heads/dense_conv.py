"""Dense 2-D convolution whose kernel gradient runs as matrix products on CPU.

XLA:CPU computes a convolution's kernel gradient far below its matmul throughput. For
UPerNet's 3x3 convs on the stride-4 map of a 512x512 image (batch 2, 128x128 positions):
forward 2.04 s, input gradient 2.08 s, kernel gradient 5.17 s for 2048 -> 512 channels,
and 0.52 / 0.53 / 1.53 s for 512 -> 512. The kernel gradient is a sum over the k*k taps of
(shifted input slice)^T @ (output gradient), one `[C_in, C_out]` matrix product per tap
(0.87 s for 512 -> 512); the forward and the input gradient are as fast from the library.

So on CPU (`implementation='auto'`): k x k convolutions at stride 1 run the library forward
and input gradient and a custom kernel gradient, one tap at a time (`lax.scan`, so only one
slice of the input is alive, not nine: the training step's peak memory went down, not up);
1x1 convolutions are `einsum`s (one matrix product; XLA:CPU ran 512 -> 150 channels at
128x128 forward + backward in 0.10 s instead of 0.25 s). Strided convolutions and other
backends ('conv') keep `lax.conv_general_dilated`. The values and both gradients equal the
library convolution's up to float32 rounding (tested). Measured on the whole training step
(`benchmarks/train_speed.py`, CvT-13 + UPerNet): 14.9 -> 12.1 s at 512x512 batch 2 and
13.0 -> 11.5 s at 256x256 batch 8, peak RSS 7.5 -> 7.3 and 7.4 -> 7.1 GB.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

IMPLEMENTATIONS = ('auto', 'matmul', 'conv')
_DIMENSIONS = ('NHWC', 'HWIO', 'NHWC')


def _resolve(implementation: str) -> str:
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'Unknown dense conv implementation {implementation!r}; expected one of '
                     f'{IMPLEMENTATIONS}.')
  if implementation == 'auto':
    return 'matmul' if jax.default_backend() == 'cpu' else 'conv'
  return implementation


def _library_conv(x, kernel, padding: int, dilation: int, stride: int = 1):
  return lax.conv_general_dilated(
      x, kernel, window_strides=(stride, stride), padding=((padding, padding),) * 2,
      rhs_dilation=(dilation, dilation), dimension_numbers=_DIMENSIONS)


def _taps(kernel_shape, dilation: int):
  kh, kw = kernel_shape[:2]
  return [(i, j, i * dilation, j * dilation) for i in range(kh) for j in range(kw)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_matmul_grads(x, kernel, padding: int, dilation: int):
  return _library_conv(x, kernel, padding, dilation)


def _forward(x, kernel, padding, dilation):
  return _library_conv(x, kernel, padding, dilation), (x, kernel)


def _backward(padding, dilation, residuals, g):
  """The kernel's gradient as one matrix product per tap; the input's by the library."""
  x, kernel = residuals
  n, _, _, c_in = x.shape
  out_h, out_w = g.shape[1:3]
  # The input's gradient (a transposed convolution) is as fast from the library as in taps.
  _, input_vjp = jax.vjp(lambda x: _library_conv(x, kernel, padding, dilation), x)
  (input_grad,) = input_vjp(g)
  xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  offsets = jnp.asarray([(di, dj) for _, _, di, dj in _taps(kernel.shape, dilation)])

  def tap_grad(_, offset):
    # One tap at a time (a loop, not nine slices alive together): the slice of the padded
    # input the tap read, contracted with the output gradient over batch and positions.
    tap = lax.dynamic_slice(xp, (0, offset[0], offset[1], 0), (n, out_h, out_w, c_in))
    return None, jnp.einsum('nhwc,nhwd->cd', tap, g)

  _, kernel_grad = lax.scan(tap_grad, None, offsets)
  kh, kw = kernel.shape[:2]
  kernel_grad = jnp.stack(kernel_grad).reshape(kh, kw, *kernel.shape[2:])
  return input_grad.astype(x.dtype), kernel_grad.astype(kernel.dtype)


_conv_matmul_grads.defvjp(_forward, _backward)


def conv2d(x: jax.Array, kernel: jax.Array, *, stride: int = 1, padding: int = 0,
           dilation: int = 1, implementation: str = 'auto') -> jax.Array:
  """Convolution with symmetric zero padding and no bias (module docstring for the choice).

  Args:
    x: `[N, H, W, C_in]`.
    kernel: `[kh, kw, C_in, C_out]` (Flax's layout).
    stride: the same stride on both axes.
    padding: zero padding on every side.
    dilation: kernel dilation.
    implementation: 'matmul' (matrix-product gradients, einsum for 1x1), 'conv' (the library
      kernel) or 'auto' (matmul on CPU, conv elsewhere).

  Returns:
    `[N, Ho, Wo, C_out]`, `Ho = (H + 2 padding - dilation (kh - 1) - 1) // stride + 1`.
  """
  if _resolve(implementation) == 'conv' or stride != 1:
    return _library_conv(x, kernel, padding, dilation, stride)
  if kernel.shape[:2] == (1, 1) and padding == 0:
    return jnp.einsum('nhwc,cd->nhwd', x, kernel[0, 0])
  return _conv_matmul_grads(x, kernel, padding, dilation)


class Conv(nn.Module):
  """`flax.linen.Conv` for square kernels and symmetric padding, computed by `conv2d`.

  The same parameters (`kernel` `[k, k, C_in, C_out]` with LeCun-normal initialisation,
  `bias` zeros) under the same names, so checkpoints and converted weights are unchanged.
  """

  features: int
  kernel_size: int = 1
  stride: int = 1
  padding: int = 0
  dilation: int = 1
  use_bias: bool = True
  implementation: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (self.kernel_size, self.kernel_size, x.shape[-1], self.features))
    dtype = jnp.promote_types(x.dtype, kernel.dtype)
    y = conv2d(x.astype(dtype), kernel.astype(dtype), stride=self.stride, padding=self.padding,
               dilation=self.dilation, implementation=self.implementation)
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (self.features,)).astype(dtype)
    return y
