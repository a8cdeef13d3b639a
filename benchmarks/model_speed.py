"""Forward and train-step images/s of HVT-S-1 against the pool-free HVT-S-0, in one run.

  python benchmarks/model_speed.py                       # defaults: batch 64, bf16 on GPU/TPU
  python benchmarks/model_speed.py --batch=16 --steps=3  # CPU-sized

The train step is the real one (`train_step.train_step`: mixup/cutmix on device,
AdamW, EMA) at 224x224. The printed ratio S-0 time / S-1 time is what pooling buys;
the paper's GMACs ratio is 4.57 / 2.40 = 1.9x.
"""
from __future__ import annotations

import os
import platform
import time

from absl import app, flags
import jax
import numpy as np

from hvt_jax import defaults
from hvt_jax.training import optim, sharding, train_step
from hvt_jax.model import summary
from hvt_jax import model as model_lib

FLAGS = flags.FLAGS
flags.DEFINE_list('models', ['hvt-s-1', 'hvt-s-0'], 'models to time; the ratio compares the first two')
flags.DEFINE_integer('batch', 64, 'global batch size')
flags.DEFINE_integer('steps', 10, 'timed steps per measurement (after 2 warm-up steps)')
flags.DEFINE_string('dtype', None, 'compute dtype; default bfloat16 on accelerators, float32 on CPU')


def _time(fn, steps: int) -> float:
  """Seconds per call, after two warm-up calls (compilation and first-run effects)."""
  for _ in range(2):
    jax.block_until_ready(fn())
  start = time.perf_counter()
  for _ in range(steps):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / steps


def measure(name: str, batch: int, steps: int, dtype: str) -> dict:
  config = defaults.train_config()
  config.model = model_lib.variant(name, drop_path=0.1, dtype=dtype)
  config.batch_size = batch
  model = model_lib.HVT(**config.model)
  mesh = sharding.make_mesh(config.mesh)
  schedule = optim.lr_schedule(config.optim, batch, config.num_epochs, 1000)
  tx = optim.make(config.optim, schedule)
  state, shardings = train_step.create_state(model, tx, jax.random.key(0), ema=True, mesh=mesh)
  p_train, _ = train_step.jit_steps(model, tx, schedule, config, shardings, mesh)
  rng = np.random.default_rng(0)
  images = jax.device_put(rng.normal(size=(batch, 224, 224, 3)).astype(np.float32),
                          sharding.batch_sharding(mesh))
  labels = jax.device_put(rng.integers(0, 1000, batch).astype(np.int32),
                          sharding.batch_sharding(mesh))
  forward = jax.jit(lambda p, x: model.apply({'params': p}, x))
  fwd_s = _time(lambda: forward(state.params, images), steps)

  holder = [state]

  def one_step():
    holder[0], metrics = p_train(holder[0], {'image': images, 'label': labels})
    return metrics['loss']

  train_s = _time(one_step, steps)
  return {'model': name, 'gmacs': summary.macs(model) / 1e9,
          'forward_ips': batch / fwd_s, 'train_ips': batch / train_s}


def main(argv):
  del argv
  device = jax.devices()[0]
  dtype = FLAGS.dtype or ('float32' if device.platform == 'cpu' else 'bfloat16')
  print(f'jax {jax.__version__}, {jax.device_count()} x {device.device_kind} ({device.platform}), '
        f'host {platform.processor() or platform.machine()} with {os.cpu_count()} cores; '
        f'batch {FLAGS.batch}, {dtype}, {FLAGS.steps} timed steps')
  rows = [measure(name, FLAGS.batch, FLAGS.steps, dtype) for name in FLAGS.models]
  print(f'{"model":<10} {"GMACs":>6} {"forward img/s":>14} {"train img/s":>12}')
  for r in rows:
    print(f'{r["model"]:<10} {r["gmacs"]:>6.2f} {r["forward_ips"]:>14.1f} {r["train_ips"]:>12.1f}')
  if len(rows) >= 2:
    a, b = rows[0], rows[1]
    print(f'{a["model"]} vs {b["model"]}: forward {a["forward_ips"] / b["forward_ips"]:.2f}x, '
          f'train {a["train_ips"] / b["train_ips"]:.2f}x faster; GMACs ratio '
          f'{b["gmacs"] / a["gmacs"]:.2f}x')


if __name__ == '__main__':
  app.run(main)
