"""Reference checkpoints for the conversion tests: Hugging Face CvT models with random weights.

Shared by test_convert.py, test_checkpoint.py and test_parity.py (it holds no tests).
Every checkpoint is built here from a `CvtConfig` and saved with `save_pretrained`;
nothing is downloaded.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

# The 'cvt-tiny' spec of cvt.py.
TINY = dict(embed_dim=[16, 32, 48], num_heads=[1, 2, 3], depth=[1, 1, 2])
TINY_CLASSES = 10


def randomize_(model, seed: int) -> None:
  """Non-trivial norms: BatchNorm running statistics, scales and shifts; LayerNorm affine."""
  gen = torch.Generator().manual_seed(seed)

  def rand(t, scale, shift=0.0, uniform=False):
    sample = torch.rand if uniform else torch.randn
    t.copy_(sample(t.shape, generator=gen) * scale + shift)

  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        rand(module.running_mean, 0.5)
        rand(module.running_var, 1.5, 0.5, uniform=True)  # positive
        rand(module.weight, 1.0, 0.5, uniform=True)
        rand(module.bias, 0.2)
      elif isinstance(module, torch.nn.LayerNorm):
        rand(module.weight, 0.2, 1.0)
        rand(module.bias, 0.1)


def make_hf_classifier(config: dict, num_labels: int, seed: int = 0,
                       initializer_range: float = 0.02):
  """`CvtForImageClassification` in eval mode with random weights and BN statistics."""
  torch.manual_seed(seed)
  depth = list(config['depth'])
  # transformers' CvtStage indexes its drop path rates by the stage instead of the
  # layer, so stage i needs more than i layers; build deeper, then cut back.
  buildable = [max(d, i + 1) for i, d in enumerate(depth)]
  hf_config = transformers.CvtConfig(**{**config, 'depth': buildable}, num_labels=num_labels,
                                     initializer_range=initializer_range)
  model = transformers.CvtForImageClassification(hf_config).eval()
  for stage, d in zip(model.cvt.encoder.stages, depth, strict=True):
    stage.layers = torch.nn.Sequential(*list(stage.layers)[:d])
  model.config.depth = depth
  randomize_(model, seed)
  return model


def numpy_state_dict(model) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


_QKV = {'query': 'q', 'key': 'k', 'value': 'v'}


def to_official_names(state_dict: dict) -> dict:
  """Hugging Face -> official microsoft/CvT key names, written independently of convert.py."""
  out = {}
  for key, value in state_dict.items():
    k = key.removeprefix('cvt.').replace('encoder.stages.', 'stage')
    k = k.replace('.embedding.convolution_embeddings.projection.', '.patch_embed.proj.')
    k = k.replace('.embedding.convolution_embeddings.normalization.', '.patch_embed.norm.')
    k = k.replace('.layers.', '.blocks.')
    k = k.replace('.layernorm_before.', '.norm1.').replace('.layernorm_after.', '.norm2.')
    k = re.sub(r'\.attention\.attention\.convolution_projection_(query|key|value)'
               r'\.convolution_projection\.convolution\.',
               lambda m: f'.attn.conv_proj_{_QKV[m.group(1)]}.conv.', k)
    k = re.sub(r'\.attention\.attention\.convolution_projection_(query|key|value)'
               r'\.convolution_projection\.normalization\.',
               lambda m: f'.attn.conv_proj_{_QKV[m.group(1)]}.bn.', k)
    k = re.sub(r'\.attention\.attention\.projection_(query|key|value)\.',
               lambda m: f'.attn.proj_{_QKV[m.group(1)]}.', k)
    k = k.replace('.attention.output.dense.', '.attn.proj.')
    k = k.replace('.intermediate.dense.', '.mlp.fc1.').replace('.output.dense.', '.mlp.fc2.')
    if k.startswith('layernorm.'):
      k = 'norm.' + k.removeprefix('layernorm.')
    if k.startswith('classifier.'):
      k = 'head.' + k.removeprefix('classifier.')
    out[k] = value
  return out


def save_hf(model, folder: Path) -> Path:
  """`save_pretrained` (model.safetensors + config.json); returns the weights file."""
  model.save_pretrained(folder)
  return folder / 'model.safetensors'


def build_hf_tiny(tmp_path_factory):
  """(model, model.safetensors path) of a 'cvt-tiny'-shaped Hugging Face classifier.

  For module-scoped fixtures (a fixture imported into several modules trips linters).
  """
  model = make_hf_classifier(TINY, TINY_CLASSES, seed=0)
  path = save_hf(model, tmp_path_factory.mktemp('hf_tiny'))
  return model, path
