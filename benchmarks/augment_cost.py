"""What the on-device augmentation (flip, RandAugment, normalization, random erasing; issue 25)
adds to the train step: XLA's FLOP count and the step time, with and without it.

  python benchmarks/augment_cost.py                        # HVT-S-1, batch 16, paper recipe
  python benchmarks/augment_cost.py --batch=64 --steps=5   # on an accelerator
  python benchmarks/augment_cost.py --steps=0              # FLOPs only
  python benchmarks/augment_cost.py --canvas=512           # with the crop's resize, as on a GPU
  python benchmarks/augment_cost.py --batch=256 --canvas=512 --transfer   # and the copy, on a GPU

Both steps are the real train step (`train_step.jit_steps`: mixup/cutmix, AdamW, EMA) on uint8
batches. "With" is the paper recipe (`--randaugment`, `--random_erase`, flip); "without" turns
flip, RandAugment and erasing off, so what is left of the augmentation is the normalization.
With `--canvas=C` the "with" side also resizes each example's window from a C x C canvas to
S x S first (`device_resize`, what the step does on a GPU or TPU), and the "without" side takes
S x S images as a host that resizes gives them; the eval step is then also compared on C x C
canvases (resized and center-cropped on the device) and on S x S images (unless `--noeval`).
With `--transfer` the "with" side is also timed fed from host memory, each step's batch copied to
the devices by the training loop's own feed (`data.feeding.TrainIterator`, `data.prefetch`
batches ahead): the device's side of the real loop, all of it but the host pipeline, which needs
no TensorFlow. With the host's CPU-ms per image (`input_speed.py`) it bounds the end-to-end rate.
Steps are timed interleaved (`--repeats` rounds of `--steps` steps each, after warm-up), and the
medians are compared. FLOPs come from XLA's cost analysis of the step with every block unrolled
(a loop body counts once), and of `augment.train_images` alone, per image.
"""
from __future__ import annotations

import itertools
import os
import statistics
import sys
import time

from absl import app, flags
import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import timing  # noqa: E402 (benchmarks/ is not a package)

from hvt_jax import defaults  # noqa: E402
from hvt_jax import model as model_lib  # noqa: E402
from hvt_jax.data import augment, feeding  # noqa: E402
from hvt_jax import sharding  # noqa: E402
from hvt_jax.training import host_memory, train_step  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string('model', 'hvt-s-1', 'model variant')
flags.DEFINE_integer('batch', 16, 'global batch size')
flags.DEFINE_integer('steps', 3, 'timed steps per round; 0: FLOPs only')
flags.DEFINE_integer('repeats', 3, 'interleaved rounds; medians are compared')
flags.DEFINE_string('dtype', None, 'compute dtype; default bfloat16 on accelerators, float32 on CPU')
flags.DEFINE_string('randaugment', 'rand-m9-mstd0.5-inc1', 'the "with" side\'s RandAugment spec')
flags.DEFINE_float('random_erase', 0.25, 'the "with" side\'s erasing probability')
flags.DEFINE_integer('canvas', 0, 'the "with" side resizes windows from canvases of this side '
                     '(aug.window_canvas); 0: no resize')
flags.DEFINE_bool('eval', True, 'with --canvas, also time the eval step on canvases against S x S '
                  'images (two more compiles)')
flags.DEFINE_string('model_kw', '', 'extra HVT fields, e.g. depth=2,image_size=32 (a smoke run)')
flags.DEFINE_bool('transfer', False, 'also time the "with" side fed from host memory through '
                  'the training loop\'s feed (data.feeding)')


def _config(augmented: bool, dtype: str):
  config = defaults.train_config()
  config.model = model_lib.variant(FLAGS.model, drop_path=0.1, dtype=dtype,
                                  **timing.parse_model_kw(FLAGS.model_kw))
  config.batch_size = FLAGS.batch
  if augmented:
    config.aug.update(flip=True, randaugment=FLAGS.randaugment, random_erase=FLAGS.random_erase)
  else:
    config.aug.update(flip=False, randaugment='', random_erase=0.0)
  return config


class Side:
  """One config's compiled train step, its state and a batch, and its unrolled FLOP count."""

  def __init__(self, augmented: bool, dtype: str, mesh):
    self.config = config = _config(augmented, dtype)
    model, tx, schedule = timing.train_parts(config)
    spec = sharding.batch_sharding(mesh)
    self.canvas = canvas = FLAGS.canvas if augmented else 0
    abstract = timing.abstract_batch(FLAGS.batch, model.image_size, spec, canvas)
    self.flops = float(timing.unrolled_step_flops(model, tx, schedule, config, mesh, abstract)
                       or float('nan'))
    self.train = None
    if FLAGS.steps:
      self.state, shardings = train_step.create_state(model, tx, jax.random.key(0), ema=True,
                                                      mesh=mesh)
      p_train, _ = train_step.jit_steps(model, tx, schedule, config, shardings, mesh)
      self.train = p_train.lower(self.state, abstract).compile()
      host = timing.host_batch(FLAGS.batch, model.image_size, model.num_classes, canvas=canvas)
      self.batch = jax.device_put(host, spec)
      self.step = 0
      self.batch_bytes = sum(v.nbytes for v in host.values())
      if FLAGS.transfer and augmented:
        self.feed = feeding.TrainIterator(self._host_batches(host), spec,
                                          prefetch=config.data.prefetch)

  @staticmethod
  def _host_batches(host):
    """Endless host batches, a new epoch each: other examples, as in training."""
    for epoch in itertools.count(1):
      ids = host['example_id'].copy()
      ids[:, 1] = epoch
      yield {**host, 'example_id': ids}

  def seconds_per_step(self, steps: int, fed: bool = False) -> tuple[float, float]:
    """(wall, process CPU) seconds per step, on the batch kept on the devices or `fed` from
    host memory."""
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
      if fed:
        batch = next(self.feed)
      else:  # a new epoch each step: other examples, so other ops and boxes, as in training
        self.step += 1
        batch = {**self.batch, 'example_id': self.batch['example_id'].at[:, 1].set(self.step)}
      self.state, metrics = self.train(self.state, batch)
    jax.block_until_ready(metrics['loss'])
    return (time.perf_counter() - start) / steps, (time.process_time() - cpu) / steps


def augment_flops_per_image(config, canvas: int) -> float:
  """XLA's FLOPs of `augment.train_images` alone, per image, at the model's image size (from
  `canvas`-sided windows, if given)."""
  size = config.model.image_size
  fn = jax.jit(lambda x, ids, *hw: augment.train_images(
      x, ids, *hw, seed=0, aug=config.aug, mean=config.eval.mean, std=config.eval.std,
      size=size))
  side = canvas or size
  args = [jax.ShapeDtypeStruct((FLAGS.batch, side, side, 3), np.uint8),
          jax.ShapeDtypeStruct((FLAGS.batch, 3), np.int32)]
  if canvas:
    args.append(jax.ShapeDtypeStruct((FLAGS.batch, 2), np.int32))
  return timing.xla_cost(fn.lower(*args)).get('flops', float('nan')) / FLAGS.batch


def eval_cost(config, mesh, canvas: int) -> None:
  """Prints what the eval step's resize and center crop from `canvas`-sided canvases
  (`device_resize.eval_crops`, as on a GPU or TPU) add to it: FLOPs and step time, against the
  same step on S x S images a host that crops gives it."""
  model, tx, schedule = timing.train_parts(config)
  spec = sharding.batch_sharding(mesh)
  mask = jax.ShapeDtypeStruct((FLAGS.batch,), np.int32, sharding=spec)
  sides = {'canvas': canvas, 'S x S': 0}
  batches = {k: {**timing.abstract_batch(FLAGS.batch, model.image_size, spec, c), 'mask': mask}
             for k, c in sides.items()}
  flops = {k: timing.unrolled_step_flops(model, tx, schedule, config, mesh, b, step='eval')
           for k, b in batches.items()}
  print(f'eval step FLOPs (XLA, unrolled): from {canvas}x{canvas} canvases '
        f'{flops["canvas"] / 1e9:.2f} G, S x S {flops["S x S"] / 1e9:.2f} G: '
        f'+{100 * (flops["canvas"] / flops["S x S"] - 1):.2f}%')
  if not FLAGS.steps:
    return
  state, shardings = train_step.create_state(model, tx, jax.random.key(0), ema=True, mesh=mesh)
  _, p_eval = train_step.jit_steps(model, tx, schedule, config, shardings, mesh)
  ones = jax.device_put(np.ones(FLAGS.batch, np.int32), spec)
  data = {k: {**timing.random_batch(FLAGS.batch, model.image_size, model.num_classes, spec,
                                    canvas=c), 'mask': ones} for k, c in sides.items()}

  def seconds(k):
    start = time.perf_counter()
    for _ in range(FLAGS.steps):
      out = p_eval(state.params, data[k])
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / FLAGS.steps

  for k in sides:  # warm-up (compiles)
    seconds(k)
  rounds = [{k: seconds(k) for k in sides} for _ in range(FLAGS.repeats)]
  median = {k: statistics.median(r[k] for r in rounds) for k in sides}
  print(f'eval step wall time (median of {FLAGS.repeats} x {FLAGS.steps}): from canvases '
        f'{median["canvas"] * 1e3:.0f} ms, S x S {median["S x S"] * 1e3:.0f} ms: '
        f'+{100 * (median["canvas"] / median["S x S"] - 1):.1f}%')


def main(argv):
  del argv
  device = jax.devices()[0]
  dtype = FLAGS.dtype or timing.default_dtype(device)
  mesh = sharding.make_mesh(defaults.train_config().mesh)
  sides = {'with': Side(True, dtype, mesh), 'without': Side(False, dtype, mesh)}
  print(f'{FLAGS.model}, batch {FLAGS.batch}, {dtype}, {device.device_kind} x{mesh.size}; '
        f'with: flip, {FLAGS.randaugment}, random_erase {FLAGS.random_erase}'
        + (f', resized from {FLAGS.canvas}x{FLAGS.canvas} canvases' if FLAGS.canvas else ''))
  flops = {k: s.flops for k, s in sides.items()}
  aug_flops = augment_flops_per_image(sides['with'].config, FLAGS.canvas)
  print(f'train step FLOPs (XLA, unrolled): with {flops["with"] / 1e9:.2f} G, without '
        f'{flops["without"] / 1e9:.2f} G: +{100 * (flops["with"] / flops["without"] - 1):.2f}%')
  print(f'augmentation alone (train_images): {aug_flops / 1e6:.1f} MFLOP per image, '
        f'{100 * aug_flops * FLAGS.batch / flops["without"]:.2f}% of the step without it')
  if FLAGS.canvas and FLAGS.eval:
    eval_cost(sides['without'].config, mesh, FLAGS.canvas)
  if not FLAGS.steps:
    return
  timed = {k: side.seconds_per_step for k, side in sides.items()}
  if FLAGS.transfer:
    timed['fed'] = lambda steps: sides['with'].seconds_per_step(steps, fed=True)
  times = {k: [] for k in timed}
  for run in timed.values():  # warm-up
    run(1)
  for _ in range(FLAGS.repeats):
    for k, run in timed.items():
      times[k].append(run(FLAGS.steps))
  # Wall time, and the CPU time of all of the process's threads: on a shared machine the
  # second is the steadier measure of the work done.
  for i, what in enumerate(('wall', 'CPU')):
    median = {k: statistics.median(t[i] for t in v) for k, v in times.items()}
    print(f'step {what} time (median of {FLAGS.repeats} x {FLAGS.steps}): with '
          f'{median["with"] * 1e3:.0f} ms, without {median["without"] * 1e3:.0f} ms: '
          f'+{100 * (median["with"] / median["without"] - 1):.1f}%')
    if FLAGS.transfer:
      with_ = sides['with']
      fed, kept = (FLAGS.batch / median[k] for k in ('fed', 'with'))
      digits = 0 if kept >= 100 else 1
      rate = f'; {fed:,.{digits}f} against {kept:,.{digits}f} img/s' if what == 'wall' else ''
      print(f'  fed from host memory ({with_.batch_bytes / FLAGS.batch / 1024:.0f} KiB per image, '
            f'data.feeding, {with_.config.data.prefetch} batches ahead): '
            f'{median["fed"] * 1e3:.0f} ms, {100 * (median["fed"] / median["with"] - 1):+.1f}% '
            f'against the batch kept on the devices{rate}')
    print(f'  rounds ({what} ms): ' + '; '.join(
        f'{k} ' + ' '.join(f'{t[i] * 1e3:.0f}' for t in v) for k, v in times.items()))


if __name__ == '__main__':
  host_memory.configure()  # as training does (hvt_jax/training/host_memory.py)
  app.run(main)
