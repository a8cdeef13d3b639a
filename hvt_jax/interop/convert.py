"""Convert a checkpoint of the official PyTorch HVT release into an hvt_jax model dir.

  python -m hvt_jax.convert --pytorch=hvt_ti_1.pth --output=/tmp/hvt_ti_1

The variant (width, depth, patch and image size, pooling blocks, classes) is read
from the tensors themselves; the file is read without PyTorch and without running
any pickled code (`pth_reader.py`). Then `hvt_jax.load('/tmp/hvt_ti_1')` returns
`(model, params)`.
"""
from __future__ import annotations

import math
import os
import re

from absl import flags
import numpy as np
import tqdm

from hvt_jax import defaults
from hvt_jax.training import checkpoint
from hvt_jax.interop import pth_reader
from hvt_jax import model as model_lib
from hvt_jax.errors import UserError


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


def to_flax(sd: dict[str, np.ndarray], config: dict) -> dict:
  """Maps PyTorch names and layouts onto the `HVT` parameter tree (all float32)."""
  sd = {k: np.asarray(v, np.float32) for k, v in sd.items()}
  used = set()

  def take(key):
    used.add(key)
    return sd[key]

  def linear(prefix):
    return {'kernel': take(f'{prefix}.weight').T, 'bias': take(f'{prefix}.bias')}

  def norm(prefix):
    return {'scale': take(f'{prefix}.weight'), 'bias': take(f'{prefix}.bias')}

  params = {
      'patch_embed': {'kernel': take('patch_embed.proj.weight').transpose(2, 3, 1, 0),  # OIHW->HWIO
                      'bias': take('patch_embed.proj.bias')},
      'pos_embed': take('pos_embed'),
      'norm': norm('norm'),
      'head': linear('head'),
  }
  if config['class_token']:
    params['cls_token'] = take('cls_token')
  for i in range(config['depth']):
    b = f'blocks.{i}'
    block = {'norm1': norm(f'{b}.norm1'), 'norm2': norm(f'{b}.norm2'),
             'attn': {'qkv': linear(f'{b}.attn.qkv'), 'proj': linear(f'{b}.attn.proj')},
             'mlp': {'fc1': linear(f'{b}.mlp.fc1'), 'fc2': linear(f'{b}.mlp.fc2')}}
    if f'{b}.pos_embed' in sd:
      block['pos_embed'] = take(f'{b}.pos_embed')
    params[f'blocks_{i}'] = block
  unused = sorted(set(sd) - used)
  if unused:
    raise ConvertError(f'tensors this model has no place for: {unused[:5]}'
                       f'{" ..." if len(unused) > 5 else ""} (distilled or modified models are '
                       'not supported).')
  return params


def convert(pytorch_path: str, output: str, key: str | None = None, progress: bool = False) -> str:
  """Reads an official checkpoint and writes a model dir; returns its path.

  `progress`: show a bar (on stderr) while the tensors are read.
  """
  size = os.path.getsize(pytorch_path) if os.path.isfile(pytorch_path) else None
  with tqdm.tqdm(total=size, unit='B', unit_scale=True, desc=f'reading {pytorch_path}',
                 disable=not progress, leave=False) as bar:
    sd = state_dict_of(pth_reader.load(pytorch_path, progress=bar.update), key)
  config = infer_config(sd)
  model = model_lib.HVT(**config)
  params = to_flax(sd, config)
  # The official models were evaluated with the recipe's ImageNet transform.
  preprocess = defaults.eval_preprocess(defaults.train_config().aug)
  return checkpoint.save_model(output, model, params, source=f'converted from {pytorch_path}',
                               preprocess=preprocess)


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
  model, params = checkpoint.load_model_dir(out, sharding='cpu')
  print(f'wrote {out}: {model_lib.param_count(params):,} parameters, '
        f'tokens per block {model.tokens_per_block()}')

