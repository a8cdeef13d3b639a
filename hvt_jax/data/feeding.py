"""Host to device: the rows each process feeds, and its local batches as global arrays.

`local_batch_size` / `eval_local_batch_size` check a global batch size against the processes
and their devices. `TrainIterator` and `EvalIterator` turn each process's numpy batches into
global jax arrays sharded over the mesh (`jax.make_array_from_process_local_data`): the global
batch is every process's rows stacked.
"""
from __future__ import annotations

import collections
import math
from typing import TYPE_CHECKING, Iterator

import jax
import numpy as np

from hvt_jax.errors import InputError

if TYPE_CHECKING:
  import tensorflow as tf


def local_batch_size(batch_size: int, mesh: jax.sharding.Mesh, process_count: int,
                     name: str = 'batch_size') -> int:
  """The rows one process feeds, checked against processes and local devices."""
  if batch_size <= 0 or batch_size % process_count:
    raise InputError(f'{name}={batch_size} does not split evenly over {process_count} '
                     f'processes: set --config.{name} to a multiple of {process_count}.')
  local = batch_size // process_count
  devices = len(mesh.local_devices)
  if local % devices:
    raise InputError(f'{name}={batch_size} gives {local} per process, which its {devices} '
                     f'devices cannot split evenly: set --config.{name} to a multiple of '
                     f'{process_count * devices}.')
  return local


def eval_local_batch_size(batch_size: int, mesh: jax.sharding.Mesh, process_count: int) -> int:
  """Eval rows one process feeds: its share of `eval_batch_size`, rounded up to a multiple
  of its devices. The extra rows are padding, masked out like the last batch's."""
  if batch_size <= 0:
    raise InputError(f'eval_batch_size={batch_size}: set --config.eval_batch_size to a positive '
                     'number.')
  devices = len(mesh.local_devices)
  return math.ceil(math.ceil(batch_size / process_count) / devices) * devices


def _put(batch: dict[str, np.ndarray], sharding_: jax.sharding.Sharding) -> dict[str, jax.Array]:
  """Process-local rows -> global arrays; the global batch is every process's rows stacked."""
  return {k: jax.make_array_from_process_local_data(
      sharding_, v, (v.shape[0] * jax.process_count(),) + v.shape[1:]) for k, v in batch.items()}


class TrainIterator:
  """Endless global train batches, placed on the mesh ahead of use."""

  def __init__(self, batches: Iterator[dict[str, np.ndarray]], sharding_: jax.sharding.Sharding,
               *, prefetch: int):
    self._batches = batches
    self._sharding = sharding_
    self._prefetch = max(1, prefetch)
    self._queue: collections.deque = collections.deque()

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, jax.Array]:
    # Device transfers are asynchronous: keep `prefetch` batches in flight ahead of the step.
    while len(self._queue) < self._prefetch:
      self._queue.append(_put(next(self._batches), self._sharding))
    return self._queue.popleft()


class EvalIterator:
  """Re-iterable: each pass yields {'image', 'label', 'mask'} global batches over the split.

  Every process yields the same number of batches (`len(self)`): its share, then padding rows
  (mask 0) up to what the largest share needs, so a multi-process eval never waits forever.
  """

  def __init__(self, dataset: tf.data.Dataset, sharding_: jax.sharding.Sharding, *,
               local_batch: int, num_batches: int, num_examples: int, undecodable=None):
    self._dataset = dataset
    self._undecodable = undecodable
    self._sharding = sharding_
    self._local_batch = local_batch
    self._num_batches = num_batches
    self.num_examples = num_examples  # in the whole split, over all processes

  def __len__(self) -> int:
    return self._num_batches

  def __iter__(self) -> Iterator[dict[str, jax.Array]]:
    rows = self._local_batch
    batches = self._dataset.as_numpy_iterator()
    for _ in range(self._num_batches):
      batch = self._next(batches)
      have = 0 if batch is None else len(batch['label'])
      if batch is None:
        batch = {k: np.zeros((0,) + spec.shape[1:], spec.dtype.as_numpy_dtype)
                 for k, spec in self._dataset.element_spec.items()}
      pad = rows - have
      padded = {k: np.pad(v, [(0, pad)] + [(0, 0)] * (v.ndim - 1)) for k, v in batch.items()}
      yield _put({**padded, 'mask': (np.arange(rows) < have).astype(np.int32)}, self._sharding)

  def _next(self, batches):
    import tensorflow as tf  # here, not at the top: the train feed runs where TF is absent
    try:
      return next(batches, None)
    except tf.errors.InvalidArgumentError:
      if self._undecodable is None:
        raise
      bad = self._undecodable()
      raise InputError(f'cannot decode {bad[0] if bad else "an eval image"}'
                       f'{f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""}: replace or '
                       'remove it; eval counts every file.') from None
