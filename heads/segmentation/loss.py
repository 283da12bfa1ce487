"""Per-pixel cross-entropy of a head's logits against full-size labels, resized in the loss.

mmseg upsamples logits to the labels, then takes the cross-entropy: at 512x512, 150 classes,
batch 2 that is 300 MB each of logits, log-softmax and gradient per head. Here the bilinear
resize is a pair of matrices (`bilinear_matrix`, the weights of `resize_bilinear`) applied a
block of label rows at a time in a loop rematerialised in the backward pass: the same value and
gradient with one block of full-size logits in memory.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from heads.resampling import bilinear_matrix

# Upsampled logits per block of rows; the block's log-softmax and gradient are as large.
BLOCK_BYTES = 32 * 2**20


def cross_entropy_sum(logits: jax.Array, labels: jax.Array, weights: jax.Array, *,
                      label_smoothing: float = 0.0, align_corners: bool = False,
                      block_bytes: int = BLOCK_BYTES) -> jax.Array:
  """`sum(weights * CE(resize(logits), labels))` over every pixel, in float32.

  `logits` `[B, h, w, K]` are resized bilinearly to the size of `labels` `[B, H, W]` (int;
  anything where `weights` `[B, H, W]` is 0, e.g. 255 for ignore) when it differs;
  `block_bytes` bounds the float32 upsampled logits computed at once.
  """
  batch, height, width = labels.shape
  num_classes = logits.shape[-1]
  if logits.ndim != 4 or logits.shape[0] != batch:
    raise ValueError(f'logits [B, h, w, K] for labels {tuple(labels.shape)}; got '
                     f'{tuple(logits.shape)}.')
  logits = logits.astype(jnp.float32)
  if logits.shape[1:3] == (height, width):
    return jnp.sum(_pixel_losses(logits, labels, label_smoothing) * weights)

  rows_h = bilinear_matrix(logits.shape[1], height, align_corners=align_corners)
  rows_w = bilinear_matrix(logits.shape[2], width, align_corners=align_corners)
  # Resize the columns once ([h, B, W, K], input rows first for the row products below).
  columns = jnp.einsum('Ww,bhwk->hbWk', jnp.asarray(rows_w), logits,
                       precision=lax.Precision.HIGHEST)
  rows = max(1, min(height, block_bytes // (4 * batch * width * num_classes)))
  blocks = math.ceil(height / rows)
  pad = blocks * rows - height
  # Rows past the labels get zero weights (and zero interpolation rows).
  rows_h = np.pad(rows_h, ((0, pad), (0, 0))).reshape(blocks, rows, -1)

  def by_rows(x):  # [B, H, W] -> [blocks, rows, B, W]
    x = jnp.pad(jnp.moveaxis(x, 1, 0), ((0, pad), (0, 0), (0, 0)))
    return x.reshape(blocks, rows, batch, width)

  def step(total, block):
    return total + _block_loss(columns, *block, label_smoothing), None

  total, _ = lax.scan(step, jnp.zeros((), jnp.float32),
                      (jnp.asarray(rows_h), by_rows(labels), by_rows(weights)))
  return total


def _upsample_rows(interpolation: jax.Array, columns: jax.Array) -> jax.Array:
  return jnp.einsum('rh,hbwk->rbwk', interpolation, columns, precision=lax.Precision.HIGHEST)


def _targets(labels: jax.Array, num_classes: int, label_smoothing: float) -> jax.Array:
  # 255 (ignore) and other out-of-range labels give zero targets; their weight is 0.
  targets = jax.nn.one_hot(labels, num_classes)
  if label_smoothing:
    targets = targets * (1 - label_smoothing) + label_smoothing / num_classes
  return targets


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _block_loss(columns, interpolation, labels, weights, label_smoothing):
  # One block of rows; the gradient below recomputes the logits and goes to `softmax - targets`.
  logits = _upsample_rows(interpolation, columns)
  targets = _targets(labels, logits.shape[-1], label_smoothing)
  lse = jax.nn.logsumexp(logits, axis=-1)
  losses = lse * jnp.sum(targets, axis=-1) - jnp.sum(targets * logits, axis=-1)
  return jnp.sum(losses * weights)


def _block_loss_forward(columns, interpolation, labels, weights, label_smoothing):
  loss = _block_loss(columns, interpolation, labels, weights, label_smoothing)
  return loss, (columns, interpolation, labels, weights)


def _block_loss_backward(label_smoothing, residuals, g):
  columns, interpolation, labels, weights = residuals
  logits = _upsample_rows(interpolation, columns)
  targets = _targets(labels, logits.shape[-1], label_smoothing)
  probs = jax.nn.softmax(logits, axis=-1)
  grad = (probs * jnp.sum(targets, axis=-1, keepdims=True) - targets) * (g * weights)[..., None]
  columns_grad = jnp.einsum('rh,rbwk->hbwk', interpolation, grad,
                            precision=lax.Precision.HIGHEST)
  return columns_grad, None, None, None


_block_loss.defvjp(_block_loss_forward, _block_loss_backward)


def _pixel_losses(logits: jax.Array, labels: jax.Array, label_smoothing: float) -> jax.Array:
  targets = _targets(labels, logits.shape[-1], label_smoothing)
  return -jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1)
