"""The input normalisation the released weights expect: RGB in [0, 1] standardised with
ImageNet's mean and std (the official `ToTensor` + `Normalize`, the Hugging Face processor)."""

from __future__ import annotations

import jax.numpy as jnp

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(images, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> jnp.ndarray:
  """RGB pixels in [0, 255] `[..., H, W, 3]` -> float32 `(images / 255 - mean) / std`."""
  images = jnp.asarray(images)
  if images.ndim < 3 or images.shape[-1] != 3:
    raise ValueError(f'normalize expects RGB images [..., H, W, 3], got shape {images.shape}')
  scaled = images.astype(jnp.float32) / 255.0
  return (scaled - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
