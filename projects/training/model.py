"""What the projects' Scenic model classes share: a CvT backbone from `config.model`.

Built as `Model(config, dataset_meta_data)` with Scenic's protocol (`flax_model`,
`default_flax_model_config`, `init_from_train_state`, `get_metrics_fn[_jit]`). A subclass
builds its flax model (a `PretrainedBackboneInit` module, whose `init` loads
`config.model.backbone.pretrained`) and its `metrics(outputs, batch, axis_name=...)`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from cvt_backbone import CvTBackbone, build_backbone, pretrained_settings
from cvt_backbone.cvt import check_keys
from projects.training import scenic_compat
from projects.training.configs import as_dict


class CvTModel:
  """A Scenic model class around a flax model with a CvT backbone."""

  def __init__(self, config: ml_collections.ConfigDict | None,
               dataset_meta_data: dict[str, Any]):
    if config is None:
      config = ml_collections.ConfigDict({'model': self.default_model_config()})
    self.config = config
    self.dataset_meta_data = dataset_meta_data
    self.flax_model = self.build_flax_model()

  @classmethod
  def default_model_config(cls) -> ml_collections.ConfigDict:
    """`config.model` with every default."""
    raise NotImplementedError

  def default_flax_model_config(self) -> ml_collections.ConfigDict:
    return self.default_model_config()

  @property
  def num_classes(self) -> int:
    return int(self.dataset_meta_data['num_classes'])

  def model_config(self, key: str) -> dict[str, Any]:
    """`config.model.<key>` as a dict."""
    return as_dict(self.config.model.get(key))

  def settings(self, key: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """`config.<key>` over `defaults`; an unknown key is an error naming the known ones."""
    values = as_dict(self.config.get(key))
    check_keys(values, defaults, f'config.{key}')
    return {**defaults, **values}

  def build_backbone(self) -> CvTBackbone:
    return build_backbone(self.model_config('backbone'))

  def pretrained_fields(self) -> dict[str, Any]:
    """`pretrained` and `keep_cls_token` of the flax model, from `config.model.backbone`."""
    pretrained, keep_cls_token = pretrained_settings(self.model_config('backbone'))
    return dict(pretrained=pretrained, keep_cls_token=keep_cls_token)

  def init_variables(self, rng: jax.Array, input_shape: tuple[int, ...]) -> dict[str, Any]:
    """Fresh variables, with the backbone from `config.model.backbone.pretrained` if set."""
    dummy = jnp.zeros((1, *input_shape[1:]), jnp.float32)
    return dict(self.flax_model.init(rng, dummy, train=False))

  def init_from_train_state(self, train_state: Any, restored_train_state: Any = None,
                            restored_model_cfg: Any = None) -> Any:
    """Scenic project trainers' pretrained hook (`PretrainedBackboneInit.load_into_train_state`)."""
    del restored_model_cfg
    return self.flax_model.load_into_train_state(train_state, restored_train_state)

  def get_metrics_fn(self, split: str | None = None):
    """`metrics_fn(outputs, batch) -> {name: (sum, normalizer)}`, summed over 'batch' (pmap)."""
    del split
    return functools.partial(self.metrics, axis_name=scenic_compat.SCENIC_AXIS_NAME)

  def get_metrics_fn_jit(self, split: str | None = None):
    """As `get_metrics_fn`, for jit-based trainers (global arrays: no cross-device sum)."""
    del split
    return functools.partial(self.metrics, axis_name=None)

  def metrics(self, outputs: Any, batch: dict[str, jax.Array], *,
              axis_name: str | None) -> dict[str, tuple]:
    raise NotImplementedError
