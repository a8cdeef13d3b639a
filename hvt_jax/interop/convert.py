"""Convert a checkpoint of the official PyTorch HVT release into an hvt_jax model dir.

  python -m hvt_jax.convert --pytorch=hvt_ti_1.pth --output=/tmp/hvt_ti_1

The variant (width, depth, patch and image size, pooling blocks, classes) is read
from the tensors themselves; the file is read without PyTorch and without running
any pickled code (`pth_reader.py`). Then `hvt_jax.load('/tmp/hvt_ti_1')` returns
`(model, params)`.
"""
from __future__ import annotations

import collections
import math
import os
import re

from absl import flags
import numpy as np
import tqdm

from hvt_jax import model as model_lib
from hvt_jax import model_dir
from hvt_jax.data import input_spec
from hvt_jax.errors import UserError
from hvt_jax.interop import pth_reader


class ConvertError(UserError):
  """The state dict does not describe an HVT/DeiT model this code can build."""


def state_dict_of(checkpoint_obj, key: str | None = None) -> dict[str, np.ndarray]:
  """The model's tensors: `obj[key]`, else `obj['model']`, else the object itself."""
  if key is not None:
    if not isinstance(checkpoint_obj, dict) or key not in checkpoint_obj:
      raise ConvertError(f'the checkpoint has no entry {key!r}.')
    return checkpoint_obj[key]
  if isinstance(checkpoint_obj, dict) and isinstance(checkpoint_obj.get('model'), dict):
    return checkpoint_obj['model']
  if isinstance(checkpoint_obj, dict) and all(isinstance(v, np.ndarray) for v in checkpoint_obj.values()):
    return checkpoint_obj
  raise ConvertError("no state dict found: expected {'model': state_dict, ...} or a bare state dict.")


def infer_config(sd: dict[str, np.ndarray]) -> dict:
  """`HVT` fields that reproduce the tensor shapes of an official state dict."""
  try:
    width, _, patch, _ = sd['patch_embed.proj.weight'].shape
    class_token = 'cls_token' in sd
    n0 = sd['pos_embed'].shape[1] - int(class_token)
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r'blocks\.(\d+)\.', k)))
    hidden = sd['blocks.0.mlp.fc1.weight'].shape[0]
    num_classes = sd['head.weight'].shape[0]
  except (KeyError, ValueError, IndexError) as e:
    raise ConvertError(f'not an HVT/DeiT state dict (missing or malformed {e}).') from None
  side = math.isqrt(n0)
  if side * side != n0 or width % 64:
    raise ConvertError(f'unsupported shapes: {n0} patch tokens (not a square) or width {width} '
                       '(not 64 x heads).')
  pooling = [i for i in range(depth) if f'blocks.{i}.pos_embed' in sd]
  if not pooling:
    pool_every = 0
  elif len(pooling) == 1:
    pool_every = depth  # only block 0 pools (HVT-x-1)
  else:
    pool_every = pooling[1]
  config = dict(image_size=side * patch, patch_size=patch, num_heads=width // 64, head_dim=64,
                depth=depth, mlp_ratio=hidden / width, pool_every=pool_every,
                num_classes=num_classes, class_token=class_token)
  try:
    counts = model_lib.tokens_per_block(**config)
  except model_lib.ConfigError as e:
    raise ConvertError(f'the tensors describe an impossible model: {e}') from None
  expected_pools = [i for i in range(depth) if model_lib.pools_at(i, pool_every)]
  if pooling != expected_pools:
    raise ConvertError(f'pooling blocks {pooling} do not follow the every-k rule of HVT.')
  for i in pooling:
    got = sd[f'blocks.{i}.pos_embed'].shape[1]
    if got != counts[i + 1]:
      raise ConvertError(f'blocks.{i}.pos_embed has {got} tokens, but kernel-3 stride-2 pooling '
                         f'gives {counts[i + 1]}: unsupported pooling settings.')
  return config


# How each official tensor maps onto the `HVT` tree; every kind's layout change is a transpose.
_TO_FLAX = {'same': lambda a: a, 'linear': lambda a: a.T,
            'conv': lambda a: a.transpose(2, 3, 1, 0)}  # OIHW -> HWIO
_TO_TORCH = {'same': lambda a: a, 'linear': lambda a: a.T,
             'conv': lambda a: a.transpose(3, 2, 0, 1)}  # HWIO -> OIHW


def official_layout(config: dict) -> list[tuple[str, tuple[str, ...], str]]:
  """(official tensor name, path in the `HVT` parameter tree, layout kind) for every tensor."""
  entries = [('pos_embed', ('pos_embed',), 'same')]
  if config['class_token']:
    entries.append(('cls_token', ('cls_token',), 'same'))
  entries += [('patch_embed.proj.weight', ('patch_embed', 'kernel'), 'conv'),
              ('patch_embed.proj.bias', ('patch_embed', 'bias'), 'same')]

  def linear(name, path):
    return [(f'{name}.weight', path + ('kernel',), 'linear'), (f'{name}.bias', path + ('bias',), 'same')]

  def norm(name, path):
    return [(f'{name}.weight', path + ('scale',), 'same'), (f'{name}.bias', path + ('bias',), 'same')]

  for i in range(config['depth']):
    b, f = f'blocks.{i}', (f'blocks_{i}',)
    if model_lib.pools_at(i, config['pool_every']):
      entries.append((f'{b}.pos_embed', f + ('pos_embed',), 'same'))
    entries += norm(f'{b}.norm1', f + ('norm1',))
    entries += linear(f'{b}.attn.qkv', f + ('attn', 'qkv')) + linear(f'{b}.attn.proj', f + ('attn', 'proj'))
    entries += norm(f'{b}.norm2', f + ('norm2',))
    entries += linear(f'{b}.mlp.fc1', f + ('mlp', 'fc1')) + linear(f'{b}.mlp.fc2', f + ('mlp', 'fc2'))
  return entries + norm('norm', ('norm',)) + linear('head', ('head',))


def to_flax(sd: dict[str, np.ndarray], config: dict) -> dict:
  """Maps PyTorch names and layouts onto the `HVT` parameter tree (all float32)."""
  layout = official_layout(config)
  unused = sorted(set(sd) - {name for name, _, _ in layout})
  if unused:
    raise ConvertError(f'tensors this model has no place for: {unused[:5]}'
                       f'{" ..." if len(unused) > 5 else ""} (distilled or modified models are '
                       'not supported).')
  missing = [name for name, _, _ in layout if name not in sd]
  if missing:
    raise ConvertError(f'the state dict lacks {missing[:5]}{" ..." if len(missing) > 5 else ""}: '
                       'the file is incomplete.')
  params = {}
  for name, path, kind in layout:
    node = params
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = _TO_FLAX[kind](np.asarray(sd[name], np.float32))
  return params


def to_official(params, config: dict) -> collections.OrderedDict:
  """The inverse of `to_flax`: official names and layouts (float32 numpy), in the release's order."""
  sd = collections.OrderedDict()
  for name, path, kind in official_layout(config):
    node = params
    for part in path:
      node = node[part]
    sd[name] = np.ascontiguousarray(_TO_TORCH[kind](np.asarray(node, np.float32)))
  return sd


def read(pytorch_path: str, key: str | None = None,
         progress: bool = False) -> tuple[model_lib.HVT, dict]:
  """`(model, params)` from a checkpoint in the official layout.

  `progress`: show a bar (on stderr) while the tensors are read.
  """
  size = os.path.getsize(pytorch_path) if os.path.isfile(pytorch_path) else None
  with tqdm.tqdm(total=size, unit='B', unit_scale=True, desc=f'reading {pytorch_path}',
                 disable=not progress, leave=False) as bar:
    sd = state_dict_of(pth_reader.load(pytorch_path, progress=bar.update), key)
  config = infer_config(sd)
  return model_lib.HVT(**config), to_flax(sd, config)


def convert(pytorch_path: str, output: str, key: str | None = None, progress: bool = False) -> str:
  """Reads an official checkpoint and writes a model dir; returns its path."""
  model, params = read(pytorch_path, key, progress)
  return save(output, model, params, source=f'converted from {pytorch_path}')


def save(output: str, model: model_lib.HVT, params, **meta) -> str:
  """A model dir for official weights; `meta` goes into model.json (`source`, ...)."""
  # The official models were evaluated with the recipe's ImageNet transform.
  return model_dir.save_model(output, model, params, preprocess=input_spec.eval_transform(),
                              **meta)


FLAGS = flags.FLAGS


def define_flags() -> None:
  """Only when run as a program: importing the module defines no flags."""
  flags.DEFINE_string('pytorch', None, 'checkpoint in the official release layout (.pth)')
  flags.DEFINE_string('output', None, 'new directory for the hvt_jax model')
  flags.DEFINE_string('key', None, "entry holding the state dict (default 'model', else the whole file)")
  flags.mark_flags_as_required(['pytorch', 'output'])


def main(argv):
  del argv
  out = convert(FLAGS.pytorch, FLAGS.output, FLAGS.key, progress=True)
  model, params = model_dir.restore(model_dir.read(out), sharding='cpu')
  print(f'wrote {out}: {model_lib.param_count(params):,} parameters, '
        f'tokens per block {model.tokens_per_block()}')

