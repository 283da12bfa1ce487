"""Every config loads, is locked, documents its command and builds its model."""

import importlib
import pathlib

import jax
import jax.numpy as jnp
import pytest

from projects.cvt_segmentation import models

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[2] / 'projects/cvt_segmentation/configs'
CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob('*.py') if p.stem not in ('__init__', 'common'))


def _module(name):
  return importlib.import_module(f'projects.cvt_segmentation.configs.{name}')


@pytest.mark.parametrize('name', CONFIGS)
def test_config_loads_locked_with_command(name):
  module = _module(name)
  assert 'python -m projects.cvt_segmentation.main' in module.__doc__
  assert f'configs/{name}.py' in module.__doc__
  for arg in (None, 'runlocal'):
    config = module.get_config(arg)
    assert config.is_locked
    assert config.model_name in models.MODELS
    with pytest.raises(AttributeError):
      config.no_such_setting = 1
  full, local = module.get_config(), module.get_config('runlocal')
  assert local.num_training_steps < full.num_training_steps
  assert local.model.backbone.variant == 'cvt-tiny'


@pytest.mark.parametrize('name', CONFIGS)
def test_config_model_builds_and_segments(name):
  config = _module(name).get_config()
  model = models.get_model_cls(config.model_name)(config, {'num_classes': 19})
  images = jax.ShapeDtypeStruct((2, 97, 131, 3), jnp.float32)

  def forward(x):
    variables = model.flax_model.init(jax.random.PRNGKey(0), x)
    return model.flax_model.apply(variables, x)

  out = jax.eval_shape(forward, images)
  assert out['logits'].shape == (2, 97, 131, 19)
