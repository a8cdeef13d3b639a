"""The timing harness of the speed benchmarks: the real JAX train step compiled for a batch, and
steps of several sides (JAX, the PyTorch baseline of `torch_hvt.py`) timed interleaved.

A side is anything with `run_forward()`, `run_train()` and `sync(out)`; `rounds` times each in
turn, so all sides share the machine's load of the moment, and reports medians.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax
import numpy as np

from hvt_jax import defaults, sharding
from hvt_jax import model as model_lib
from hvt_jax.training import optim, train_step


def default_dtype(device) -> str:
  """The compute dtype the benchmarks take unless told: bfloat16 on accelerators."""
  return 'float32' if device.platform == 'cpu' else 'bfloat16'


def parse_model_kw(text: str) -> dict[str, Any]:
  """'attention=cudnn,remat=true,depth=2' -> typed values; unknown fields fail in model.variant."""
  out = {}
  for item in filter(None, text.split(',')):
    key, _, value = item.partition('=')
    low = value.lower()
    if low in ('true', 'false'):
      out[key] = low == 'true'
    else:
      for kind in (int, float, str):
        try:
          out[key] = kind(value)
          break
        except ValueError:
          pass
  return out


def abstract_batch(batch: int, size: int, spec, canvas: int = 0) -> dict:
  """The train step's input, as the host pipeline feeds it: uint8 images, labels, example ids;
  with a `canvas`, (canvas, canvas) images holding windows to resize and their 'window' sizes."""
  side = canvas or size
  out = {'image': jax.ShapeDtypeStruct((batch, side, side, 3), np.uint8, sharding=spec),
         'label': jax.ShapeDtypeStruct((batch,), np.int32, sharding=spec),
         'example_id': jax.ShapeDtypeStruct((batch, 3), np.int32, sharding=spec)}
  if canvas:
    out['window'] = jax.ShapeDtypeStruct((batch, 2), np.int32, sharding=spec)
  return out


def random_batch(batch: int, size: int, num_classes: int, spec, seed: int = 0,
                 canvas: int = 0) -> dict:
  """A concrete batch of `abstract_batch`'s shapes on the devices (`host_batch`, placed)."""
  return jax.device_put(host_batch(batch, size, num_classes, seed, canvas), spec)


def host_batch(batch: int, size: int, num_classes: int, seed: int = 0,
               canvas: int = 0) -> dict[str, np.ndarray]:
  """A batch of `abstract_batch`'s shapes in host memory, as the input pipeline hands it over:
  process 0, epoch 0; windows from half the output size to the whole canvas."""
  rng = np.random.default_rng(seed)
  ids = np.stack([np.zeros(batch), np.zeros(batch), np.arange(batch)], -1)
  side = canvas or size
  out = {'image': rng.integers(0, 256, (batch, side, side, 3), dtype=np.uint8),
         'label': rng.integers(0, num_classes, batch).astype(np.int32),
         'example_id': ids.astype(np.int32)}
  if canvas:
    out['window'] = rng.integers(size // 2, canvas + 1, (batch, 2)).astype(np.int32)
  return out


def xla_cost(program) -> dict:
  """XLA's cost analysis of a lowered or compiled program."""
  cost = program.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return cost or {}


def peak_bytes(compiled) -> int | None:
  """Arguments + outputs + temporaries, less the outputs written over donated arguments."""
  m = compiled.memory_analysis()
  if m is None:
    return None
  return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
          - m.alias_size_in_bytes)


def counts_flops() -> bool:
  """XLA:GPU gives no FLOP count for a lowered program (jax 0.11), so there none is asked for."""
  return jax.default_backend() != 'gpu'


def unrolled_step_flops(model, tx, schedule, config, mesh, abstract: dict, *,
                        step: str = 'train') -> float | None:
  """XLA's FLOPs of the train step (or with step='eval', the eval step) with every block
  unrolled (lowered only, never compiled).

  XLA's cost analysis counts a loop's body once, so scanned blocks would be undercounted.
  """
  unrolled = model.clone(scan_blocks=False)
  state, shardings = train_step.abstract_state(unrolled, tx, ema=True, mesh=mesh)
  p_train, p_eval = train_step.jit_steps(unrolled, tx, schedule, config, shardings, mesh)
  lowered = (p_train.lower(state, abstract) if step == 'train'
             else p_eval.lower(state.params, abstract))
  return xla_cost(lowered).get('flops')


def train_parts(config):
  """(model, optimizer, learning-rate schedule) of a train config, as the training loop makes them."""
  model = model_lib.HVT(**config.model)
  schedule = optim.lr_schedule(config.optim, config.batch_size, config.num_epochs, 1000)
  return model, optim.make(config.optim, schedule), schedule


class JaxSide:
  """The compiled forward and real train step of one model at one batch size."""

  def __init__(self, name: str, batch: int, dtype: str, model_kw: dict, *, allocate: bool = True):
    config = defaults.train_config()
    config.model = model_lib.variant(name, **{'drop_path': 0.1, 'dtype': dtype, **model_kw})
    config.batch_size = batch
    self.name, self.batch, self.fields = name, batch, dict(config.model)
    self.config = config
    self.mesh = mesh = sharding.make_mesh(config.mesh)
    self.model, tx, schedule = train_parts(config)
    self.state, shardings = train_step.create_state(self.model, tx, jax.random.key(0), ema=True,
                                                    mesh=mesh)
    p_train, _ = train_step.jit_steps(self.model, tx, schedule, config, shardings, mesh)
    abstract = abstract_batch(batch, self.model.image_size, sharding.batch_sharding(mesh))
    start = time.perf_counter()
    self.train = p_train.lower(self.state, abstract).compile()
    self.compile_s = time.perf_counter() - start
    self.train_flops = self.forward_flops = None
    if counts_flops():
      self.train_flops = unrolled_step_flops(self.model, tx, schedule, config, mesh, abstract)
    self.peak_bytes = peak_bytes(self.train)
    self.memory = self.train.memory_analysis()
    # The state (parameters, EMA, Adam moments) does not grow with the batch; counting everything
    # else as per-example overestimates the slope a little, which errs towards fitting.
    self.state_bytes = (None if self.memory is None else self.memory.argument_size_in_bytes
                        - batch * (self.model.image_size ** 2 * 3 + 4 + 3 * 4))
    if allocate:
      self.allocate()

  def allocate(self):
    spec = sharding.batch_sharding(self.mesh)
    size, model = self.model.image_size, self.model
    self.batch_arrays = random_batch(self.batch, size, model.num_classes, spec)
    # The forward pass takes normalized float images, as predict gives the model.
    rng = np.random.default_rng(0)
    self.images = jax.device_put(rng.normal(size=(self.batch, size, size, 3)).astype(np.float32),
                                 spec)
    forward = jax.jit(lambda p, x: model.apply({'params': p}, x))
    self.forward = forward.lower(self.state.params, self.images).compile()
    if counts_flops():
      unrolled = model.clone(scan_blocks=False)
      lowered = jax.jit(lambda p, x: unrolled.apply({'params': p}, x)).lower(
          model_lib.abstract_params(unrolled), self.images)
      self.forward_flops = xla_cost(lowered).get('flops')

  def run_forward(self):
    return self.forward(self.state.params, self.images)

  def run_train(self):
    self.state, metrics = self.train(self.state, self.batch_arrays)
    return metrics['loss']

  sync = staticmethod(jax.block_until_ready)


def seconds_per_call(fn: Callable[[], Any], sync: Callable[[Any], Any], steps: int) -> float:
  start = time.perf_counter()
  for _ in range(steps):
    out = fn()
  sync(out)
  return (time.perf_counter() - start) / steps


def rounds(sides: list, steps: int, repeats: int) -> dict[int, dict[str, float]]:
  """Median seconds per forward / train call of each side, over `repeats` interleaved rounds."""
  times = {i: {'forward': [], 'train': []} for i in range(len(sides))}
  for side in sides:  # warm-up (JAX is compiled already; PyTorch warmed up on creation)
    for _ in range(2):
      side.sync(side.run_forward())
      side.sync(side.run_train())
  for _ in range(repeats):
    for i, side in enumerate(sides):
      for kind, run in (('forward', side.run_forward), ('train', side.run_train)):
        # One untimed call first: the first call after another side ran pays for the memory that
        # side left behind (on CPU with huge pages, the kernel compacts memory into 2 MiB pages
        # then; docs/performance.md, "Against PyTorch"). Timed are steady calls, as a training
        # loop makes them.
        side.sync(run())
        times[i][kind].append(seconds_per_call(run, side.sync, steps))
  return {i: {k: statistics.median(v) for k, v in t.items()} for i, t in times.items()}
