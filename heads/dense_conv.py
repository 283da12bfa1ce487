"""Dense 2-D convolution whose kernel gradient runs as matrix products on CPU.

XLA:CPU computes a convolution's kernel gradient far below its matmul throughput: in the
CvT-13 + UPerNet training step at 512x512 batch 2, 6.4 s for the 1536 -> 512 fusion conv on
the 128x128 map (1.6 s forward, 1.4 s input gradient). As one `[C_in, C_out]` product per tap
(`kernel_grad_by_taps`) it takes 1.2 s, and the step 14.6 -> 11.0 s. So on CPU stride-1 k x k
convs use that kernel gradient and 1x1 convs are `einsum`s; strided convs and other backends
keep `lax.conv_general_dilated`. Values and gradients match it to float32 rounding (tested).
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
  """The `[kh, kw, C_in, C_out]` kernel gradient of a stride-1 conv of x `[N, H, W, C_in]`
  with output gradient g `[N, Ho, Wo, C_out]`, as one matrix product per tap.

  Tap `(i, j)` read input `q` for output `q + padding - (i, j) * dilation`: its gradient is
  `x^T @ g` with `g` shifted (the narrower of the two in a decode head: 512 channels against
  1536-2432). Unrolled static slices: 1.18 s for UPerNet's fusion conv at 128x128 batch 2,
  against 1.38 s in a `lax.scan`, with the same temporary memory.
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
  """The input's gradient by the library (as fast as the forward), the kernel's by taps."""
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda x: _library_conv(x, kernel, padding, dilation), x)
  (input_grad,) = input_vjp(g)
  kernel_grad = kernel_grad_by_taps(x, g, kernel.shape, padding, dilation)
  return input_grad.astype(x.dtype), kernel_grad.astype(kernel.dtype)


_conv_matmul_grads.defvjp(_forward, _backward)


def conv2d(x: jax.Array, kernel: jax.Array, *, stride: int = 1, padding: int = 0,
           dilation: int = 1, implementation: str = 'auto') -> jax.Array:
  """x `[N, H, W, C_in]`, kernel `[kh, kw, C_in, C_out]` -> `[N, Ho, Wo, C_out]`, symmetric zero
  padding, no bias; `implementation` 'matmul', 'conv' or 'auto' (matmul on CPU)."""
  backend = resolve('dense conv', implementation, IMPLEMENTATIONS, cpu='matmul', other='conv')
  if backend == 'conv' or stride != 1:
    return _library_conv(x, kernel, padding, dilation, stride)
  if kernel.shape[:2] == (1, 1) and padding == 0:
    return jnp.einsum('nhwc,cd->nhwd', x, kernel[0, 0])
  return _conv_matmul_grads(x, kernel, padding, dilation)


class Conv(nn.Module):
  """`flax.linen.Conv` (same parameters, names and init) for square kernels, by `conv2d`, in
  the dtype of its input (float32 parameters give bfloat16 compute for bfloat16 features)."""

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
    dtype = x.dtype
    y = conv2d(x, kernel.astype(dtype), stride=self.stride, padding=self.padding,
               dilation=self.dilation, implementation=self.implementation)
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (self.features,)).astype(dtype)
    return y
