"""Train and eval input: TFDS records -> tf.data -> global jax arrays on the mesh.

Each process reads its own even share of a split (`tfds.even_splits`, what
`tfds.split_for_jax_process` does), keeps the images encoded through shuffling and skipping,
and decodes only the crop it keeps (`preprocess.train_crop` on the JPEG bytes). The host only
decodes, crops and resizes: batches leave it as uint8, and the rest of the train transform runs
on the device, seeded by each example's 'example_id' (`hvt_jax.data.augment`).

Train order is a pure function of (config.seed, process index, epoch): every epoch gets its own
file order and shuffle seed, and example i of epoch e its own augmentation seed. So the stream
can start at any epoch without replaying earlier ones, and the train step alone says where to
resume: with exactly the batches the original run would have produced next.

The train stream is one endless sequence of epochs, cut into batches regardless of epoch ends:
no example is dropped, and a batch may hold the end of one epoch and the start of the next.
"""
from __future__ import annotations

import collections
import dataclasses
import math
from typing import Callable, Iterator

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from hvt_jax.data import datasets, folders, input_spec, preprocess
from hvt_jax import sharding
from hvt_jax.errors import UserError

try:  # tf.data only needs the CPU; keep TensorFlow off the accelerators JAX uses
  tf.config.set_visible_devices([], 'GPU')
except RuntimeError:  # TensorFlow already initialized its devices; too late, harmless on CPU
  pass

_MAX_EPOCHS = 2 ** 40  # the train stream is endless in practice
_READ_PARALLELISM = 16  # files read at once: enough to hide storage latency
_PROBE_RECORDS = 256  # undecodable in a row at the start: the data is not images (or broken)
# Tags that make the random streams drawn from one (seed, process, epoch) key independent.
_FILE_ORDER, _SHUFFLE, _AUGMENT = 0, 1, 2


class InputError(UserError):
  """A batch size or setting the input pipeline cannot use; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Source:
  """One process's share of a split: its size and how to read it once.

  `read(order_key)` returns the records as {'image': encoded bytes, 'label': int64}; with an
  `order_key` (shape (2,) int64) the files come in an order drawn from it.
  """
  num_examples: int
  read: Callable[[tf.Tensor | None], tf.data.Dataset]
  # Image folders: eval names the files it cannot decode with `undecodable()`, which decodes
  # every file of the share (training skips and counts them for every source, see
  # `skip_undecodable`).
  undecodable: Callable[[], list[str]] | None = None


def process_split(split: str, process_index: int, process_count: int):
  """The `process_index`-th of `process_count` disjoint, near-equal parts covering `split`."""
  return tfds.even_splits(split, n=process_count, drop_remainder=False)[process_index]


def tfds_source(b: tfds.core.DatasetBuilder, split, *, cache: bool = False) -> Source:
  """Reads (part of) a prepared TFDS split's TFRecord files, images left encoded."""
  if b.info.file_format != tfds.core.FileFormat.TFRECORD:
    raise InputError(f'{b.name} in {b.data_dir} is stored as {b.info.file_format.value}; '
                     'prepare it again with the default (tfrecord) file format.')
  instructions = [fi for fi in b.info.splits[split].file_instructions if fi.take > 0]
  num_examples = sum(fi.take for fi in instructions)
  if not instructions:  # more processes than examples: this one reads nothing (eval pads)
    return memory_source(np.array([], dtype=object), np.array([], np.int64))
  files = tf.constant([fi.filename for fi in instructions])
  skips = tf.constant([fi.skip for fi in instructions], tf.int64)
  takes = tf.constant([fi.take for fi in instructions], tf.int64)
  decoders = {'image': tfds.decode.SkipDecoding()}
  label = datasets.label_key(b)

  def parse(serialized):
    example = b.info.features.deserialize_example(serialized, decoders=decoders)
    record = {'image': example['image'], 'label': example[label]}
    if datasets.REAL_LABELS in example:  # as a multi-hot row, so batches keep one shape
      classes = b.info.features[label].num_classes
      record['real'] = tf.reduce_max(tf.one_hot(example[datasets.REAL_LABELS], classes,
                                                dtype=tf.uint8), axis=0)
    return record

  def read_files(order_key):
    order = tf.range(len(instructions))
    if order_key is not None:
      order = tf.random.experimental.stateless_shuffle(order, seed=order_key, alg='philox')
    parts = tf.data.Dataset.from_tensor_slices(
        (tf.gather(files, order), tf.gather(skips, order), tf.gather(takes, order)))
    return parts.interleave(
        lambda f, skip, take: tf.data.TFRecordDataset(f).skip(skip).take(take),
        cycle_length=min(len(instructions), _READ_PARALLELISM), block_length=1,
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  if cache:
    # Small datasets: read the encoded records once into memory; the shuffle buffer, not the
    # file order, then provides all the randomness.
    records = np.array(list(read_files(None).as_numpy_iterator()), dtype=object)
    in_memory = tf.data.Dataset.from_tensor_slices(tf.constant(records, tf.string))
    return Source(num_examples, lambda order_key: in_memory.map(parse))
  return Source(num_examples, lambda order_key: read_files(order_key).map(parse))


def memory_source(images: np.ndarray, labels: np.ndarray) -> Source:
  """Encoded images held in memory (benchmarks, tests)."""
  ds = tf.data.Dataset.from_tensor_slices(
      {'image': tf.constant(images, tf.string), 'label': tf.constant(labels, tf.int64)})
  return Source(len(labels), lambda order_key: ds)


def folder_source(listing: folders.Listing, process_index: int, process_count: int, *,
                  first: int | None = None) -> Source:
  """Every `process_count`-th file of a listed image folder, from `process_index` on (only the
  `first` of them if given).

  Strided, so every process gets every class. With an `order_key` the whole share is
  permuted; files are read inside tf.data.
  """
  paths = listing.paths[process_index::process_count][:first].astype(str)
  labels = listing.labels[process_index::process_count][:first]
  if not len(paths):
    return memory_source(np.array([], dtype=object), np.array([], np.int64))
  paths_t, labels_t = tf.constant(paths), tf.constant(labels)

  def read(order_key):
    order = tf.range(len(paths), dtype=tf.int64)
    if order_key is not None:
      order = tf.random.experimental.stateless_shuffle(order, seed=order_key, alg='philox')
    return tf.data.Dataset.from_tensor_slices(order).map(
        lambda i: {'image': tf.io.read_file(paths_t[i]), 'label': labels_t[i]},
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  return Source(len(paths), read, undecodable=lambda: folders.undecodable(paths))


def split_source(config: ml_collections.ConfigDict, dataset: datasets.Dataset, split: str,
                 process_index: int, process_count: int, *, first: int | None = None) -> Source:
  """This process's share of `split` of the run's dataset (TFDS or an image folder).

  `first`: only the share's first records (in file order when read without an order key),
  never cached: a quick look at the data, costing no more than those records.
  """
  if dataset.builder is None:
    return folder_source(folders.listing(config, split), process_index, process_count,
                         first=first)
  source = tfds_source(dataset.builder, process_split(split, process_index, process_count),
                       cache=config.data.cache and first is None)
  if first is None:
    return source
  return Source(min(source.num_examples, first), lambda key: source.read(key).take(first))


def _key(*parts) -> tf.Tensor:
  """A stateless-RNG seed folded from integers (Python or tensors), in order."""
  key = tf.constant([0, 0], tf.int64)
  for part in parts:
    key = tf.random.experimental.stateless_fold_in(key, tf.cast(part, tf.int64), alg='philox')
  return key


def _epoch_records(source: Source, *, seed: int, process_index: int, shuffle_buffer: int,
                   repeats: int, window: int) -> Callable[[tf.Tensor], tf.data.Dataset]:
  """epoch -> that epoch's `num_examples` records as (epoch, position, record), shuffled.

  With `repeats` = k > 1 (repeated augmentation, DeiT's RASampler) the epoch takes the first
  ceil(n / k) shuffled images and emits each k times: a window of `window` images, then the
  same window again, k times. Copies thus sit `window` positions apart (other devices or other
  batches), each gets its own position and so its own augmentation seed, and the epoch still
  has n records.
  """
  n = source.num_examples

  def records(epoch):
    ds = source.read(_key(seed, process_index, epoch, _FILE_ORDER))
    shuffle_seed = _key(seed, process_index, epoch, _SHUFFLE)[0]
    ds = ds.shuffle(min(shuffle_buffer, n), seed=shuffle_seed, reshuffle_each_iteration=False)
    if repeats > 1:
      ds = ds.take(math.ceil(n / repeats)).batch(window).flat_map(
          lambda w: tf.data.Dataset.from_tensor_slices(w).repeat(repeats)).take(n)
    return ds.enumerate().map(lambda i, rec: (epoch, i, rec))

  return records


def train_dataset(source: Source, config: ml_collections.ConfigDict, *, process_index: int,
                  local_batch: int, start: int = 0) -> tf.data.Dataset:
  """Endless local batches {'image': uint8 (b, S, S, 3), 'label': int32 (b,), 'ok': bool (b,),
  'example_id': int32 (b, 3)}: the record's (process_index, epoch, position), which seeds its
  crop here and the rest of its augmentation on the device.

  `start`: how many examples of this process's stream to leave out, e.g. after resuming.
  They are skipped as encoded records, only within their epoch.
  """
  n = source.num_examples
  if n == 0:
    raise InputError(f'this process got no training examples of {config.data.name}: use a '
                     'larger split or fewer processes.')
  repeats = max(1, int(config.aug.get('repeated_aug', 1)))
  epoch_records = _epoch_records(
      source, seed=config.seed, process_index=process_index,
      shuffle_buffer=config.data.shuffle_buffer, repeats=repeats,
      window=max(1, local_batch // repeats))
  augment = _augment_fn(config, process_index)
  check_some_decode(source, augment, config)
  ds = tf.data.Dataset.range(start // n, _MAX_EPOCHS).flat_map(epoch_records)
  ds = ds.skip(start % n)
  ds = skip_undecodable(ds, augment)
  ds = ds.batch(local_batch, drop_remainder=True).map(fill_skipped)
  return ds.with_options(_options(config)).prefetch(tf.data.AUTOTUNE)


def skip_undecodable(ds: tf.data.Dataset, augment: Callable) -> tf.data.Dataset:
  """`ds.map(augment)`, where a record that fails (a corrupt image) becomes a placeholder
  with 'ok' False instead of ending the run.

  TensorFlow cannot catch an op's error inside a map; `ignore_errors` can only drop the
  element. So records are numbered before the map, and after it each example carries the
  number of records dropped just before it: it becomes a stack of that many placeholders and
  itself, which `unbatch` splits into rows again. One example per record, so positions,
  augmentation seeds and resumed streams stay as they were for every valid image. (A
  `flat_map` building a small dataset per example does the same, at a dataset's set-up cost
  per image.) A stream in which nothing decodes would never yield; `train_dataset` refuses
  that data first.
  """
  decoded = ds.enumerate().map(
      lambda number, element: (number, augment(*element)),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors()

  def count_gap(previous, item):
    number, example = item
    return number, (number - previous - 1, example)

  def with_placeholders(missing, example):
    def stacked():
      return {k: tf.concat([tf.zeros(tf.concat([[missing], tf.shape(v)], 0), v.dtype), v[None]],
                           axis=0) for k, v in example.items()}
    rows = tf.cond(missing > 0, stacked, lambda: {k: v[None] for k, v in example.items()})
    ok = tf.range(missing + 1) == missing
    return {**rows, 'ok': ok}

  decoded = decoded.scan(tf.constant(-1, tf.int64), count_gap)
  return decoded.map(with_placeholders).unbatch()


def _augment_fn(config: ml_collections.ConfigDict, process_index: int) -> Callable:
  """(epoch, position, record) -> {'image', 'label', 'example_id'}: the host's part of the
  train transform (`preprocess.train_crop`), seeded by the record's place in this process's
  stream, and that place for the device's part."""
  def augment(epoch, position, record):
    key = _key(config.seed, process_index, epoch, _AUGMENT, position)
    image = preprocess.train_crop(record['image'], key, size=config.model.image_size,
                                  aug=config.aug)
    example_id = tf.cast(tf.stack([tf.cast(process_index, tf.int64), epoch, position]), tf.int32)
    return {'image': image, 'label': tf.cast(record['label'], tf.int32), 'example_id': example_id}
  return augment


def check_some_decode(source: Source, augment: Callable,
                      config: ml_collections.ConfigDict) -> None:
  """Raises InputError when none of the first `_PROBE_RECORDS` records (in file order) gets
  through `augment`, the train transform (`_augment_fn`): skipping every image would leave the
  train stream waiting forever. Costs one transformed image on readable data."""
  probe = source.read(None).take(_PROBE_RECORDS).enumerate().map(
      lambda position, record: augment(tf.constant(0, tf.int64), position, record))
  if not any(True for _ in probe.ignore_errors().take(1)):
    raise InputError(_undecodable(config, f'none of the first '
                                  f'{min(source.num_examples, _PROBE_RECORDS)} training images'))


def _undecodable(config: ml_collections.ConfigDict, which: str) -> str:
  where = folders.root(config) if config.data.name == folders.NAME else config.data.name
  return (f'{which} of {where} could be decoded: the data must hold JPEG, PNG, GIF, BMP or WebP '
          'images (training skips a few unreadable ones, not all).')


def fill_skipped(batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  """Rows of skipped records take a copy of a valid row of the same batch (every field but
  'ok': image, label and example_id alike): the batch keeps its size, and the train step counts
  the copies from 'ok' (train/skipped_examples)."""
  ok = batch['ok']
  rows = tf.range(tf.shape(ok)[0])
  valid = tf.boolean_mask(rows, ok)
  count = tf.maximum(tf.size(valid), 1)  # no valid row at all: the placeholders stay
  source = tf.where(ok, rows, tf.gather(tf.concat([valid, [0]], 0), rows % count))
  return {**{k: tf.gather(v, source) for k, v in batch.items() if k != 'ok'}, 'ok': ok}


def eval_dataset(source: Source, config: ml_collections.ConfigDict, *,
                 local_batch: int) -> tf.data.Dataset:
  """One pass of local batches {'image': uint8 (b, S, S, 3), 'label'} (and 'real' where the
  dataset has it); the last one may be short. The device normalizes the images."""
  transform = input_spec.eval_transform(config.eval)

  def prepare(record):
    image = preprocess.eval_crop(record['image'], size=config.model.image_size,
                                 crop_pct=transform['crop_pct'],
                                 interpolation=transform['interpolation'])
    out = {'image': image, 'label': tf.cast(record['label'], tf.int32)}
    return {**out, 'real': record['real']} if 'real' in record else out

  ds = source.read(None)
  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.batch(local_batch).with_options(_options(config)).prefetch(tf.data.AUTOTUNE)


def _options(config: ml_collections.ConfigDict) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True  # order must not depend on thread timing (resume, seeds)
  options.threading.max_intra_op_parallelism = 1  # parallelism comes from parallel map
  threads = int(config.data.get('threads', 0))
  if threads > 0:
    options.threading.private_threadpool_size = threads
  return options


def _processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= index < count:
    raise InputError(f'process_index {index} is not in [0, {count}).')
  return index, count


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


def check_train_data(config: ml_collections.ConfigDict, dataset: datasets.Dataset) -> None:
  """`check_some_decode` on this process's share of the train split, so that a run can refuse
  data it cannot train on before it writes anything.

  With several processes they agree first, so that every one stops with the reason instead of
  the others waiting in their next collective until it times out.
  """
  index, count = _processes(None, None)
  source = split_source(config, dataset, config.data.train_split, index, count,
                        first=_PROBE_RECORDS)
  error = None
  try:
    if source.num_examples:
      check_some_decode(source, _augment_fn(config, index), config)
  except InputError as e:
    if count == 1:
      raise
    error = e
  if count > 1:
    failed = np.flatnonzero(multihost_utils.process_allgather(np.int32(error is not None)))
    if error is not None:
      raise InputError(f'process {index} of {count}: {error}') from None
    if failed.size:
      raise InputError(f'process {failed[0]} of {count}: '
                       + _undecodable(config, 'none of its first training images'))


def train_iterator(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, step: int = 0,
                   *, dataset: datasets.Dataset | None = None, process_index: int | None = None,
                   process_count: int | None = None) -> TrainIterator:
  """Endless global batches {'image': uint8 (B, S, S, 3), 'label': int32 (B,), 'ok': bool (B,),
  'example_id': int32 (B, 3)} (see `train_dataset`).

  `step`: batches already trained on (a resumed run's step). `dataset`: the run's opened
  dataset; None opens the config's (`datasets.open_dataset`). `process_index` /
  `process_count` override JAX's, to act as one of several processes (tests, tools); the arrays
  then hold just that process's rows.
  """
  index, count = _processes(process_index, process_count)
  local_batch = local_batch_size(config.batch_size, mesh, count)
  dataset = dataset or datasets.open_dataset(config)
  source = split_source(config, dataset, config.data.train_split, index, count)
  # The one source of the input position: step * batch_size examples used, an equal part of
  # them from each process's stream. So the same process count resumes with exactly the
  # original batches, and another count at the same epoch and fraction of it (new batches).
  start = step * local_batch
  ds = train_dataset(source, config, process_index=index, local_batch=local_batch, start=start)
  return TrainIterator(ds.as_numpy_iterator(), sharding.batch_sharding(mesh),
                       prefetch=config.data.prefetch)


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
    try:
      return next(batches, None)
    except tf.errors.InvalidArgumentError:
      if self._undecodable is None:
        raise
      bad = self._undecodable()
      raise InputError(f'cannot decode {bad[0] if bad else "an eval image"}'
                       f'{f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""}: replace or '
                       'remove it; eval counts every file.') from None


def eval_iterator(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *,
                  dataset: datasets.Dataset | None = None, process_index: int | None = None,
                  process_count: int | None = None) -> EvalIterator:
  """Every example of `config.data.eval_split` exactly once per pass, over all processes.

  `dataset`: the run's opened dataset; None opens the config's (`datasets.open_dataset`).
  """
  index, count = _processes(process_index, process_count)
  local_batch = eval_local_batch_size(config.eval_batch_size, mesh, count)
  dataset = dataset or datasets.open_dataset(config)
  total = dataset.num_eval
  source = split_source(config, dataset, config.data.eval_split, index, count)
  # even_splits gives the first (total % count) processes one extra example.
  num_batches = math.ceil(math.ceil(total / count) / local_batch)
  ds = eval_dataset(source, config, local_batch=local_batch)
  return EvalIterator(ds, sharding.batch_sharding(mesh), local_batch=local_batch,
                      num_batches=num_batches, num_examples=total, undecodable=source.undecodable)
