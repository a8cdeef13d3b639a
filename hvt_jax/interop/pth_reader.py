"""Read PyTorch `.pth` checkpoints without PyTorch and without trusting the pickle.

`torch.save` (zip format, torch >= 1.6) writes `<name>/data.pkl` plus one raw
file per storage under `<name>/data/`. The pickle may only name the few globals
a checkpoint of tensors, dicts and an `argparse.Namespace` needs; anything else
is refused before it can run. Tensors come back as numpy arrays.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import io
import math
import os
import pickle
from typing import Any, Callable
import zipfile
import zlib

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


# A torch.save archive is stored uncompressed; a deflated copy of float weights shrinks little.
# An entry claiming to expand far beyond the whole archive is a decompression bomb.
_MAX_EXPANSION = 16


@dataclasses.dataclass(frozen=True)
class _View:
  """A tensor as the pickle describes it; checked and copied out only once its name is known."""
  storage: np.ndarray
  offset: Any
  size: Any
  stride: Any


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
  del requires_grad, hooks, metadata
  return _View(storage, offset, size, stride)


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _check_view(view: _View, name: str) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
  """(offset, size, stride) once they are proven to stay inside the storage; else PthError.

  Every element the view reads must lie in the storage, and the view may not hold more
  elements than the storage (zero or overlapping strides), so that the copy made of it is
  never larger than what the file itself holds.
  """
  offset, size, stride = view.offset, view.size, view.stride
  def bad(why):
    return PthError(f'tensor {name} {why}: the file is corrupt or crafted; refusing to read it.')
  if not (isinstance(size, (tuple, list)) and isinstance(stride, (tuple, list))
          and all(map(_is_int, (*size, *stride))) and _is_int(offset)):
    raise bad(f'has a malformed shape {size!r}, stride {stride!r} or offset {offset!r}')
  if len(size) != len(stride):
    raise bad(f'has shape {tuple(size)} but strides {tuple(stride)}')
  if offset < 0 or any(n < 0 for n in size) or any(s < 0 for s in stride):
    raise bad(f'has a negative offset, size or stride (offset {offset}, shape {tuple(size)}, '
              f'strides {tuple(stride)})')
  have = view.storage.size
  numel = math.prod(size)  # Python ints: a product that would overflow int64 is just large
  if numel > have:
    raise bad(f'claims shape {tuple(size)} ({numel} elements) over a storage of {have}')
  if numel:
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= have:
      raise bad(f'reaches element {last} of a storage of {have} (offset {offset}, strides '
                f'{tuple(stride)})')
  elif offset > have:
    raise bad(f'starts at element {offset} of a storage of {have}')
  return offset, tuple(size), tuple(stride)


def _materialize(view: _View, name: str) -> np.ndarray:
  offset, size, stride = _check_view(view, name)
  if not math.prod(size):
    return np.zeros(size, view.storage.dtype)
  item = view.storage.dtype.itemsize
  strided = np.lib.stride_tricks.as_strided(
      view.storage[offset:], shape=size, strides=tuple(s * item for s in stride))
  return np.array(strided, order='C')  # a copy: the storage buffer is released after loading


def _resolve(obj, name: str, budget: list[int]):
  """`obj` with every `_View` replaced by its array; `name` is the path used in messages.

  `budget` (bytes left) bounds the copies, so many views of one storage cannot multiply the
  memory a small file needs.
  """
  if isinstance(obj, _View):
    array = _materialize(obj, name)
    budget[0] -= array.nbytes
    if budget[0] < 0:
      raise PthError(f'tensor {name}: the tensors view their storages many times over; the file '
                     'is corrupt or crafted; refusing to read it.')
    return array
  if isinstance(obj, dict):
    items = [(k, _resolve(v, f'{name}.{k}' if name else str(k), budget)) for k, v in obj.items()]
    out = type(obj)(items)
    if hasattr(obj, '__dict__'):
      out.__dict__.update(obj.__dict__)  # a state dict's `_metadata`
    return out
  if isinstance(obj, (list, tuple)):
    return type(obj)(_resolve(v, f'{name}[{i}]', budget) for i, v in enumerate(obj))
  if isinstance(obj, argparse.Namespace):
    return argparse.Namespace(**{k: _resolve(v, f'{name}.{k}' if name else k, budget)
                                 for k, v in vars(obj).items()})
  return obj


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

  def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, byteorder: str,
               progress: Callable[[int], Any]):
    super().__init__(io.BytesIO(data))
    self._archive, self._prefix, self._byteorder = archive, prefix, byteorder
    self._progress = progress
    self._storages: dict[str, np.ndarray] = {}

  def find_class(self, module, name):
    try:
      return _ALLOWED[(module, name)]
    except KeyError:
      raise PthError(f'the checkpoint asks to load {module}.{name}, which a checkpoint of '
                     'tensors does not need; refusing to unpickle it (it could run code).') from None

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'
            and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and _is_int(pid[4])
            and pid[4] >= 0):
      raise PthError(f'unexpected storage record {pid!r:.200}: the file is corrupt or not a torch '
                     'checkpoint.')
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
      self._progress(len(raw))
    return self._storages[key]


def _refuse_bombs(path: str, archive: zipfile.ZipFile) -> None:
  """Every entry's declared size against the archive's: zipfile never inflates past it."""
  limit = _MAX_EXPANSION * max(os.path.getsize(path), 1 << 20)
  for info in archive.infolist():
    if info.file_size > limit:
      raise PthError(f'{path}: entry {info.filename} claims {info.file_size:,} bytes in a '
                     f'{os.path.getsize(path):,}-byte archive (a decompression bomb?); refusing '
                     'to read it.')


def load(path: str, progress: Callable[[int], Any] = lambda nbytes: None):
  """Returns the object `torch.save` wrote, with every tensor as a numpy array.

  Memory stays within a small multiple of the file's size, whatever the file claims.
  `progress` is called with the byte count of each storage read (a progress bar's update).
  """
  try:
    archive = zipfile.ZipFile(path)
  except FileNotFoundError:
    raise PthError(f'{path}: no such file.') from None
  except (zipfile.BadZipFile, IsADirectoryError, OSError) as e:
    raise PthError(f'{path} is not a PyTorch zip checkpoint ({e}); files from torch < 1.6 must '
                   'be re-saved with a newer torch.save first.') from None
  with archive:
    _refuse_bombs(path, archive)
    pickles = [n for n in archive.namelist() if n.endswith('/data.pkl') and n.count('/') == 1]
    if len(pickles) != 1:
      raise PthError(f'{path} is a zip file but not a torch.save archive (no <name>/data.pkl).')
    prefix = pickles[0].rsplit('/', 1)[0]
    names = set(archive.namelist())
    byteorder = 'little'
    try:
      if f'{prefix}/byteorder' in names:
        byteorder = archive.read(f'{prefix}/byteorder').decode().strip()
      obj = _Unpickler(archive.read(pickles[0]), archive, prefix, byteorder, progress).load()
    except PthError:
      raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, zipfile.BadZipFile,
            zlib.error, NotImplementedError, UnicodeDecodeError) as e:
      raise PthError(f'{path}: the checkpoint is corrupt ({type(e).__name__}: {e}).') from None
    # Copies of views may at most double what the storages hold (a weight saved twice, q/k/v
    # views beside the fused qkv); small files get some room for views of shared storage.
    data_bytes = sum(i.file_size for i in archive.infolist() if i.filename.startswith(f'{prefix}/data/'))
    return _resolve(obj, '', [max(2 * data_bytes, 1 << 24)])
