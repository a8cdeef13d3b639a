"""Test helpers that stand in for PyTorch: write `.pth` files, run the official model in numpy.

`write_pth` produces the same zip + pickle layout `torch.save` writes, so the
converter reads it through its real code path. `reference_logits` is an
independent numpy implementation of the official forward pass on the
PyTorch-layout state dict (OIHW conv, (out, in) Linear weights).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import pickle
import sys
import types
import zipfile

import numpy as np
from scipy.special import erf

_DTYPE_STORAGE = {np.dtype(np.float32): 'FloatStorage', np.dtype(np.int64): 'LongStorage'}


@contextlib.contextmanager
def _fake_torch_globals():
  """Makes `torch.FloatStorage` and `torch._utils._rebuild_tensor_v2` picklable by name."""
  torch = types.ModuleType('torch')
  utils = types.ModuleType('torch._utils')
  for name in _DTYPE_STORAGE.values():
    setattr(torch, name, type(name, (), {'__module__': 'torch'}))

  def _rebuild_tensor_v2(*args):
    raise AssertionError('only for pickling')

  _rebuild_tensor_v2.__module__ = 'torch._utils'
  _rebuild_tensor_v2.__qualname__ = '_rebuild_tensor_v2'
  utils._rebuild_tensor_v2 = _rebuild_tensor_v2
  saved = {k: sys.modules.get(k) for k in ('torch', 'torch._utils')}
  sys.modules.update({'torch': torch, 'torch._utils': utils})
  try:
    yield torch, utils
  finally:
    for k, v in saved.items():
      if v is None:
        sys.modules.pop(k, None)
      else:
        sys.modules[k] = v


class _Tensor:
  def __init__(self, array, key, view=None):
    self.array, self.key = np.ascontiguousarray(array), key
    strides = tuple(s // self.array.itemsize for s in self.array.strides)
    self.view = view or (0, self.array.shape, strides)


@dataclasses.dataclass
class View:
  """A tensor record claiming any offset, shape and strides over `storage` (hostile files)."""
  storage: np.ndarray
  offset: int
  shape: tuple
  strides: tuple


def write_pth(path, obj, archive_name='archive'):
  """`torch.save(obj, path)` for objects of dicts, numpy arrays and plain values."""
  storages = []

  def wrap(o):
    if isinstance(o, np.ndarray):
      storages.append(o)
      return _Tensor(o, str(len(storages) - 1))
    if isinstance(o, View):  # views of one storage object share one storage record
      index = next((i for i, a in enumerate(storages) if a is o.storage), None)
      if index is None:
        storages.append(o.storage)
        index = len(storages) - 1
      return _Tensor(o.storage, str(index), (o.offset, o.shape, o.strides))
    if isinstance(o, collections.OrderedDict):
      return collections.OrderedDict((k, wrap(v)) for k, v in o.items())
    if isinstance(o, dict):
      return {k: wrap(v) for k, v in o.items()}
    return o

  with _fake_torch_globals() as (torch, utils):

    class Pickler(pickle.Pickler):
      def persistent_id(self, o):
        if isinstance(o, tuple) and len(o) == 2 and o[0] == '__storage__':
          t = o[1]
          return ('storage', getattr(torch, _DTYPE_STORAGE[t.array.dtype]), t.key, 'cuda:0', t.array.size)
        return None

      def reducer_override(self, o):
        if isinstance(o, _Tensor):
          offset, shape, strides = o.view
          return utils._rebuild_tensor_v2, (('__storage__', o), offset, shape, strides, False,
                                            collections.OrderedDict())
        return NotImplemented

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(wrap(obj))
  with zipfile.ZipFile(path, 'w') as z:
    z.writestr(f'{archive_name}/data.pkl', buf.getvalue())
    z.writestr(f'{archive_name}/byteorder', 'little')
    for i, array in enumerate(storages):
      z.writestr(f'{archive_name}/data/{i}', np.ascontiguousarray(array).tobytes())


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
