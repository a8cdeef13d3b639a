"""Host-side input speed: train and eval preprocessing images/s, total and per tf.data thread.

  python benchmarks/input_speed.py                         # hvt_digits at 224 (offline)
  python benchmarks/input_speed.py --synthetic             # ImageNet-sized JPEGs (~500x375)
  python benchmarks/input_speed.py --dataset=imagenet2012 --data_dir=/data/tfds
  python benchmarks/input_speed.py --threads=4 --recipe=plain

It times the real tf.data pipelines of `input_pipeline` (read, shuffle, decode-and-crop,
RandAugment, erasing, batch) up to host numpy batches; device transfer is left out. The number
of tf.data threads is fixed (`--threads`, default: every core), so the per-thread figure tells
how many cores a given accelerator throughput needs.

hvt_digits images are 32x32, so decoding them costs nothing next to ImageNet's ~110 KB JPEGs:
`--synthetic` encodes photo-like 500x375 JPEGs of about that size in memory instead.
"""
from __future__ import annotations

import os
import time

import numpy as np
from absl import app, flags

from hvt_jax import defaults
from hvt_jax.data import datasets, input_pipeline
from synthetic_images import synthetic_jpegs  # beside this file

FLAGS = flags.FLAGS
flags.DEFINE_string('dataset', 'hvt_digits', 'TFDS dataset (prepared, or preparable offline)')
flags.DEFINE_string('data_dir', None, 'TFDS data dir')
flags.DEFINE_bool('synthetic', False, 'time in-memory synthetic JPEGs of ImageNet size instead')
flags.DEFINE_integer('image_size', 224, 'output size S (S x S)')
flags.DEFINE_integer('batch', 64, 'images per batch')
flags.DEFINE_integer('batches', 20, 'timed batches per measurement, after warm-up ones')
flags.DEFINE_integer('threads', os.cpu_count(), 'tf.data threads (config.data.threads)')
flags.DEFINE_enum('recipe', 'paper', ['paper', 'plain'], 'paper: RandAugment + erasing; plain: '
                  'crop + flip only')
flags.DEFINE_integer('warmup', 3, 'untimed batches first (tracing, buffer filling)')


def config_for_run():
  config = defaults.train_config()
  defaults.use_recipe(config, FLAGS.recipe)
  config.data.update(name=FLAGS.dataset, data_dir=FLAGS.data_dir, threads=FLAGS.threads,
                     shuffle_buffer=1024)
  config.model.image_size = FLAGS.image_size
  return config


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


def main(argv):
  del argv
  config = config_for_run()
  if FLAGS.synthetic:
    jpegs = synthetic_jpegs()
    source = input_pipeline.memory_source(np.array(jpegs, dtype=object),
                                          np.zeros(len(jpegs), np.int64))
    what = (f'synthetic JPEGs 500x375, mean {np.mean([len(j) for j in jpegs]) / 1024:.0f} KB '
            f'({len(jpegs)} in memory)')
    train_source = eval_source = source
  else:
    b = datasets.ensure_prepared(config)
    train_source = input_pipeline.tfds_source(b, config.data.train_split)
    eval_split = 'test' if 'validation' not in b.info.splits else 'validation'
    eval_source = input_pipeline.tfds_source(b, eval_split)
    what = f'{b.name} ({config.data.train_split} / {eval_split}) from {b.data_dir}'

  train = input_pipeline.train_dataset(train_source, config, process_index=0,
                                       local_batch=FLAGS.batch)
  # Eval: endless passes, so the measurement can outlast a small split.
  evals = input_pipeline.eval_dataset(eval_source, config, local_batch=FLAGS.batch).unbatch()
  evals = evals.repeat().batch(FLAGS.batch).prefetch(2)

  threads = FLAGS.threads
  print(f'data: {what}')
  print(f'output {FLAGS.image_size}x{FLAGS.image_size}, batch {FLAGS.batch}, recipe '
        f'{FLAGS.recipe} (randaugment={config.aug.randaugment!r}, random_erase='
        f'{config.aug.random_erase}), tf.data threads: {threads} of {os.cpu_count()} CPU cores')
  for name, ds in (('train', train), ('eval', evals)):
    rate, cpu_ms = images_per_sec(ds, FLAGS.batch)
    print(f'{name:5s}: {rate:8.1f} images/s total, {rate / threads:7.1f} per thread; '
          f'{cpu_ms:5.2f} CPU ms per image = {1e3 / cpu_ms:6.1f} images/s per busy core')


if __name__ == '__main__':
  app.run(main)
