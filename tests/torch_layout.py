"""Test helpers that stand in for PyTorch: write `.pth` files, run the official model in numpy.

`write_pth` produces the same zip + pickle layout `torch.save` writes (the
package's `pth_writer`), so the converter reads it through its real code path.
`reference_logits` is an independent numpy implementation of the official forward pass on the
PyTorch-layout state dict (OIHW conv, (out, in) Linear weights).
"""
from __future__ import annotations

import collections

import numpy as np
from scipy.special import erf

from hvt_jax.interop import pth_writer

# A tensor record claiming any offset, shape and strides over a storage (hostile files).
View = pth_writer.StorageView


def write_pth(path, obj, archive_name='archive'):
  """`torch.save(obj, path)` for objects of dicts, numpy arrays and plain values."""
  pth_writer.write(path, obj, archive_name)


def random_state_dict(rng, *, width, depth, patch, image, classes, pooling_blocks, pooled_tokens,
                      mlp_ratio=4, class_token=False):
  """Random tensors named and shaped as in the official release."""
  n0 = (image // patch) ** 2 + int(class_token)
  hidden = int(width * mlp_ratio)
  r = lambda *shape: rng.normal(0, 0.2, shape).astype(np.float32)
  sd = collections.OrderedDict(pos_embed=r(1, n0, width))
  if class_token:
    sd['cls_token'] = r(1, 1, width)
  sd['patch_embed.proj.weight'] = r(width, 3, patch, patch)
  sd['patch_embed.proj.bias'] = r(width)
  for i in range(depth):
    b = f'blocks.{i}'
    if i in pooling_blocks:
      sd[f'{b}.pos_embed'] = r(1, pooled_tokens[pooling_blocks.index(i)], width)
    for name, shape in [('norm1', (width,)), ('attn.qkv', (3 * width, width)),
                        ('attn.proj', (width, width)), ('norm2', (width,)),
                        ('mlp.fc1', (hidden, width)), ('mlp.fc2', (width, hidden))]:
      sd[f'{b}.{name}.weight'] = r(*shape) + (1 if name.startswith('norm') else 0)
      sd[f'{b}.{name}.bias'] = r(shape[0])
  sd['norm.weight'] = r(width) + 1
  sd['norm.bias'] = r(width)
  sd['head.weight'] = r(classes, width)
  sd['head.bias'] = r(classes)
  return sd


def _layer_norm(x, w, b):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-6) * w + b


def reference_logits(sd, x_nchw, num_heads, class_token=False):
  """The official model's eval forward pass, in float64 numpy, on a PyTorch-layout state dict."""
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  w = sd['patch_embed.proj.weight']
  width, _, p, _ = w.shape
  b, c, h, wd = x_nchw.shape
  patches = x_nchw.reshape(b, c, h // p, p, wd // p, p).transpose(0, 2, 4, 1, 3, 5)
  x = patches.reshape(b, -1, c * p * p) @ w.reshape(width, -1).T + sd['patch_embed.proj.bias']
  if class_token:
    x = np.concatenate([np.repeat(sd['cls_token'], b, 0), x], 1)
  x = x + sd['pos_embed']
  hd = width // num_heads
  i = 0
  while f'blocks.{i}.norm1.weight' in sd:
    g = lambda name: sd[f'blocks.{i}.{name}']
    y = _layer_norm(x, g('norm1.weight'), g('norm1.bias'))
    qkv = (y @ g('attn.qkv.weight').T + g('attn.qkv.bias')).reshape(b, -1, 3, num_heads, hd)
    q, k, v = qkv.transpose(2, 0, 3, 1, 4)
    a = q @ k.transpose(0, 1, 3, 2) * hd ** -0.5
    a = np.exp(a - a.max(-1, keepdims=True))
    a = a / a.sum(-1, keepdims=True)
    y = (a @ v).transpose(0, 2, 1, 3).reshape(b, -1, width)
    x = x + y @ g('attn.proj.weight').T + g('attn.proj.bias')
    y = _layer_norm(x, g('norm2.weight'), g('norm2.bias'))
    y = y @ g('mlp.fc1.weight').T + g('mlp.fc1.bias')
    y = 0.5 * y * (1 + erf(y / np.sqrt(2)))
    x = x + y @ g('mlp.fc2.weight').T + g('mlp.fc2.bias')
    if f'blocks.{i}.pos_embed' in sd:
      n_out = (x.shape[1] - 3) // 2 + 1
      x = np.stack([x[:, 2 * j:2 * j + 3].max(1) for j in range(n_out)], 1)
      x = x + g('pos_embed')
    i += 1
  x = _layer_norm(x, sd['norm.weight'], sd['norm.bias'])
  x = x[:, 0] if class_token else x.mean(1)
  return x @ sd['head.weight'].T + sd['head.bias']


def official_module(torch, config):
  """A torch module with the official HVT/DeiT parameter names and shapes (no forward pass), to
  check that a state dict loads with `load_state_dict(strict=True)`."""
  from hvt_jax import model as model_lib
  nn = torch.nn
  width = config['num_heads'] * config['head_dim']
  hidden = int(width * config['mlp_ratio'])
  counts = model_lib.tokens_per_block(**config)
  model = nn.Module()
  if config['class_token']:
    model.cls_token = nn.Parameter(torch.zeros(1, 1, width))
  model.pos_embed = nn.Parameter(torch.zeros(1, counts[0], width))
  model.patch_embed = nn.Module()
  model.patch_embed.proj = nn.Conv2d(3, width, config['patch_size'], config['patch_size'])
  blocks = []
  for i in range(config['depth']):
    block = nn.Module()
    block.norm1, block.norm2 = nn.LayerNorm(width, eps=1e-6), nn.LayerNorm(width, eps=1e-6)
    block.attn, block.mlp = nn.Module(), nn.Module()
    block.attn.qkv, block.attn.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
    block.mlp.fc1, block.mlp.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)
    if model_lib.pools_at(i, config['pool_every']):
      block.pos_embed = nn.Parameter(torch.zeros(1, counts[i + 1], width))
    blocks.append(block)
  model.blocks = nn.ModuleList(blocks)
  model.norm = nn.LayerNorm(width, eps=1e-6)
  model.head = nn.Linear(width, config['num_classes'])
  return model
