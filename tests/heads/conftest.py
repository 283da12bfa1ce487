"""Fixtures of the heads' tests."""

import jax
import pytest


@pytest.fixture
def highest_precision():
  """float32 matmuls at full precision (accelerators default to bf16 passes) for the test."""
  previous = jax.config.jax_default_matmul_precision
  jax.config.update('jax_default_matmul_precision', 'highest')
  yield
  jax.config.update('jax_default_matmul_precision', previous)
