"""Train and eval input: TFDS records -> tf.data -> global jax arrays on the mesh.

Each process reads its own even share of a split (`tfds.even_splits`, what
`tfds.split_for_jax_process` does), keeps the images encoded through shuffling and skipping,
and decodes only the crop it keeps (`preprocess.train_crop` on the JPEG bytes). The host only
decodes, crops and resizes: batches leave it as uint8, and the rest of the train transform runs
on the device, seeded by each example's 'example_id' (`hvt_jax.data.augment`). On
accelerators the host leaves the resize to the device too (`augment.window_canvas`): a batch
then holds each decoded window (or eval image) at the top left of a canvas, with its size as
'window'.

Train order is a pure function of (config.seed, process index, epoch): every epoch gets its own
file order and shuffle seed, and example i of epoch e its own augmentation seed. So the stream
can start at any epoch without replaying earlier ones, and the train step alone says where to
resume: with exactly the batches the original run would have produced next.

The train stream is one endless sequence of epochs, cut into batches regardless of epoch ends:
no example is dropped, and a batch may hold the end of one epoch and the start of the next.

The records come from `sources` (TFDS, image folders, memory); `feeding` sizes each process's
batches and places them on the mesh. `train_iterator` and `eval_iterator` join the three.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import tensorflow as tf

from hvt_jax.data import augment, datasets, feeding, folders, input_spec, preprocess, sources
from hvt_jax import sharding

_MAX_EPOCHS = 2 ** 40  # the train stream is endless in practice
_PROBE_RECORDS = 256  # undecodable in a row at the start: the data is not images (or broken)
# Tags that make the random streams drawn from one (seed, process, epoch) key independent.
_FILE_ORDER, _SHUFFLE, _AUGMENT = 0, 1, 2


def _key(*parts, key: tf.Tensor | None = None) -> tf.Tensor:
  """A stateless-RNG seed folded from integers (Python or tensors), in order, into `key`
  (default [0, 0]): _key(a, b, c) == _key(c, key=_key(a, b))."""
  key = tf.constant([0, 0], tf.int64) if key is None else key
  for part in parts:
    key = tf.random.experimental.stateless_fold_in(key, tf.cast(part, tf.int64), alg='philox')
  return key


def _epoch_examples(source: sources.Source, config: ml_collections.ConfigDict, *,
                    process_index: int, local_batch: int,
                    canvas: int) -> Callable[[tf.Tensor, int], tf.data.Dataset]:
  """(epoch, skip) -> that epoch's `num_examples` examples from the `skip`-th on, as the host
  hands them to batching: {'image', 'label', 'example_id'[, 'window'], 'ok'}.

  With `aug.repeated_aug` = k > 1 (repeated augmentation, DeiT's RASampler) the epoch takes the
  first ceil(n / k) shuffled images and emits each k times: a window of `local_batch // k`
  images, then the same window again, k times. Copies thus sit a window apart (other devices
  or other batches), each gets its own position and so its own augmentation seed, and the
  epoch still has n examples. An image is decoded once, whole, for its k copies
  (`preprocess.decoded_windows`), and each copy's crop is cut from it; so a window of decoded
  images is held at a time.

  The skipped examples are left out as encoded records, apart from those of the window the
  `skip`-th falls in.
  """
  n = source.num_examples
  repeats = max(1, int(config.aug.get('repeated_aug', 1)))
  window = max(1, local_batch // repeats)
  distinct = math.ceil(n / repeats)
  transform = _augment_fn(config, process_index, canvas)
  size, aug = config.model.image_size, config.aug

  def copies(augment_key, epoch, image_index, record):
    # Image q of window m (o-th in it, of r) has copies at m * k * window + j * r + o.
    m, o = image_index // window, image_index % window
    r = tf.minimum(tf.cast(window, tf.int64), distinct - m * window)
    positions = m * repeats * window + tf.range(repeats, dtype=tf.int64) * r + o
    seeds = tf.stack([_key(p, key=augment_key) for p in tf.unstack(positions, num=repeats)])
    image, windows = preprocess.decoded_windows(record['image'], seeds, aug=aug)
    example_id = tf.cast(tf.stack([tf.fill([repeats], tf.cast(process_index, tf.int64)),
                                   tf.fill([repeats], epoch), positions], axis=1), tf.int32)
    return {'image': image, 'crop': windows, 'example_id': example_id,
            'label': tf.cast(record['label'], tf.int32)}

  def each_copy(image):
    # One element per copy; each refers to the decoded image, which `cut` crops.
    return tf.data.Dataset.from_tensor_slices(
        {'crop': image['crop'], 'example_id': image['example_id']}).map(
            lambda c: {**image, **c})

  def cut(c):
    top, left, height, width = tf.unstack(c['crop'])
    x = c['image'][top:top + height, left:left + width]
    if canvas:
      x, hw = preprocess.finish_window(x, size=size, canvas=canvas, aug=aug)
    else:
      # A placeholder (an undecodable image) has an empty window: nothing to resize.
      x = tf.cond(c['ok'], lambda: preprocess.resize_window(x, size=size, aug=aug),
                  lambda: tf.zeros([size, size, 3], tf.uint8))
    out = {'image': x, 'label': c['label'], 'example_id': c['example_id'], 'ok': c['ok']}
    return {**out, 'window': hw} if canvas else out

  def examples(epoch, skip: int = 0):
    epoch = tf.cast(epoch, tf.int64)
    ds = source.read(_key(config.seed, process_index, epoch, _FILE_ORDER))
    shuffle_seed = _key(config.seed, process_index, epoch, _SHUFFLE)[0]
    ds = ds.shuffle(min(config.data.shuffle_buffer, n), seed=shuffle_seed,
                    reshuffle_each_iteration=False)
    augment_key = _key(config.seed, process_index, epoch, _AUGMENT)  # once per epoch
    if repeats == 1:
      return skip_undecodable(ds.enumerate().skip(skip),
                              lambda i, record: transform(augment_key, epoch, i, record))
    first = skip // (repeats * window) * window  # the first image of skip's window
    images = skip_undecodable(ds.take(distinct).enumerate().skip(first),
                              lambda q, record: copies(augment_key, epoch, q, record))
    # Round-robin over a window's images gives copy 0 of each, then copy 1, ...: the order of
    # the positions. Only the epoch's last window is shorter, so it ends the epoch's stream.
    ds = images.interleave(each_copy, cycle_length=window, block_length=1)
    ds = ds.map(cut, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.skip(skip - first * repeats).take(n - skip)

  return examples


def train_dataset(source: sources.Source, config: ml_collections.ConfigDict, *, process_index: int,
                  local_batch: int, start: int = 0, canvas: int = 0) -> tf.data.Dataset:
  """Endless local batches {'image': uint8 (b, S, S, 3), 'label': int32 (b,), 'ok': bool (b,),
  'example_id': int32 (b, 3)}: the record's (process_index, epoch, position), which seeds its
  crop here and the rest of its augmentation on the device.

  `start`: how many examples of this process's stream to leave out, e.g. after resuming.
  They are skipped as encoded records, only within their epoch. `canvas` > 0: the resize is
  left to the device, and 'image' is uint8 (b, canvas, canvas, 3) with each window's (height,
  width) in 'window': int32 (b, 2) (`augment.window_canvas`).
  """
  n = source.num_examples
  if n == 0:
    raise sources.InputError(f'this process got no training examples of {config.data.name}: use a '
                     'larger split or fewer processes.')
  check_some_decode(source, _augment_fn(config, process_index, canvas), config)
  examples = _epoch_examples(source, config, process_index=process_index,
                             local_batch=local_batch, canvas=canvas)
  first, skip = divmod(start, n)
  ds = examples(first, skip).concatenate(
      tf.data.Dataset.range(first + 1, _MAX_EPOCHS).flat_map(examples))
  ds = _batch(ds, local_batch, canvas, drop_remainder=True).map(fill_skipped)
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

  def with_placeholders(previous, item):
    # One stage for counting the gap and stacking: each tf.data stage costs per element.
    number, example = item
    missing = number - previous - 1

    def stacked():
      return {k: tf.concat([tf.zeros(tf.concat([[missing], tf.shape(v)], 0), v.dtype), v[None]],
                           axis=0) for k, v in example.items()}
    rows = tf.cond(missing > 0, stacked, lambda: {k: v[None] for k, v in example.items()})
    return number, {**rows, 'ok': tf.range(missing + 1) == missing}

  return decoded.scan(tf.constant(-1, tf.int64), with_placeholders).unbatch()


def _augment_fn(config: ml_collections.ConfigDict, process_index: int,
                canvas: int = 0) -> Callable:
  """(augment_key, epoch, position, record) -> {'image', 'label', 'example_id'[, 'window']}:
  the host's part of the train transform (`preprocess.train_crop`, or `train_window` with a
  `canvas`), seeded by the record's place in this process's stream (`augment_key`: the epoch's
  `_key(seed, process_index, epoch, _AUGMENT)`), and that place for the device's part."""
  size = config.model.image_size

  def augment(augment_key, epoch, position, record):
    key = _key(position, key=augment_key)
    example_id = tf.cast(tf.stack([tf.cast(process_index, tf.int64), epoch, position]), tf.int32)
    out = {'label': tf.cast(record['label'], tf.int32), 'example_id': example_id}
    if not canvas:
      return {**out, 'image': preprocess.train_crop(record['image'], key, size=size,
                                                    aug=config.aug)}
    image, window = preprocess.train_window(record['image'], key, size=size, canvas=canvas,
                                            aug=config.aug)
    return {**out, 'image': image, 'window': window}
  return augment


def check_some_decode(source: sources.Source, augment: Callable,
                      config: ml_collections.ConfigDict) -> None:
  """Raises InputError when none of the first `_PROBE_RECORDS` records (in file order) gets
  through `augment`, the train transform (`_augment_fn`): skipping every image would leave the
  train stream waiting forever. Costs one transformed image on readable data."""
  epoch, key = tf.constant(0, tf.int64), _key(0)
  probe = source.read(None).take(_PROBE_RECORDS).enumerate().map(
      lambda position, record: augment(key, epoch, position, record))
  if not any(True for _ in probe.ignore_errors().take(1)):
    raise sources.InputError(_undecodable(config, f'none of the first '
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

  def filled():
    rows = tf.range(tf.shape(ok)[0])
    valid = tf.boolean_mask(rows, ok)
    count = tf.maximum(tf.size(valid), 1)  # no valid row at all: the placeholders stay
    source = tf.where(ok, rows, tf.gather(tf.concat([valid, [0]], 0), rows % count))
    return {k: tf.gather(v, source) for k, v in batch.items() if k != 'ok'}

  # Nearly every batch has nothing to fill: it is not copied.
  rest = tf.cond(tf.reduce_all(ok), lambda: {k: v for k, v in batch.items() if k != 'ok'}, filled)
  return {**rest, 'ok': ok}


def eval_dataset(source: sources.Source, config: ml_collections.ConfigDict, *,
                 local_batch: int, canvas: int = 0) -> tf.data.Dataset:
  """One pass of local batches {'image': uint8 (b, S, S, 3), 'label'} (and 'real' where the
  dataset has it); the last one may be short. The device normalizes the images.

  `canvas` > 0: the resize and crop are left to the device, and 'image' is uint8 (b, canvas,
  canvas, 3), each whole image at the top left, with its (height, width) in 'window': int32
  (b, 2), or (0, 0) for an image larger than the canvas, cropped here (`preprocess.eval_window`).
  """
  transform = input_spec.eval_transform(config.eval)
  settings = dict(size=config.model.image_size, crop_pct=transform['crop_pct'],
                  interpolation=transform['interpolation'])

  def prepare(record):
    out = {'label': tf.cast(record['label'], tf.int32)}
    if canvas:
      out['image'], out['window'] = preprocess.eval_window(record['image'], canvas=canvas,
                                                           **settings)
    else:
      out['image'] = preprocess.eval_crop(record['image'], **settings)
    return {**out, 'real': record['real']} if 'real' in record else out

  ds = source.read(None)
  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return _batch(ds, local_batch, canvas).with_options(_options(config)).prefetch(tf.data.AUTOTUNE)


def _batch(ds: tf.data.Dataset, local_batch: int, canvas: int, *,
           drop_remainder: bool = False) -> tf.data.Dataset:
  if not canvas:
    return ds.batch(local_batch, drop_remainder=drop_remainder)
  # Images of any size, zero-padded into the canvas as they are batched: padding each image
  # in the parallel map instead costs several times more (docs/performance.md).
  shapes = {k: [canvas, canvas, 3] if k == 'image' else v.shape
            for k, v in ds.element_spec.items()}
  return ds.padded_batch(local_batch, padded_shapes=shapes, drop_remainder=drop_remainder)


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
    raise sources.InputError(f'process_index {index} is not in [0, {count}).')
  return index, count


def check_train_data(config: ml_collections.ConfigDict, dataset: datasets.Dataset) -> None:
  """`check_some_decode` on this process's share of the train split, so that a run can refuse
  data it cannot train on before it writes anything.

  With several processes they agree first, so that every one stops with the reason instead of
  the others waiting in their next collective until it times out.
  """
  index, count = _processes(None, None)
  source = sources.split_source(config, dataset, config.data.train_split, index, count,
                        first=_PROBE_RECORDS)
  error = None
  try:
    if source.num_examples:
      check_some_decode(source, _augment_fn(config, index), config)
  except sources.InputError as e:
    if count == 1:
      raise
    error = e
  if count > 1:
    failed = np.flatnonzero(multihost_utils.process_allgather(np.int32(error is not None)))
    if error is not None:
      raise sources.InputError(f'process {index} of {count}: {error}') from None
    if failed.size:
      raise sources.InputError(f'process {failed[0]} of {count}: '
                       + _undecodable(config, 'none of its first training images'))


def train_iterator(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, step: int = 0,
                   *, dataset: datasets.Dataset | None = None, process_index: int | None = None,
                   process_count: int | None = None) -> feeding.TrainIterator:
  """Endless global batches {'image': uint8 (B, S, S, 3), 'label': int32 (B,), 'ok': bool (B,),
  'example_id': int32 (B, 3)} (see `train_dataset`).

  `step`: batches already trained on (a resumed run's step). `dataset`: the run's opened
  dataset; None opens the config's (`datasets.open_dataset`). `process_index` /
  `process_count` override JAX's, to act as one of several processes (tests, tools); the arrays
  then hold just that process's rows.
  """
  index, count = _processes(process_index, process_count)
  local_batch = feeding.local_batch_size(config.batch_size, mesh, count)
  dataset = dataset or datasets.open_dataset(config)
  source = sources.split_source(config, dataset, config.data.train_split, index, count)
  # The one source of the input position: step * batch_size examples used, an equal part of
  # them from each process's stream. So the same process count resumes with exactly the
  # original batches, and another count at the same epoch and fraction of it (new batches).
  start = step * local_batch
  canvas = augment.window_canvas(config.aug, config.model.image_size,
                                 mesh.devices.flat[0].platform)
  ds = train_dataset(source, config, process_index=index, local_batch=local_batch, start=start,
                     canvas=canvas)
  return feeding.TrainIterator(ds.as_numpy_iterator(), sharding.batch_sharding(mesh),
                       prefetch=config.data.prefetch)


def eval_iterator(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *,
                  dataset: datasets.Dataset | None = None, process_index: int | None = None,
                  process_count: int | None = None) -> feeding.EvalIterator:
  """Every example of `config.data.eval_split` exactly once per pass, over all processes.

  `dataset`: the run's opened dataset; None opens the config's (`datasets.open_dataset`).
  """
  index, count = _processes(process_index, process_count)
  local_batch = feeding.eval_local_batch_size(config.eval_batch_size, mesh, count)
  dataset = dataset or datasets.open_dataset(config)
  total = dataset.num_eval
  source = sources.split_source(config, dataset, config.data.eval_split, index, count)
  # even_splits gives the first (total % count) processes one extra example.
  num_batches = math.ceil(math.ceil(total / count) / local_batch)
  ds = eval_dataset(source, config, local_batch=local_batch,
                    canvas=augment.eval_canvas(config, mesh.devices.flat[0].platform))
  return feeding.EvalIterator(ds, sharding.batch_sharding(mesh), local_batch=local_batch,
                      num_batches=num_batches, num_examples=total, undecodable=source.undecodable)
