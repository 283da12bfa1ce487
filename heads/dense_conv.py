"""Dense 2-D convolution whose kernel gradient runs as matrix products on CPU.

XLA:CPU computes a convolution's kernel gradient far below its matmul throughput. In the
CvT-13 + UPerNet training step at 512x512 batch 2 (profiled with `jax.profiler`), the
kernel gradient of the 1536 -> 512 fusion conv on the 128x128 map took 6.4 s and that of the
512 -> 512 FPN conv 2.3 s, against 1.6 s and 0.6 s for their forward passes and 1.4 s and
0.5 s for their input gradients. The kernel gradient is a sum over the k*k taps of
`x^T @ (shifted output gradient)`, one `[C_in, C_out]` matrix product per tap
(`kernel_grad_by_taps`): 1.2 s and 0.5 s.

So on CPU (`implementation='auto'`): k x k convolutions at stride 1 run the library forward
and input gradient and the per-tap kernel gradient; 1x1 convolutions are `einsum`s (one
matrix product; the library's kernel gradient of the 512 -> 150 classifier took 0.24 s).
Strided convolutions and other backends ('conv') keep `lax.conv_general_dilated`. The values
and both gradients equal the library convolution's up to float32 rounding (tested). The
whole training step (`benchmarks/train_speed.py`) went from 14.6 to 11.0 s at 512x512 batch 2
with this alone.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from cvt_backbone.kernels import resolve

IMPLEMENTATIONS = ('auto', 'matmul', 'conv')
_DIMENSIONS = ('NHWC', 'HWIO', 'NHWC')


def _library_conv(x, kernel, padding: int, dilation: int, stride: int = 1):
  return lax.conv_general_dilated(
      x, kernel, window_strides=(stride, stride), padding=((padding, padding),) * 2,
      rhs_dilation=(dilation, dilation), dimension_numbers=_DIMENSIONS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_matmul_grads(x, kernel, padding: int, dilation: int):
  return _library_conv(x, kernel, padding, dilation)


def _forward(x, kernel, padding, dilation):
  return _library_conv(x, kernel, padding, dilation), (x, kernel)


def kernel_grad_by_taps(x: jax.Array, g: jax.Array, kernel_shape, padding: int,
                        dilation: int) -> jax.Array:
  """The kernel gradient of a stride-1 convolution as one matrix product per tap.

  Tap `(i, j)` read input position `q` for output `q + padding - (i, j) * dilation`, so its
  gradient is `x^T @ g` with `g` shifted by that offset (zeros outside): the output gradient
  is shifted, not the input, because it is the narrower of the two in a decode head
  (512 channels against 1536-2432). Static slices in an unrolled loop: 1.18 s for UPerNet's
  1536 -> 512 fusion conv at 128x128 batch 2, against 1.38 s in a `lax.scan` and 4.3-6.4 s
  for the library's kernel gradient, with the same temporary memory as the scan under the
  training processes' memory-minimising scheduler (`projects.training.xla_flags`).

  Args:
    x: `[N, H, W, C_in]`, the convolution's input.
    g: `[N, Ho, Wo, C_out]`, the gradient of its output.
    kernel_shape: `(kh, kw, C_in, C_out)`.
    padding: zero padding on every side.
    dilation: kernel dilation.

  Returns:
    `[kh, kw, C_in, C_out]`.
  """
  kh, kw, c_in, c_out = kernel_shape
  _, h, w, _ = x.shape
  out_h, out_w = g.shape[1:3]
  # Rows `(k - 1) d - p` before and `H + p - Ho` (the same) after; negative pads crop output
  # positions that read padding alone, which no tap of `x` needs.
  pads = [(0, 0, 0), ((kh - 1) * dilation - padding, h + padding - out_h, 0),
          ((kw - 1) * dilation - padding, w + padding - out_w, 0), (0, 0, 0)]
  gp = lax.pad(g, jnp.zeros((), g.dtype), pads)
  grads = []
  for i in range(kh):
    for j in range(kw):
      top, left = (kh - 1 - i) * dilation, (kw - 1 - j) * dilation
      shifted = gp[:, top:top + h, left:left + w]
      grads.append(jnp.einsum('nhwd,nhwc->cd', shifted, x))
  return jnp.stack(grads).reshape(kh, kw, c_in, c_out)


def _backward(padding, dilation, residuals, g):
  """The input's gradient by the library (a transposed convolution, as fast as the
  forward); the kernel's as matrix products (`kernel_grad_by_taps`)."""
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda x: _library_conv(x, kernel, padding, dilation), x)
  (input_grad,) = input_vjp(g)
  kernel_grad = kernel_grad_by_taps(x, g, kernel.shape, padding, dilation)
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
  backend = resolve('dense conv', implementation, IMPLEMENTATIONS, cpu='matmul', other='conv')
  if backend == 'conv' or stride != 1:
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
