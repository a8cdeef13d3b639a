"""Compile the real train and eval steps for a TPU slice on any machine, and say if they fit.

  python -m hvt_jax.aot --config=configs/hvt_s.py --topology=v5e:2x4
  python -m hvt_jax.aot --config=configs/hvt_s.py:stages=0 --topology=v5p-8 --batch=max
  python -m hvt_jax.aot --config=configs/hvt_s.py --topology=v6e:4x4 \
      --config.mesh="(('data', -1), ('fsdp', 4))"

It needs libtpu (`pip install 'hvt_jax[tpu]'`), not a TPU: libtpu describes the slice's chips
(`jax.experimental.topologies`) and compiles for them. The steps are those `python -m
hvt_jax.main` runs (`train_step.jit_steps`), on the config's mesh over the slice's devices, with
the model's 'auto' settings decided for the TPU (`model.resolve_settings`: bfloat16, unrolled
blocks). Memory and FLOPs are XLA's figures for the compiled programs, per chip.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from typing import Any

from absl import flags
import jax
from jax.experimental import topologies
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags

from hvt_jax import cli, defaults
from hvt_jax.data import augment
from hvt_jax import model as model_lib
from hvt_jax.errors import UserError
from hvt_jax import sharding
from hvt_jax.training import train_step

GIB = 2 ** 30
# HBM per chip by the device_kind libtpu reports (v5p reports 'TPU v5', v5e and v6e 'lite').
HBM_GIB = {'TPU v4': 32, 'TPU v5 lite': 16, 'TPU v5': 95, 'TPU v6 lite': 32}
# Cloud TPU's names of the single-host slices, as libtpu's topology strings.
SLICES = {'v4-8': 'v4:2x2x1', 'v5e-8': 'v5e:2x4', 'v5p-8': 'v5p:2x2x1', 'v6e-8': 'v6e:2x4'}
EXAMPLES = 'v4:2x2x1 (v4-8), v5e:2x4 (v5e-8), v5p:2x2x1 (v5p-8), v6e:2x4 (v6e-8), v5e:4x4'


class AotError(UserError):
  pass


def slice_devices(topology: str) -> list:
  """The compile-only devices of a TPU slice: a libtpu topology string or a name of `SLICES`."""
  name = SLICES.get(topology, topology)
  # Only the compiler is used: no chip is opened, so another libtpu process (a training run on
  # this TPU VM, a parallel test) may hold libtpu's lock. Without a TPU, libtpu otherwise
  # prints notices about the host it cannot find.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  os.environ.setdefault('TPU_HOST_BOUNDS', '1,1,1')
  # v4 VMs run each chip's two TensorCores as one device (megacore), as JAX sees them there;
  # libtpu's default for v4 is a device per core. v5p's default is megacore already.
  kwargs = {'chip_config_name': 'megacore'} if name.startswith('v4') else {}
  if not name:
    raise AotError(f'--topology is empty; name a TPU slice, e.g. {EXAMPLES}.')
  try:
    return list(topologies.get_topology_desc(name, 'tpu', **kwargs).devices)
  except RuntimeError as e:
    if 'TPU support not installed' in str(e):
      raise AotError("compiling for a TPU needs libtpu: pip install 'hvt_jax[tpu]'") from None
    if 'INVALID_ARGUMENT' not in str(e):
      raise
    detail = str(e).splitlines()[0].removeprefix('INVALID_ARGUMENT: ')
    raise AotError(f'--topology={topology}: {detail.rstrip(".")}; use e.g. {EXAMPLES}.') from None


def hbm_gib(device) -> float | None:
  return HBM_GIB.get(device.device_kind)


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


def _batch(size: int, image_size: int, mesh, *, train: bool, canvas: int = 0) -> dict:
  """The input pipeline's global batch: uint8 NHWC images and int32 labels, and with a `canvas`
  (the resize left to the device) canvas-sized images with each one's size ('window'). A train
  batch also has each example's id (its augmentation's seed) and whether it decoded ('ok'); an
  eval batch has the mask of its padding."""
  placed = sharding.batch_sharding(mesh)
  shape = lambda *s, dtype: jax.ShapeDtypeStruct((size, *s), dtype, sharding=placed)
  side = canvas or image_size
  batch = {'image': shape(side, side, 3, dtype=jnp.uint8), 'label': shape(dtype=jnp.int32)}
  if canvas:
    batch['window'] = shape(2, dtype=jnp.int32)
  if not train:
    return {**batch, 'mask': shape(dtype=jnp.int32)}
  return {**batch, 'example_id': shape(3, dtype=jnp.int32), 'ok': shape(dtype=jnp.bool_)}


# How the TPU compiler refuses a program that cannot fit: the memory it needs (its
# temporaries alone, when they already exceed the chip), then the HBM it can use.
_OOM = (re.compile(r'HLO temporaries \(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)'),
        re.compile(r'Used ([\d.]+)([KMGT]) of ([\d.]+)([KMGT]) hbm'))


def _compile(jitted, args) -> tuple[Any, float, str | None]:
  """(compiled or None, seconds, None or the compiler's out-of-memory line)."""
  start = time.perf_counter()
  try:
    compiled = jitted.lower(*args).compile()
  except jax.errors.JaxRuntimeError as e:
    if 'RESOURCE_EXHAUSTED' not in str(e):
      raise
    return None, time.perf_counter() - start, str(e)
  return compiled, time.perf_counter() - start, None


def oom_amounts(message: str) -> tuple[float | None, float | None]:
  """(GiB needed, GiB usable) from the TPU compiler's out-of-memory error; None if not there."""
  found = next((m for m in (p.search(message) for p in _OOM) if m), None)
  return (_gib(*found.groups()[:2]), _gib(*found.groups()[2:])) if found else (None, None)


def _gib(amount: str, unit: str) -> float:
  return float(amount) * 1024 ** ('KMGT'.index(unit) + 1) / GIB


def measure(step: str, jitted, args, *, batch: int, devices: list) -> dict[str, Any]:
  """Compiles one step and reads XLA's figures for one chip: memory in GiB (arguments, outputs,
  temporaries; `total` counts a donated input and the output that reuses it once, plus the
  program), FLOPs, and whether `total` fits the chip's HBM."""
  compiled, seconds, oom = _compile(jitted, args)
  hbm = hbm_gib(devices[0])
  row = {'step': step, 'batch': batch, 'compile_s': round(seconds, 1), 'hbm_gib': hbm}
  if compiled is None:
    # The TPU compiler refuses a program that cannot fit; its message has the amounts.
    need, have = oom_amounts(oom)
    return {**row, 'fits': False, 'total_gib': need, 'usable_gib': have or hbm,
            'compiler': oom.splitlines()[0][:300]}
  memory = compiled.memory_analysis()
  flops = float(compiled.cost_analysis()['flops'])  # the partitioned program: one chip's
  sizes = {'arguments_gib': memory.argument_size_in_bytes,
           'outputs_gib': memory.output_size_in_bytes,
           'aliased_gib': memory.alias_size_in_bytes,
           'temporaries_gib': memory.temp_size_in_bytes,
           'code_gib': memory.generated_code_size_in_bytes}
  total = (sizes['arguments_gib'] + sizes['outputs_gib'] - sizes['aliased_gib']
           + sizes['temporaries_gib'] + sizes['code_gib'])
  row.update({k: v / GIB for k, v in sizes.items()})
  row.update({'argument_bytes': memory.argument_size_in_bytes, 'total_gib': total / GIB,
              'fits': hbm is None or total / GIB <= hbm,
              'flops_per_chip': flops, 'flops_per_step': flops * len(devices),
              'flops_per_image': flops * len(devices) / batch})
  return row


def compile_steps(config: ml_collections.ConfigDict, devices: list,
                  steps: tuple[str, ...] = ('train', 'eval')) -> list[dict[str, Any]]:
  """Compiles the train step at `config.batch_size` and the eval step at
  `config.eval_batch_size` for `devices` (a mesh from `config.mesh`); one row per step."""
  mesh = sharding.make_mesh(config.mesh, devices)
  # The schedule's steps per epoch change only constants, not the programs.
  model, _, state, shardings, p_train, p_eval = train_step.build(config, mesh, 1000)
  # The train batch's images: S x S, or canvases when the chips resize the crops themselves.
  canvas = augment.window_canvas(config.aug, model.image_size, devices[0].platform)
  common = {'devices': len(devices), 'device_kind': devices[0].device_kind,
            'mesh': dict(mesh.shape), 'dtype': model.dtype, 'scan_blocks': model.scan_blocks,
            'params': model_lib.param_count(state.params), 'window_canvas': canvas}
  rows = []
  if 'train' in steps:
    args = (_abstract(state, shardings),
            _batch(config.batch_size, model.image_size, mesh, train=True, canvas=canvas))
    rows.append({**common, **measure('train', p_train, args, batch=config.batch_size,
                                     devices=devices)})
  if 'eval' in steps:
    args = (_abstract(state.params, shardings.params),
            _batch(config.eval_batch_size, model.image_size, mesh, train=False,
                   canvas=augment.eval_canvas(config, devices[0].platform)))
    rows.append({**common, **measure('eval', p_eval, args, batch=config.eval_batch_size,
                                     devices=devices)})
  return rows


def largest_batch(config: ml_collections.ConfigDict, devices: list, say=print,
                  record=lambda row: row) -> tuple[int, list[dict[str, Any]]]:
  """The largest global train batch that fits (`search_batch`), and the train step compiled at
  each batch tried: each probe is a compile, a minute or more for HVT-S."""
  hbm = hbm_gib(devices[0])
  if hbm is None:
    raise AotError(f'--batch=max: the HBM of a {devices[0].device_kind} is not known; give '
                   f'--batch=N for one of {", ".join(HBM_GIB)}.')

  def probe(batch: int) -> dict[str, Any]:
    config_at = ml_collections.ConfigDict(config.to_dict())
    config_at.batch_size = batch
    row = record(compile_steps(config_at, devices, steps=('train',))[0])
    say(f'  batch {batch}: {_memory_words(row)} ({row["compile_s"]:.0f} s)')
    return row

  unit = len(devices) * max(1, int(config.accum_steps))
  rows = search_batch(probe, start=config.batch_size, unit=unit, hbm=hbm)
  best = max((r['batch'] for r in rows if r['fits']), default=0)
  if not best:
    raise AotError(f'not even a batch of {unit} fits on {devices[0].device_kind}; use an fsdp '
                   'mesh axis (--config.mesh) or more chips.')
  return best, rows


def search_batch(probe, *, start: int, unit: int, hbm: float) -> list[dict[str, Any]]:
  """Probes batches (multiples of `unit`) until the largest that fits is known to within 1/16;
  `probe(batch)` gives {'batch', 'fits', 'total_gib' (None: unknown)}. Returns every probe.

  From `start` it goes up until a batch does not fit, then narrows the bracket. A step's memory
  grows almost linearly with its batch, so a probe goes where the line through known points
  meets `hbm` (beyond the last fit at most 8 times further; a bracket wider than 4x is halved on
  a log scale instead), and at least 1/16 inside the bracket's ends, so that it closes. Near
  its limit the compiler may trade FLOPs for memory, so the need is not linear there: after
  two fits in a row inside the bracket the line is not trusted and the bracket is halved.
  """
  rows: list[dict[str, Any]] = []
  low, high = 0, None  # the largest batch that fit, the smallest that did not

  def total(batch: int) -> float | None:
    return next((r['total_gib'] for r in rows if r['batch'] == batch), None)

  def next_batch() -> int:
    fitted = sorted(r['batch'] for r in rows if r['fits'])
    if high is None and len(fitted) >= 2 and total(fitted[-1]) > total(fitted[-2]):
      b0, b1 = fitted[-2:]
      slope = (total(b1) - total(b0)) / (b1 - b0)
      guess = min(int(b1 + (hbm - total(b1)) / slope), 8 * b1)
    elif high is None:
      guess = 2 * low
    elif low and high > 4 * low:
      guess = int((low * high) ** 0.5)
    elif (low and total(high) is not None and total(high) > total(low)
          and not all(r['fits'] for r in rows[-2:])):
      guess = int(low + (hbm - total(low)) * (high - low) / (total(high) - total(low)))
    else:
      guess = (low + high) // 2
    step = max(unit, low // 16)
    guess = max(guess, low + step)
    if high is not None:
      guess = min(guess, high - step)
    return max(unit, guess // unit * unit)

  batch = max(unit, start // unit * unit)
  while True:
    row = probe(batch)
    rows.append(row)
    if row['fits']:
      low = max(low, batch)
    else:
      high = batch if high is None else min(high, batch)
    if high is not None and high - low <= max(unit, low // 16):
      return rows
    batch = next_batch()
    # Rounding to `unit` can land on a batch already tried when the bracket is barely wider
    # than its tolerance: it is as closed as the units allow.
    if any(r['batch'] == batch for r in rows):
      return rows


def _memory_words(row: dict) -> str:
  """`fits` or `does not fit: needs X GiB of Y per chip` (Y: the HBM the compiler can use, when
  it refused the program)."""
  hbm = row['hbm_gib']
  if row['fits']:
    return f'fits: {row["total_gib"]:.2f} GiB of {hbm} GiB per chip' if hbm else 'fits'
  if row['total_gib'] is None:
    return f'does not fit: {row["compiler"]}'
  return (f'does not fit: needs {row["total_gib"]:.2f} GiB of {row.get("usable_gib") or hbm:.2f}'
          ' GiB per chip')


def _size(gib: float) -> str:
  return f'{gib:.2f} GiB' if gib >= 0.1 else f'{gib * 1024:.2f} MiB'


def _flops(n: float) -> str:
  return next(f'{n / 10 ** e:.2f} {p}FLOP' for e, p in ((12, 'T'), (9, 'G'), (6, 'M'), (0, ''))
              if n >= 10 ** e or e == 0)


def report(row: dict) -> str:
  """A step's figures as a few lines."""
  head = (f'{row["step"]} step, global batch {row["batch"]} on mesh {row["mesh"]} '
          f'({row["dtype"]}, scan_blocks={row["scan_blocks"]}), compiled in {row["compile_s"]:.0f} s:')
  if 'arguments_gib' not in row:
    return f'{head}\n  {_memory_words(row)}'
  return '\n'.join([
      head,
      f'  per chip: arguments {_size(row["arguments_gib"])}, outputs {_size(row["outputs_gib"])} '
      f'({_size(row["aliased_gib"])} of them in donated inputs), temporaries '
      f'{_size(row["temporaries_gib"])}, total {_size(row["total_gib"])} of {row["hbm_gib"]} GiB HBM',
      f'  {_flops(row["flops_per_step"])} per step ({_flops(row["flops_per_chip"])} per chip), '
      f'{_flops(row["flops_per_image"])} per image',
      f'  {_memory_words(row)}'])


FLAGS = flags.FLAGS


def define_flags() -> None:
  """Only when run as a program: importing the module defines no flags."""
  config_flags.DEFINE_config_file('config', None, 'training config, optionally with :args')
  flags.DEFINE_string('topology', None, f'TPU slice, as libtpu names it (e.g. {EXAMPLES})')
  flags.DEFINE_string('batch', None, "global train batch (default: the config's batch_size), or "
                      "'max' for the largest that fits")
  flags.DEFINE_multi_enum('step', ['train', 'eval'], ['train', 'eval'], 'the steps to compile')
  flags.DEFINE_string('json', None, 'append one JSON line per compiled step (and --batch=max '
                      'probe) to this file, as each compile ends')
  flags.mark_flags_as_required(['config', 'topology'])


def _batch_flag(value: str | None) -> int | str | None:
  if value is None or value == 'max':
    return value
  if not value.isdigit() or int(value) < 1:
    raise AotError(f"--batch={value}: give a positive number of images or 'max'.")
  return int(value)


def main(argv):
  if len(argv) > 1:
    raise AotError(f'unexpected arguments: {argv[1:]}')
  # The host's own devices only trace; on a TPU VM its chips stay free for a training run.
  jax.config.update('jax_platforms', 'cpu')
  config = cli.config()
  defaults.check_no_moved_keys(config)
  batch = _batch_flag(FLAGS.batch)
  devices = slice_devices(FLAGS.topology)
  config = ml_collections.ConfigDict(config.to_dict())
  say = lambda line: print(line, flush=True)

  def record(row: dict[str, Any], **extra) -> dict[str, Any]:
    if FLAGS.json:
      with open(FLAGS.json, 'a') as f:
        f.write(json.dumps({'topology': FLAGS.topology, 'argv': sys.argv[1:], **extra, **row})
                + '\n')
    return row

  say(f'{FLAGS.topology}: {len(devices)} x {devices[0].device_kind} '
      f'({hbm_gib(devices[0]) or "unknown"} GiB HBM each)')
  steps = tuple(FLAGS.step)
  if batch == 'max':
    say('largest train batch:')
    config.batch_size, probes = largest_batch(
        config, devices, lambda line: say(line), record=lambda r: record(r, probe=True))
    say(f'largest train batch that fits: {config.batch_size}')
    say(report(next(r for r in probes if r['batch'] == config.batch_size)))
    steps = tuple(s for s in steps if s != 'train')
  elif batch is not None:
    config.batch_size = batch
  for row in compile_steps(config, devices, steps):
    say(report(record(row)))
