"""Write PyTorch `.pth` checkpoints without PyTorch: the format `torch.save` writes.

A zip archive (stored, not compressed) holding `<name>/data.pkl`, a protocol-2
pickle whose tensors are `torch._utils._rebuild_tensor_v2` calls on persistent
storage records, plus one raw little-endian file per tensor under
`<name>/data/`, aligned to 64 bytes as torch aligns them (so `torch.load(...,
mmap=True)` works), and the `version` / `byteorder` records torch checks.

The pickle is emitted opcode by opcode rather than with `pickle.Pickler`: the
stdlib pickler imports the module of every global it writes, so naming
`torch.FloatStorage` would need torch (or a fake one put in `sys.modules`).
The globals written are exactly the ones `pth_reader.py` and
`torch.load(weights_only=True)` accept.
"""
from __future__ import annotations

import collections
import dataclasses
import io
import struct
import zipfile

import numpy as np

from hvt_jax.interop import pth_reader

_STORAGE_NAMES = {np.dtype(dtype): name for name, dtype in pth_reader.STORAGE_DTYPES.items()}
_ALIGNMENT = 64
_PADDING_ID = 0x4246  # the zip extra-field id torch uses for its alignment padding ('FB')


@dataclasses.dataclass(frozen=True)
class StorageView:
  """A tensor as torch records it: `shape` and `strides` (in elements) from `offset` of a
  storage. Views of one storage array are written with one storage record, as torch shares
  storages between tensors. Nothing checks that the view fits (tests write hostile files)."""
  storage: np.ndarray
  offset: int
  shape: tuple
  strides: tuple


class _Emitter:
  """Pickle opcodes (protocol 2) for dicts, OrderedDicts, tuples, lists, scalars and arrays."""

  def __init__(self):
    self.out = io.BytesIO()
    self.storages: list[np.ndarray] = []

  def write(self, data: bytes) -> None:
    self.out.write(data)

  def global_(self, module: str, name: str) -> None:
    self.write(b'c' + module.encode() + b'\n' + name.encode() + b'\n')

  def save(self, o) -> None:
    if o is None:
      self.write(b'N')
    elif o is True or o is False:
      self.write(b'\x88' if o else b'\x89')
    elif isinstance(o, (int, np.integer)):
      self.int_(int(o))
    elif isinstance(o, (float, np.floating)):
      self.write(b'G' + struct.pack('>d', float(o)))
    elif isinstance(o, str):
      data = o.encode('utf-8')
      self.write(b'X' + struct.pack('<I', len(data)) + data)
    elif isinstance(o, tuple):
      self.write(b'(')
      for item in o:
        self.save(item)
      self.write(b't')
    elif isinstance(o, list):
      self.write(b']')
      if o:
        self.write(b'(')
        for item in o:
          self.save(item)
        self.write(b'e')
    elif isinstance(o, dict):
      if isinstance(o, collections.OrderedDict):
        self.global_('collections', 'OrderedDict')
        self.write(b')R')
      else:
        self.write(b'}')
      if o:
        self.write(b'(')
        for k, v in o.items():
          self.save(k)
          self.save(v)
        self.write(b'u')
    elif isinstance(o, np.ndarray):
      array = np.asarray(o, order='C')  # ascontiguousarray would make a 0-d array 1-d
      self.tensor(StorageView(array, 0, array.shape,
                              tuple(s // array.itemsize for s in array.strides)))
    elif isinstance(o, StorageView):
      self.tensor(o)
    else:
      raise TypeError(f'cannot write a {type(o).__name__} into a .pth file (only dicts, lists, '
                      'tuples, numbers, strings, numpy arrays and StorageViews).')

  def int_(self, n: int) -> None:
    if 0 <= n < 256:
      self.write(b'K' + bytes([n]))
    elif 0 <= n < 65536:
      self.write(b'M' + struct.pack('<H', n))
    elif -2 ** 31 <= n < 2 ** 31:
      self.write(b'J' + struct.pack('<i', n))
    else:
      data = n.to_bytes((n.bit_length() + 8) // 8, 'little', signed=True)
      self.write(b'\x8a' + bytes([len(data)]) + data)

  def tensor(self, view: StorageView) -> None:
    storage = view.storage
    if storage.dtype not in _STORAGE_NAMES:
      raise TypeError(f'no torch storage type for dtype {storage.dtype}.')
    index = next((i for i, s in enumerate(self.storages) if s is storage), None)
    if index is None:
      self.storages.append(storage)
      index = len(self.storages) - 1
    key = str(index)
    self.global_('torch._utils', '_rebuild_tensor_v2')
    self.write(b'((')  # the arguments' tuple, then the storage record: a tuple read by 'Q'
    self.save('storage')
    self.global_('torch', _STORAGE_NAMES[storage.dtype])
    self.save(key)
    self.save('cpu')
    self.save(storage.size)
    self.write(b'tQ')
    self.save(view.offset)
    self.save(tuple(view.shape))
    self.save(tuple(view.strides))
    self.save(False)  # requires_grad
    self.global_('collections', 'OrderedDict')  # backward hooks: none
    self.write(b')R')
    self.write(b'tR')


def write(path, obj, archive_name: str = 'archive') -> None:
  """`torch.save(obj, path)` for dicts, lists, tuples, numbers, strings and numpy arrays."""
  emitter = _Emitter()
  emitter.write(b'\x80\x02')
  emitter.save(obj)
  emitter.write(b'.')
  records = [('data.pkl', emitter.out.getvalue()), ('.format_version', b'1'),
             ('.storage_alignment', str(_ALIGNMENT).encode()), ('byteorder', b'little')]
  records += [(f'data/{i}', a.astype(a.dtype.newbyteorder('<')).tobytes())
              for i, a in enumerate(emitter.storages)]
  records.append(('version', b'3\n'))
  with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as z:
    for name, data in records:
      info = zipfile.ZipInfo(f'{archive_name}/{name}', date_time=(1980, 1, 1, 0, 0, 0))
      if name.startswith('data/'):
        # Pad the local header's extra field so the tensor bytes start on an aligned offset.
        header = 30 + len(info.filename.encode()) + 4
        pad = -(z.fp.tell() + header) % _ALIGNMENT
        info.extra = struct.pack('<HH', _PADDING_ID, pad) + b'Z' * pad
      z.writestr(info, data)
