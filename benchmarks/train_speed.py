"""End-to-end training speed: the real loop (input pipeline, device transfer, train step) on
ImageNet-sized synthetic JPEGs, and how much of its time the step waited for input.

  python benchmarks/train_speed.py --config=configs/hvt_s.py --config.batch_size=16 --steps=10
  python benchmarks/train_speed.py --config=configs/hvt_s.py:recipe=plain --config.batch_size=16
  python benchmarks/train_speed.py --config=configs/hvt_s.py --config.batch_size=256 \\
      --target_img_s=9195 --json=benchmarks/results/train_speed.jsonl    # an accelerator host
  # the host's cost alone: a near-free model, so the CPU device's compute is not counted
  python benchmarks/train_speed.py --config=configs/hvt_s.py --config.batch_size=64 \\
      --config.model.depth=1 --config.model.num_heads=1 --config.model.head_dim=16 \\
      --config.model.patch_size=32 --target_img_s=9195

It writes an image folder of synthetic 500x375 JPEGs (`synthetic_images.py`; about ImageNet's
mean size) into a temporary directory and runs `hvt_jax.training.loop.train_and_evaluate` on it,
`data=folder:DIR` with any `--config` and `--config.key=value` overrides, as `python -m
hvt_jax.main` would: `--warmup_steps` untimed (compilation, and the batches tf.data buffered
meanwhile, which later steps would otherwise get for free), then `--steps` timed ones, both
rounded up to whole log intervals, and the loop's one evaluation at the end (not timed either).
It prints, read back from the run's metrics.jsonl, so that the figures are the training log's own:

  - images/s over the timed steps (`train/images_per_sec_per_device` x devices);
  - the share of that time the device waited for the next batch (`perf/input_wait`);
  - host CPU ms per image: the process's CPU time over the timed steps, every thread
    (`perf/host_cpu_ms_per_image`); on a CPU backend that includes the train step's own
    compute, so use the near-free model above there for the host's cost alone;
  - the cores this host has and the rate they could feed at that cost, and with
    `--target_img_s=R` (an accelerator's step rate) the busy cores feeding R images/s takes.

`--json=FILE` appends those figures as one JSON line (benchmarks/results/ keeps them;
`python benchmarks/speed_report.py FILE` prints them as a markdown table).
"""
from __future__ import annotations

import math
import os
import platform
import sys
import tempfile

from absl import flags
import jax
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import speed_report  # noqa: E402 (benchmarks/ is not a package)
import synthetic_images  # noqa: E402

from hvt_jax import cli  # noqa: E402
from hvt_jax.data import folders  # noqa: E402
from hvt_jax.errors import UserError  # noqa: E402
from hvt_jax.training import curves, host_memory, loop  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'training config file, optionally with :args',
                                lock_config=True)
flags.DEFINE_integer('steps', 20, 'timed train steps (rounded up to whole log intervals)')
flags.DEFINE_integer('warmup_steps', 10, 'untimed steps first (at least one log interval)')
flags.DEFINE_integer('log_every', 5, 'steps per log interval: the loop\'s figures are per interval')
flags.DEFINE_integer('images', 0, 'train images in the folder; 0: 4 global batches, at least 512')
flags.DEFINE_integer('distinct', 128, 'distinct JPEGs the folder\'s files are hard links to')
flags.DEFINE_integer('classes', 10, 'class folders (sets config.model.num_classes)')
flags.DEFINE_float('target_img_s', None, 'an accelerator\'s step rate (images/s): print the '
                   'busy host cores feeding it takes')
flags.DEFINE_string('workdir', None, 'keep the run here (a new directory); default: a temporary '
                    'one, removed')
flags.DEFINE_string('json', None, 'append one JSON line with the figures here')
flags.mark_flags_as_required(['config'])


class TrainSpeedError(UserError):
  pass


def timed_rows(workdir: str, after_step: int) -> list[dict]:
  """The train rows of metrics.jsonl logged after `after_step`."""
  return [r for r in curves.read(workdir) if 'perf/input_wait' in r and r['step'] > after_step]


def summarize(rows: list[dict], batch_size: int, devices: int, after_step: int) -> dict:
  """The timed rows (logged after `after_step`) as one measurement: each row weighs by its wall
  time (its images over its rate), so the figures are those of the timed steps taken together."""
  steps = [r['step'] - prev for r, prev in zip(rows, [after_step] + [r['step'] for r in rows])]
  images = [s * batch_size for s in steps]
  walls = [n / (r['train/images_per_sec_per_device'] * devices) for n, r in zip(images, rows)]
  wall = sum(walls)
  return {'timed_steps': sum(steps), 'img_s': sum(images) / wall,
          'input_wait': sum(r['perf/input_wait'] * w for r, w in zip(rows, walls)) / wall,
          # per image of this process's share of each batch, as the loop logs it
          'host_cpu_ms_per_image': sum(r['perf/host_cpu_ms_per_image'] * n
                                       for r, n in zip(rows, images)) / sum(images)}


def run_config(config, root: str, total_steps: int):
  """The user's config on the synthetic folder, stopping after `total_steps`, with one small
  evaluation and no checkpoint before the end."""
  folders.use(config, root)
  devices = jax.device_count()
  config.update(max_steps=total_steps, log_every_steps=FLAGS.log_every,
                eval_every_steps=10 * total_steps, checkpoint_every_steps=10 * total_steps,
                eval_batch_size=math.ceil(FLAGS.classes / devices) * devices, init_from='',
                eval_only=False)
  steps_per_epoch = max(1, FLAGS.images // config.batch_size)
  config.num_epochs = max(config.num_epochs, math.ceil(total_steps / steps_per_epoch))
  return config


def main(argv):
  if len(argv) > 1:
    raise TrainSpeedError(f'unexpected arguments: {argv[1:]}')
  if FLAGS.steps < 1 or FLAGS.log_every < 1 or FLAGS.warmup_steps < 0:
    raise TrainSpeedError('--steps and --log_every take positive numbers, --warmup_steps one '
                          '>= 0.')
  config = cli.config()
  batch = config.batch_size
  FLAGS.images = FLAGS.images or max(512, 4 * batch)
  if FLAGS.images < batch:
    raise TrainSpeedError(f'--images={FLAGS.images} is less than one batch ({batch}); pass more.')
  intervals = lambda steps: max(1, math.ceil(steps / FLAGS.log_every))
  warmup = FLAGS.log_every * intervals(FLAGS.warmup_steps)
  total_steps = warmup + FLAGS.log_every * intervals(FLAGS.steps)
  if FLAGS.workdir and os.path.exists(FLAGS.workdir):
    raise TrainSpeedError(f'--workdir: {FLAGS.workdir} exists; pass a new directory.')

  with tempfile.TemporaryDirectory(prefix='train_speed_') as tmp:
    root = os.path.join(tmp, 'images')
    jpegs = synthetic_images.synthetic_jpegs(FLAGS.distinct)
    synthetic_images.write_folder(root, jpegs, train=FLAGS.images, val=FLAGS.classes,
                                  classes=FLAGS.classes)
    config = run_config(config, root, total_steps)
    workdir = FLAGS.workdir or os.path.join(tmp, 'run')
    m = config.model
    print(f'data: {FLAGS.images} synthetic 500x375 JPEGs, mean '
          f'{sum(map(len, jpegs)) / len(jpegs) / 1024:.0f} KB ({FLAGS.distinct} distinct), '
          f'{FLAGS.classes} classes')
    print(f'model: {m.num_heads}x{m.head_dim} wide, depth {m.depth}, patch {m.patch_size}, '
          f'{m.image_size}x{m.image_size}, pool every {m.pool_every}; batch {batch}; '
          f'randaugment={config.aug.randaugment!r}, random_erase={config.aug.random_erase}, '
          f'mixup={config.mix.mixup}, cutmix={config.mix.cutmix}; tf.data threads: '
          f'{config.data.threads or "all"}')
    loop.train_and_evaluate(config, workdir)
    rows = timed_rows(workdir, warmup)
  got = summarize(rows, batch, jax.device_count(), warmup)
  device = jax.devices()[0]
  cores = os.cpu_count()
  cpu_ms = got['host_cpu_ms_per_image']
  print(f'jax {jax.__version__}, {jax.device_count()} x {device.device_kind} ({device.platform}), '
        f'host {platform.processor() or platform.machine()} with {cores} cores')
  print(f'timed: steps {warmup + 1}-{warmup + got["timed_steps"]} (after {warmup} untimed: '
        'compilation, the pipeline\'s start)')
  print(f'  {got["img_s"]:9.1f} images/s')
  print(f'  {100 * got["input_wait"]:9.1f} % of the time the step waited for input')
  includes = '; includes the CPU device\'s train step' if device.platform == 'cpu' else ''
  print(f'  {cpu_ms:9.2f} host CPU ms per image (all threads{includes})')
  print(f'  {cores * 1e3 / cpu_ms:9.1f} images/s at most from this host\'s {cores} cores at that '
        'cost')
  row = {'args': sys.argv[1:], 'batch': batch, 'image_size': config.model.image_size,
         'model': config.model.to_dict(), 'aug': config.aug.to_dict(), 'mix': config.mix.to_dict(),
         **got, 'device': device.device_kind, 'platform': device.platform,
         'devices': jax.device_count(), 'host_cores': cores, 'jax': jax.__version__}
  if FLAGS.target_img_s:
    need = FLAGS.target_img_s * cpu_ms / 1e3
    print(f'  {need:9.1f} busy cores to feed {FLAGS.target_img_s:.0f} images/s (--target_img_s)')
    row.update(target_img_s=FLAGS.target_img_s, cores_for_target=need)
  if FLAGS.json:
    speed_report.append_row(FLAGS.json, row)


if __name__ == '__main__':
  host_memory.configure()  # as training does (hvt_jax/training/host_memory.py)
  cli.run(main)
