"""mmsegmentation's and mmdetection's fine-tuning optimizer in optax.

AdamW, linear warmup then poly (mmseg) or step decay (mmdet 1x); no weight decay on norms,
biases and the cls token; layer-wise lr decay over the backbone (BEiT/Swin: the last block
gets the base rate, each earlier one `layer_decay` times less); a head lr multiplier;
clipping; gradient accumulation.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

_STAGE = re.compile(r'stage(\d+)$')
_BLOCK = re.compile(r'blocks_(\d+)$')


def warmup_poly_schedule(base_lr: float, total_steps: int, warmup_steps: int = 1500,
                         warmup_ratio: float = 1e-6, power: float = 1.0,
                         min_lr: float = 0.0) -> optax.Schedule:
  """mmseg's `LinearLR` warmup from `base_lr * warmup_ratio` then `PolyLR` to `min_lr`."""
  warmup_steps = min(warmup_steps, max(total_steps - 1, 0))

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = base_lr * (warmup_ratio + (1 - warmup_ratio) * step / max(warmup_steps, 1))
    progress = jnp.clip((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0, 1.0)
    poly = (base_lr - min_lr) * (1 - progress)**power + min_lr
    return jnp.where(step < warmup_steps, warm, poly)

  return schedule


def warmup_step_schedule(base_lr: float, decay_steps: tuple[int, ...], decay_factor: float = 0.1,
                         warmup_steps: int = 500, warmup_ratio: float = 1e-3) -> optax.Schedule:
  """mmdet's 1x schedule (`schedule_1x.py`): `LinearLR` warmup over 500 iterations from
  0.001 of the rate, then `MultiStepLR(milestones=[8, 11], gamma=0.1)`; milestones in steps."""
  boundaries = tuple(sorted(int(s) for s in decay_steps))

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = warmup_ratio + (1 - warmup_ratio) * step / max(warmup_steps, 1)
    decays = sum((step >= b).astype(jnp.float32) for b in boundaries) if boundaries else 0.0
    return base_lr * jnp.where(step < warmup_steps, warm, 1.0) * decay_factor**decays

  return schedule


def _path_names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)


def weight_decay_mask(params: Any) -> Any:
  """True where weight decay applies: matrices and conv kernels, not norms, biases, cls token."""

  def decays(path, leaf):
    names = _path_names(path)
    return leaf.ndim > 1 and 'cls_token' not in names

  return jax.tree_util.tree_map_with_path(decays, params)


def stage_depths(backbone: Mapping[str, Any]) -> tuple[int, ...]:
  """Blocks per stage of a CvT parameter tree (`stage{i}/blocks_{j}`)."""
  depths = {}
  for stage, subtree in backbone.items():
    if m := _STAGE.match(stage):
      depths[int(m.group(1))] = sum(1 for name in subtree if _BLOCK.match(name))
  return tuple(depths[i] for i in sorted(depths))


def backbone_layer_ids(params: Mapping[str, Any]) -> Any:
  """Layer id of every backbone parameter: 0 for the first embedding, block k (over all
  stages) k+1; a later stage's embedding and cls token share the id of the block before it."""
  depths = stage_depths(params)
  starts = [sum(depths[:i]) for i in range(len(depths))]

  def layer_id(path, _):
    names = _path_names(path)
    stage = next((int(m.group(1)) for n in names if (m := _STAGE.match(n))), None)
    block = next((int(m.group(1)) for n in names if (m := _BLOCK.match(n))), None)
    if stage is None:  # Output norms sit after the last block.
      return sum(depths) + 1
    if block is None:
      return starts[stage]
    return starts[stage] + block + 1

  return jax.tree_util.tree_map_with_path(layer_id, params)


def lr_multipliers(params: Mapping[str, Any], *, layer_decay: float = 1.0,
                   head_lr_mult: float = 1.0, backbone_key: str = 'backbone') -> Any:
  """Per-parameter multiplier of the learning rate (same tree as `params`)."""
  num_layers = sum(stage_depths(params[backbone_key])) + 1

  def for_subtree(key, subtree):
    if key != backbone_key:
      return jax.tree.map(lambda _: head_lr_mult, subtree)
    ids = backbone_layer_ids(subtree)
    return jax.tree.map(lambda i: float(layer_decay**(num_layers - i)), ids)

  return {key: for_subtree(key, subtree) for key, subtree in params.items()}


def scale_by_tree(multipliers: Any) -> optax.GradientTransformation:
  """Multiplies each update by its entry of a fixed tree of scalars."""

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, m: u * m, updates, multipliers), state

  return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(config: Any, params: Mapping[str, Any],
                   total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer of `config.optimizer` and its learning-rate schedule (in updates)."""
  opt = config.optimizer
  # With accumulation, `total_steps` counts micro-batches; the schedule counts updates.
  updates = max(total_steps // max(opt.accumulation_steps, 1), 1)
  kind = opt.get('schedule', 'poly')
  if kind == 'poly':
    schedule = warmup_poly_schedule(opt.base_lr, updates, opt.warmup_steps, opt.warmup_ratio,
                                    opt.power, opt.min_lr)
  elif kind == 'step':
    schedule = warmup_step_schedule(opt.base_lr, tuple(opt.decay_steps), opt.decay_factor,
                                    opt.warmup_steps, opt.warmup_ratio)
  else:
    raise ValueError(f"config.optimizer.schedule must be 'poly' or 'step', got {kind!r}.")
  multipliers = lr_multipliers(params, layer_decay=opt.layer_decay,
                               head_lr_mult=opt.head_lr_mult)
  parts = []
  if opt.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(opt.grad_clip_norm))
  parts += [
      optax.scale_by_adam(b1=opt.b1, b2=opt.b2, eps=1e-8),
      # Decoupled weight decay (AdamW): added after Adam, scaled by the learning rate.
      optax.add_decayed_weights(opt.weight_decay, mask=weight_decay_mask(params)),
      optax.scale_by_learning_rate(schedule),
      scale_by_tree(multipliers),
  ]
  tx = optax.chain(*parts)
  if opt.accumulation_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=opt.accumulation_steps)
  return tx, schedule
