"""Read PyTorch `.pth` checkpoints without PyTorch and without trusting the pickle.

`torch.save` (zip format, torch >= 1.6) writes `<name>/data.pkl` plus one raw
file per storage under `<name>/data/`. The pickle may only name the few globals
a checkpoint of tensors, dicts and an `argparse.Namespace` needs; anything else
is refused before it can run. Tensors come back as numpy arrays.
"""
from __future__ import annotations

import argparse
import collections
import io
import pickle
import zipfile

import ml_dtypes
import numpy as np

from hvt_jax.errors import UserError


class PthError(UserError):
  """The file is not a readable, safe PyTorch checkpoint; the message says why."""


STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'BFloat16Storage': ml_dtypes.bfloat16, 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8,
    'BoolStorage': np.bool_,
}


class _StorageType:
  def __init__(self, dtype):
    self.dtype = np.dtype(dtype)


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
  del requires_grad, hooks, metadata
  item = storage.dtype.itemsize
  if not size:
    return storage[offset:offset + 1].reshape(()).copy()
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= storage.size:
    raise PthError('a tensor reaches past the end of its storage: the file is corrupt.')
  view = np.lib.stride_tricks.as_strided(
      storage[offset:], shape=tuple(size), strides=tuple(s * item for s in stride))
  return np.ascontiguousarray(view)


def _rebuild_parameter(data, requires_grad=False, hooks=None):
  del requires_grad, hooks
  return data


_ALLOWED = {
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('argparse', 'Namespace'): argparse.Namespace,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    **{('torch', name): _StorageType(dtype) for name, dtype in STORAGE_DTYPES.items()},
}


class _Unpickler(pickle.Unpickler):

  def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, byteorder: str):
    super().__init__(io.BytesIO(data))
    self._archive, self._prefix, self._byteorder = archive, prefix, byteorder
    self._storages: dict[str, np.ndarray] = {}

  def find_class(self, module, name):
    try:
      return _ALLOWED[(module, name)]
    except KeyError:
      raise PthError(f'the checkpoint asks to load {module}.{name}, which a checkpoint of '
                     'tensors does not need; refusing to unpickle it (it could run code).') from None

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'
            and isinstance(pid[1], _StorageType)):
      raise PthError(f'unexpected storage record {pid!r}: the file is corrupt or not a torch checkpoint.')
    _, kind, key, _location, numel = pid  # location ('cuda:0') is ignored: we read to host
    if key not in self._storages:
      try:
        raw = self._archive.read(f'{self._prefix}/data/{key}')
      except KeyError:
        raise PthError(f'storage {key} is missing from the archive: the file is truncated.') from None
      dtype = kind.dtype.newbyteorder('>' if self._byteorder == 'big' else '<')
      if len(raw) < numel * dtype.itemsize:
        raise PthError(f'storage {key} is shorter than recorded: the file is truncated.')
      self._storages[key] = np.frombuffer(raw, dtype, count=numel).astype(kind.dtype)
    return self._storages[key]


def load(path: str):
  """Returns the object `torch.save` wrote, with every tensor as a numpy array."""
  try:
    archive = zipfile.ZipFile(path)
  except FileNotFoundError:
    raise PthError(f'{path}: no such file.') from None
  except (zipfile.BadZipFile, IsADirectoryError, OSError) as e:
    raise PthError(f'{path} is not a PyTorch zip checkpoint ({e}); files from torch < 1.6 must '
                   'be re-saved with a newer torch.save first.') from None
  with archive:
    pickles = [n for n in archive.namelist() if n.endswith('/data.pkl') and n.count('/') == 1]
    if len(pickles) != 1:
      raise PthError(f'{path} is a zip file but not a torch.save archive (no <name>/data.pkl).')
    prefix = pickles[0].rsplit('/', 1)[0]
    names = set(archive.namelist())
    byteorder = 'little'
    if f'{prefix}/byteorder' in names:
      byteorder = archive.read(f'{prefix}/byteorder').decode().strip()
    try:
      return _Unpickler(archive.read(pickles[0]), archive, prefix, byteorder).load()
    except PthError:
      raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, zipfile.BadZipFile) as e:
      raise PthError(f'{path}: the checkpoint is corrupt ({type(e).__name__}: {e}).') from None
