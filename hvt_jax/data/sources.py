"""Where the input's records come from: one process's share of a split, read once.

A `Source` is a share's size and a function that reads it as {'image': encoded bytes, 'label'}
(and 'real' where the dataset has ReaL labels), optionally in a file order drawn from a key:
prepared TFDS TFRecords (`tfds_source`), an image folder (`folder_source`), or encoded images in
memory (`memory_source`). `split_source` picks the one the run's dataset needs. What is done with
the records, the train and eval tf.data pipelines, is `input_pipeline`'s.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from hvt_jax.data import datasets, folders
from hvt_jax.errors import InputError

try:  # tf.data only needs the CPU; keep TensorFlow off the accelerators JAX uses
  tf.config.set_visible_devices([], 'GPU')
except RuntimeError:  # TensorFlow already initialized its devices; too late, harmless on CPU
  pass

_READ_PARALLELISM = 16  # files read at once: enough to hide storage latency


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
