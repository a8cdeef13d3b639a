"""Host-side input speed: train and eval CPU milliseconds per image, and images/s.

  python benchmarks/input_speed.py                         # hvt_digits at 224 (offline)
  python benchmarks/input_speed.py --synthetic             # ImageNet-sized JPEGs (~500x375)
  python benchmarks/input_speed.py --dataset=imagenet2012 --data_dir=/data/tfds
  python benchmarks/input_speed.py --threads=4 --recipe=plain
  python benchmarks/input_speed.py --synthetic --breakdown  # where the train milliseconds go
  python benchmarks/input_speed.py --synthetic --resize_on=host  # the resize on the host too

It times the real tf.data pipelines of `input_pipeline` (read, shuffle, decode-and-crop, resize,
skip-and-fill, batch) up to host numpy uint8 batches; device transfer and the augmentation the
train step does on the device are left out. `--resize_on=device` (the default, what training
on a GPU or TPU does): the host decodes each train window, and each eval image whole, into a
canvas, and the device resizes (and for eval center-crops) it; `host`: the host resizes to
S x S too, as training on a CPU backend does. The number of
tf.data threads is fixed (`--threads`, default: every core), so the per-thread figure tells
how many cores a given accelerator throughput needs. CPU time (every thread of this process)
per image is the figure that stays meaningful on a busy or shared machine.

`--breakdown` times the train stream cut after each piece, one tf.data thread: the record stream
alone (read, shuffle, number), + decode-and-crop of the window, + the resize to S x S, and the
whole pipeline; the differences are each piece's cost, the rest is tf.data's (skipping and
filling undecodable records, batching, and with the resize on the device the padding into
canvases and the host resize of windows larger than the canvas). Last, the rate of batching
alone, a serial stage whose rate bounds a process's however many cores decode. The pieces
decode one window per example; with repeated augmentation (`--recipe=paper`) the whole
pipeline decodes an image once for its copies, so its line can come out below theirs.

hvt_digits images are 32x32, so decoding them costs nothing next to ImageNet's ~110 KB JPEGs:
`--synthetic` encodes photo-like 500x375 JPEGs of about that size in memory instead.
"""
from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
import tensorflow as tf
from absl import app, flags

from hvt_jax import defaults
from hvt_jax.data import augment, datasets, input_pipeline, preprocess, sources
from hvt_jax.training import host_memory
from synthetic_images import synthetic_jpegs  # beside this file

FLAGS = flags.FLAGS
flags.DEFINE_string('dataset', 'hvt_digits', 'TFDS dataset (prepared, or preparable offline)')
flags.DEFINE_string('data_dir', None, 'TFDS data dir')
flags.DEFINE_bool('synthetic', False, 'time in-memory synthetic JPEGs of ImageNet size instead')
flags.DEFINE_integer('image_size', 224, 'output size S (S x S)')
flags.DEFINE_integer('batch', 64, 'images per batch')
flags.DEFINE_integer('batches', 20, 'timed batches per measurement, after warm-up ones')
flags.DEFINE_integer('threads', os.cpu_count(), 'tf.data threads (config.data.threads)')
flags.DEFINE_enum('recipe', 'paper', ['paper', 'plain'], 'paper: the defaults (repeated '
                  'augmentation on the host; RandAugment and erasing run on the device); plain: '
                  'crop + flip only')
flags.DEFINE_bool('breakdown', False, 'time the train pipeline piece by piece (one thread)')
flags.DEFINE_integer('warmup', 3, 'untimed batches first (tracing, buffer filling)')
flags.DEFINE_enum('resize_on', 'device', ['device', 'host'], 'where the train crop is resized to '
                  'S x S (config.aug.resize_on); device: the host pads windows into a canvas')


def config_for_run():
  config = defaults.train_config()
  defaults.use_recipe(config, FLAGS.recipe)
  config.data.update(name=FLAGS.dataset, data_dir=FLAGS.data_dir, threads=FLAGS.threads,
                     shuffle_buffer=1024)
  config.model.image_size = FLAGS.image_size
  config.aug.resize_on = FLAGS.resize_on
  return config


def canvas_of(config) -> int:
  """The canvas the train batches pad windows into (0: resized on the host), as on a GPU."""
  return augment.window_canvas(config.aug, config.model.image_size, 'gpu')


def images_per_sec(dataset, batch: int) -> tuple[float, float]:
  """(images/s of wall time, CPU milliseconds of this process per image).

  The CPU time counts every thread's work, so it stays meaningful on a busy or shared machine,
  where the wall-clock rate drops with the other load.
  """
  batches = dataset.as_numpy_iterator()
  for _ in range(FLAGS.warmup):
    next(batches)
  start, cpu = time.perf_counter(), time.process_time()
  for _ in range(FLAGS.batches):
    next(batches)
  images = FLAGS.batches * batch
  return images / (time.perf_counter() - start), 1e3 * (time.process_time() - cpu) / images


def breakdown(source, config) -> None:
  """CPU ms per image of the train stream cut after each piece, on one tf.data thread."""
  size, aug, canvas = config.model.image_size, config.aug, canvas_of(config)
  # The record stream as the pipeline reads it, one record per example (no repeated
  # augmentation: the pieces are one decode each), numbered within its epoch.
  records = tf.data.Dataset.range(2 ** 40).flat_map(
      lambda epoch: source.read(None).shuffle(config.data.shuffle_buffer, seed=epoch)
      .enumerate().map(lambda i, record: (epoch, i, record)))

  def window(epoch, position, record):
    # pylint: disable-next=protected-access
    key = input_pipeline._key(config.seed, 0, epoch, input_pipeline._AUGMENT, position)
    return preprocess._random_window(record['image'], key, aug)  # pylint: disable=protected-access

  pieces = {
      'record stream (read, shuffle, number)': lambda e, p, r: tf.strings.length(r['image']),
      '+ decode-and-crop': lambda e, p, r: window(e, p, r)[0, 0, 0],
      '+ resize': lambda e, p, r: preprocess.resize(window(e, p, r), size, size,
                                                   aug.interpolation)[0, 0, 0],
  }
  options = tf.data.Options()
  options.threading.private_threadpool_size = 1
  options.threading.max_intra_op_parallelism = 1
  # Mapped as the pipeline maps (parallel calls on the private pool, in order).
  if canvas:
    del pieces['+ resize']
  timed = {name: records.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
           .batch(FLAGS.batch).with_options(options) for name, fn in pieces.items()}
  config.data.threads = 1
  timed['whole train pipeline'] = input_pipeline.train_dataset(
      source, config, process_index=0, local_batch=FLAGS.batch, canvas=canvas)
  previous = 0.0
  print(f'train pipeline piece by piece, 1 tf.data thread, {size}x{size}:')
  for name, ds in timed.items():
    _, cpu_ms = images_per_sec(ds, FLAGS.batch)
    print(f'  {name:40s} {cpu_ms:5.2f} CPU ms per image (+{cpu_ms - previous:5.2f})')
    previous = cpu_ms
  # Batching is one serial stage, whatever the threads: its rate bounds a process's. Timed on
  # a batch of decoded crops held in memory, batched over and over as the pipeline batches.

  def crop(epoch, position, record):
    x = window(epoch, position, record)
    if canvas:
      return {'image': x, 'window': tf.shape(x)[:2]}
    return {'image': preprocess.resize_window(x, size=size, aug=aug)}

  crops = records.take(FLAGS.batch).map(crop)
  # pylint: disable-next=protected-access
  batched = input_pipeline._batch(crops.cache().repeat(), FLAGS.batch, canvas,
                                  drop_remainder=True).with_options(options)
  rate, _ = images_per_sec(batched, FLAGS.batch)
  what = f'into {canvas}x{canvas} canvases' if canvas else f'of {size}x{size} images'
  print(f'  batching alone ({what}), a serial stage: {rate:7.0f} images/s at most per process')


def main(argv):
  del argv
  config = config_for_run()
  if FLAGS.synthetic:
    jpegs = synthetic_jpegs()
    source = sources.memory_source(np.array(jpegs, dtype=object),
                                          np.zeros(len(jpegs), np.int64))
    what = (f'synthetic JPEGs 500x375, mean {np.mean([len(j) for j in jpegs]) / 1024:.0f} KB '
            f'({len(jpegs)} in memory)')
    train_source = eval_source = source
  else:
    b = datasets.ensure_prepared(config)
    train_source = sources.tfds_source(b, config.data.train_split)
    eval_split = 'test' if 'validation' not in b.info.splits else 'validation'
    eval_source = sources.tfds_source(b, eval_split)
    what = f'{b.name} ({config.data.train_split} / {eval_split}) from {b.data_dir}'

  if FLAGS.breakdown:
    print(f'data: {what}')
    breakdown(train_source, config)
    return
  train = input_pipeline.train_dataset(train_source, config, process_index=0,
                                       local_batch=FLAGS.batch, canvas=canvas_of(config))
  # Eval: endless passes over the records, so the measurement can outlast a small split and
  # every batch is full.
  endless = dataclasses.replace(eval_source, read=lambda key: eval_source.read(key).repeat())
  evals = input_pipeline.eval_dataset(endless, config, local_batch=FLAGS.batch,
                                      canvas=augment.eval_canvas(config, 'gpu'))

  threads = FLAGS.threads
  print(f'data: {what}')
  canvas = canvas_of(config)
  shape = f'{canvas}x{canvas} canvases' if canvas else f'{FLAGS.image_size}x{FLAGS.image_size}'
  print(f'output uint8 {shape}, batch {FLAGS.batch}, recipe '
        f'{FLAGS.recipe} (repeated_aug={config.aug.repeated_aug}; flip, RandAugment, erasing '
        f'and normalization run on the device), tf.data threads: {threads} of {os.cpu_count()} '
        'CPU cores')
  for name, ds in (('train', train), ('eval', evals)):
    rate, cpu_ms = images_per_sec(ds, FLAGS.batch)
    print(f'{name:5s}: {rate:8.1f} images/s total, {rate / threads:7.1f} per thread; '
          f'{cpu_ms:5.2f} CPU ms per image = {1e3 / cpu_ms:6.1f} images/s per busy core')


if __name__ == '__main__':
  host_memory.configure()  # as training does (hvt_jax/training/host_memory.py)
  app.run(main)
