"""Forward and train-step images/s of HVT-S-1 against the pool-free HVT-S-0, in one run; with
`--torch`, against the same models in PyTorch as well.

  python benchmarks/model_speed.py                       # defaults: batch 64, bf16 on GPU/TPU
  python benchmarks/model_speed.py --batch=16 --steps=3  # CPU-sized
  python benchmarks/model_speed.py --torch --batch=16 --steps=3   # + the PyTorch baseline
  python benchmarks/model_speed.py --torch --batch=256,max       # GPU: also the largest batch
  python benchmarks/model_speed.py --model_kw=attention=cudnn,remat=true   # any HVT field
  python benchmarks/model_speed.py --model_kw= --model_kw=scan_blocks=true  # variants, one run

The train step is the real one (`train_step.train_step`: the paper recipe's augmentation on
device — flip, RandAugment, normalization, random erasing of uint8 batches — then mixup/cutmix,
AdamW, EMA) at 224x224; the PyTorch baseline's step has no augmentation (timm augments in its
DataLoader workers), so the comparison errs against JAX (`augment_cost.py`: what it adds). The printed ratio S-0 time / S-1 time is what pooling buys;
the paper's GMACs ratio is 4.57 / 2.40 = 1.9x.

The PyTorch baseline (`torch_hvt.py`: the official architecture, SDPA attention, AdamW, EMA)
gets the same batch, dtype (bf16 autocast for bfloat16) and threads, and runs interleaved with
JAX: each of `--repeats` rounds times JAX, then PyTorch; the medians are printed. On a GPU it is
timed eager and under `torch.compile`, and the faster is reported. `--batch=max` takes the
largest batch whose compiled JAX train step fits the device memory (XLA's memory analysis); there
the two sides run one after the other, PyTorch first, so each may use the whole device.
"""
from __future__ import annotations

import os

# PyTorch shares the accelerator: JAX allocates as it goes instead of taking 75% up front.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

import gc
import json
import platform
import statistics
import sys
import time
from typing import Any, Callable

from absl import app, flags
import jax
import numpy as np

from hvt_jax import defaults, sharding
from hvt_jax.training import host_memory, optim, train_step
from hvt_jax.model import summary
from hvt_jax import model as model_lib

FLAGS = flags.FLAGS
flags.DEFINE_list('models', ['hvt-s-1', 'hvt-s-0'], 'models to time; the ratio compares the first two')
flags.DEFINE_list('batch', ['64'], 'global batch size(s); "max": the largest that fits the device')
flags.DEFINE_integer('steps', 10, 'timed steps per measurement (after 2 warm-up steps, and one '
                     'untimed call before each measurement)')
flags.DEFINE_string('dtype', None, 'compute dtype; default bfloat16 on accelerators, float32 on CPU')
flags.DEFINE_multi_string('model_kw', [], 'extra HVT fields for every model, e.g. '
                          'attention=cudnn,remat=true; repeat the flag to time several variants')
flags.DEFINE_bool('torch', False, 'also time the PyTorch baseline (needs torch)')
flags.DEFINE_enum('torch_compile', 'auto', ['auto', 'yes', 'no'],
                  'PyTorch: auto = eager and torch.compile on GPU (the faster is reported), '
                  'eager only on CPU')
flags.DEFINE_integer('repeats', 3, 'interleaved rounds per measurement; medians are reported')
flags.DEFINE_float('peak_tflops', None, 'the chip\'s peak TFLOP/s for MFU; default: known chips\' '
                   'dense bf16 peak')
flags.DEFINE_integer('probe_batch', 256, '--batch=max: compile at this batch to estimate the largest')
flags.DEFINE_float('memory_gb', None, '--batch=max: device memory to fit in; default the device\'s')
flags.DEFINE_float('time_budget', 0, 'seconds; when little is left, skip torch.compile (0: no limit)')
flags.DEFINE_string('json', None, 'append one JSON line per (model, batch) here')
flags.DEFINE_string('table_from', None, 'print the tables of the JSON lines in this file; measure nothing')
flags.DEFINE_string('probe_from', None, '--batch=max: take the memory slope from a row of this JSON '
                    'file (same model, dtype and --model_kw) instead of compiling a probe')
flags.DEFINE_string('trace', None, 'write a jax.profiler trace (Perfetto JSON too) of 3 train steps '
                    'of the first measurement here, and the traced step\'s optimized HLO')
TRACED_HLO = 'train_step.hlo.txt'  # in the --trace dir

# Dense bf16 peak TFLOP/s per chip (vendor data sheets), matched against device_kind in order.
PEAK_BF16_TFLOPS = [
    ('H100 PCIe', 756.0), ('H100 NVL', 835.0), ('H100', 989.0), ('H200', 989.0), ('GH200', 989.0),
    ('A100', 312.0), ('TPU v4', 275.0), ('TPU v5 lite', 197.0), ('TPU v5e', 197.0),
    ('TPU v5p', 459.0), ('TPU v5', 459.0), ('TPU v6 lite', 918.0), ('TPU v6e', 918.0),
]
_START = time.perf_counter()


def _counts_flops() -> bool:
  """XLA:GPU gives no FLOP count for a lowered program (jax 0.11), so there none is asked for."""
  return jax.default_backend() != 'gpu'


def peak_tflops(device) -> float | None:
  if FLAGS.peak_tflops:
    return FLAGS.peak_tflops
  return next((t for key, t in PEAK_BF16_TFLOPS if key.lower() in device.device_kind.lower()), None)


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


def _seconds_per_call(fn: Callable[[], Any], sync: Callable[[Any], Any], steps: int) -> float:
  start = time.perf_counter()
  for _ in range(steps):
    out = fn()
  sync(out)
  return (time.perf_counter() - start) / steps


def _cost(program) -> dict:
  """XLA's cost analysis of a lowered or compiled program."""
  cost = program.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return cost or {}


def _peak_bytes(compiled) -> int | None:
  """Arguments + outputs + temporaries, less the outputs written over donated arguments."""
  m = compiled.memory_analysis()
  if m is None:
    return None
  return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
          - m.alias_size_in_bytes)


class JaxSide:
  """The compiled forward and real train step of one model at one batch size."""

  def __init__(self, name: str, batch: int, dtype: str, model_kw: dict, *, allocate: bool = True):
    config = defaults.train_config()
    config.model = model_lib.variant(name, **{'drop_path': 0.1, 'dtype': dtype, **model_kw})
    config.batch_size = batch
    self.name, self.batch, self.fields = name, batch, dict(config.model)
    self.model = model = model_lib.HVT(**config.model)
    self.config = config
    mesh = sharding.make_mesh(config.mesh)
    schedule = optim.lr_schedule(config.optim, batch, config.num_epochs, 1000)
    tx = optim.make(config.optim, schedule)
    self.state, shardings = train_step.create_state(model, tx, jax.random.key(0), ema=True, mesh=mesh)
    p_train, _ = train_step.jit_steps(model, tx, schedule, config, shardings, mesh)
    size = model.image_size
    spec = sharding.batch_sharding(mesh)
    abstract = {'image': jax.ShapeDtypeStruct((batch, size, size, 3), np.uint8, sharding=spec),
                'label': jax.ShapeDtypeStruct((batch,), np.int32, sharding=spec),
                'example_id': jax.ShapeDtypeStruct((batch, 3), np.int32, sharding=spec)}
    start = time.perf_counter()
    self.train = p_train.lower(self.state, abstract).compile()
    self.compile_s = time.perf_counter() - start
    # XLA's cost analysis counts a loop's body once, so scanned blocks would be undercounted:
    # count the same step with every block unrolled (lowered only, never compiled or run).
    self.unrolled = model.clone(scan_blocks=False) if _counts_flops() else None
    self.train_flops = self.forward_flops = None
    if self.unrolled:
      unrolled_state, unrolled_shardings = train_step.abstract_state(self.unrolled, tx, ema=True,
                                                                     mesh=mesh)
      p_unrolled, _ = train_step.jit_steps(self.unrolled, tx, schedule, config, unrolled_shardings,
                                           mesh)
      self.train_flops = _cost(p_unrolled.lower(unrolled_state, abstract)).get('flops')
    self.peak_bytes = _peak_bytes(self.train)
    self.memory = self.train.memory_analysis()
    # The state (parameters, EMA, Adam moments) does not grow with the batch; counting everything
    # else as per-example overestimates the slope a little, which errs towards fitting.
    self.state_bytes = (None if self.memory is None else self.memory.argument_size_in_bytes
                        - batch * (model.image_size ** 2 * 3 + 4 + 3 * 4))
    if allocate:
      self.allocate()

  def allocate(self):
    rng = np.random.default_rng(0)
    spec = sharding.batch_sharding(sharding.make_mesh(self.config.mesh))
    size = self.model.image_size
    ids = np.stack([np.zeros(self.batch), np.zeros(self.batch), np.arange(self.batch)], -1)
    self.batch_arrays = {
        'image': jax.device_put(rng.integers(0, 256, (self.batch, size, size, 3), dtype=np.uint8),
                                spec),
        'label': jax.device_put(rng.integers(0, self.model.num_classes, self.batch).astype(np.int32),
                                spec),
        'example_id': jax.device_put(ids.astype(np.int32), spec)}
    # The forward pass takes normalized float images, as predict gives the model.
    self.images = jax.device_put(rng.normal(size=(self.batch, size, size, 3)).astype(np.float32),
                                 spec)
    model = self.model
    forward = jax.jit(lambda p, x: model.apply({'params': p}, x))
    self.forward = forward.lower(self.state.params, self.images).compile()
    if self.unrolled:
      unrolled = jax.jit(lambda p, x: self.unrolled.apply({'params': p}, x))
      params = model_lib.abstract_params(self.unrolled)
      self.forward_flops = _cost(unrolled.lower(params, self.images)).get('flops')

  def run_forward(self):
    return self.forward(self.state.params, self.images)

  def run_train(self):
    self.state, metrics = self.train(self.state, self.batch_arrays)
    return metrics['loss']

  sync = staticmethod(jax.block_until_ready)


class TorchSide:
  """The PyTorch baseline at the same batch and dtype: eager, or under torch.compile."""

  def __init__(self, fields: dict, batch: int, dtype: str, compiled: bool):
    import torch  # optional dependency, only with --torch
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch_hvt
    self.torch = torch
    self.device = 'cuda' if torch.cuda.is_available() and jax.devices()[0].platform == 'gpu' else 'cpu'
    if self.device == 'cpu':
      torch.set_num_threads(os.cpu_count())
    else:
      torch.set_float32_matmul_precision('high')  # TF32, as XLA's default precision on GPU
    self.kind = 'compiled' if compiled else 'eager'
    self.net = torch_hvt.TorchHVT(**fields).to(self.device)
    self.step, self.predict = torch_hvt.make_train_step(
        self.net, lr=1e-3, weight_decay=0.025, ema_decay=0.99996,
        num_classes=fields['num_classes'], dtype=torch_hvt.torch_dtype(dtype),
        compile_model=compiled)
    size = fields['image_size']
    gen = torch.Generator().manual_seed(0)
    self.images = torch.randn(batch, 3, size, size, generator=gen).to(self.device)
    self.labels = torch.randint(0, fields['num_classes'], (batch,), generator=gen).to(self.device)
    start = time.perf_counter()
    for _ in range(2):  # warm-up; under torch.compile this compiles forward and backward
      self.sync(self.step(self.images, self.labels))
      self.sync(self.predict(self.images))
    self.warmup_s = time.perf_counter() - start

  def run_forward(self):
    return self.predict(self.images)

  def run_train(self):
    return self.step(self.images, self.labels)

  def sync(self, _):
    if self.device == 'cuda':
      self.torch.cuda.synchronize()

  def free(self):
    del self.net, self.step, self.predict, self.images, self.labels
    gc.collect()
    if self.device == 'cuda':
      self.torch.cuda.empty_cache()


def _rounds(sides: list, steps: int, repeats: int) -> dict[int, dict[str, float]]:
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
        # side left behind. On CPU with huge pages, JAX's first step after PyTorch's spent ~2 s
        # in the kernel (compacting memory into 2 MiB pages) against 0.1 s for the next ones.
        # Timed are steady calls, as a training loop makes them.
        side.sync(run())
        times[i][kind].append(_seconds_per_call(run, side.sync, steps))
  return {i: {k: statistics.median(v) for k, v in t.items()} for i, t in times.items()}


def _torch_kinds() -> list[bool]:
  """Which PyTorch variants to time: False = eager, True = torch.compile."""
  on_gpu = jax.devices()[0].platform == 'gpu'
  if FLAGS.torch_compile == 'no' or (FLAGS.torch_compile == 'auto' and not on_gpu):
    return [False]
  left = FLAGS.time_budget - (time.perf_counter() - _START) if FLAGS.time_budget else None
  if left is not None and left < 150:
    print(f'  (torch.compile skipped: {left:.0f} s of the time budget left)')
    return [False]
  return [False, True] if FLAGS.torch_compile == 'auto' else [True]


def largest_batch(name: str, dtype: str, model_kw: dict, limit_bytes: float) -> JaxSide:
  """The train step compiled at the largest batch (a multiple of 32) that XLA says fits.

  Peak memory is near-linear in the batch: one probe (a compile, or a row of `--probe_from`)
  gives the slope, a second compile checks the estimate (and shrinks it while it does not fit).
  """
  probe, row = None, _probe_row(name, dtype, model_kw)
  if row is None:
    probe = JaxSide(name, FLAGS.probe_batch, dtype, model_kw, allocate=False)
    if probe.peak_bytes is None:
      return probe
    row = {'batch': probe.batch, 'peak_bytes': probe.peak_bytes, 'state_bytes': probe.state_bytes}
  per_example = (row['peak_bytes'] - row['state_bytes']) / row['batch']
  batch = _round_batch((0.9 * limit_bytes - row['state_bytes']) / max(per_example, 1))
  print(f'  {name}: {row["peak_bytes"] / 2**30:.2f} GiB at batch {row["batch"]} -> trying '
        f'{batch} for {limit_bytes / 2**30:.2f} GiB')
  for _ in range(4):
    side = (probe if probe and batch == probe.batch else
            JaxSide(name, batch, dtype, model_kw, allocate=False))
    if side.peak_bytes is None or side.peak_bytes <= limit_bytes:
      return side
    smaller = _round_batch(batch * limit_bytes / side.peak_bytes * 0.97)
    if smaller >= batch:
      break
    batch = smaller
    print(f'  {name}: does not fit ({side.peak_bytes / 2**30:.2f} GiB); trying {batch}')
  raise SystemExit(f'model_speed: {name} does not fit in {limit_bytes / 2**30:.2f} GiB even at batch '
                       f'{batch}; pass a larger --memory_gb or a smaller model.')


def _probe_row(name: str, dtype: str, model_kw: dict) -> dict | None:
  """The --probe_from row measured with the same model, dtype and fields, if any."""
  if not FLAGS.probe_from or not os.path.exists(FLAGS.probe_from):
    return None
  return next((r for r in _read_rows(FLAGS.probe_from) if r['model'] == name and r['dtype'] == dtype
               and r.get('model_kw', {}) == model_kw and r.get('peak_bytes')
               and r.get('state_bytes') is not None), None)


def _read_rows(path: str) -> list[dict]:
  """The rows a --json file holds, one JSON object per line."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _round_batch(estimate: float) -> int:
  """Multiples of 32 (whole warps, even splits over devices); small values as they are."""
  b = int(estimate)
  return b // 32 * 32 if b >= 64 else max(1, b)


def _torch_sides(fields: dict, batch: int, dtype: str) -> list:
  """The PyTorch variants that could be built at this batch (one that fails is reported)."""
  sides = []
  for compiled in _torch_kinds():
    try:
      sides.append(TorchSide(fields, batch, dtype, compiled))
    except Exception as e:  # e.g. out of memory at the largest JAX batch: say so, go on
      print(f'  torch {"compiled" if compiled else "eager"} at batch {batch}: '
            f'{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ""}')
      _free_torch_memory()
  return sides


def _free_torch_memory():
  gc.collect()
  if jax.devices()[0].platform == 'gpu':
    import torch
    torch.cuda.empty_cache()


def measure(name: str, batch_arg: str, dtype: str, variants: list[dict]) -> list[dict]:
  """One row per `--model_kw` variant of one model at one batch.

  PyTorch is built once and timed interleaved with every variant. At batch=max (one variant)
  PyTorch runs alone first and frees the device, then JAX; if JAX still runs out of memory, the
  batch shrinks and both are measured again.
  """
  if batch_arg != 'max':
    return _measure(name, dtype, variants, batch=int(batch_arg))
  device = jax.devices()[0]
  limit = (FLAGS.memory_gb * 2**30 if FLAGS.memory_gb else
           (device.memory_stats() or {}).get('bytes_limit'))
  if not limit:
    raise app.UsageError('--batch=max needs the device memory: this device does not report '
                         'it; pass --memory_gb.')
  for _ in range(3):
    try:
      return _measure(name, dtype, variants[:1], compiled=largest_batch(name, dtype, variants[0], limit))
    except jax.errors.JaxRuntimeError as e:
      if 'RESOURCE_EXHAUSTED' not in str(e):
        raise
      # XLA's peak is what the program needs, not what the allocator can hand out after
      # fragmentation (an H100 run failed on a 65.7 GiB block with 71 GiB allowed).
      limit *= 0.85
      print(f'  {name}: out of memory when run; trying again within {limit / 2**30:.1f} GiB')
      _free_torch_memory()
  raise SystemExit(f'model_speed: {name} kept running out of memory; pass a smaller --memory_gb.')


def _measure(name: str, dtype: str, variants: list[dict], *, batch: int | None = None,
             compiled: JaxSide | None = None) -> list[dict]:
  """`measure`'s rows at `batch`, or (batch=max) with `compiled`, the one variant's side."""
  device = jax.devices()[0]
  sequential = compiled is not None
  batch = compiled.batch if sequential else batch
  torch_live, torch_done = [], []
  rows = []
  for v, model_kw in enumerate(variants):
    jax_side = compiled or JaxSide(name, batch, dtype, model_kw, allocate=False)
    compiled = None  # freed with jax_side at the end of this variant
    if FLAGS.torch and v == 0:
      torch_live = _torch_sides(jax_side.fields, batch, dtype)
      if sequential:  # time each now and free the device for the next one
        for side in torch_live:
          torch_done.append((side.kind, _rounds([side], FLAGS.steps, FLAGS.repeats)[0], side.warmup_s))
          side.free()
        torch_live = []
    jax_side.allocate()
    timed = _rounds([jax_side] + torch_live, FLAGS.steps, FLAGS.repeats)
    torch_timed = torch_done + [(s.kind, timed[i + 1], s.warmup_s) for i, s in enumerate(torch_live)]
    jt = timed[0]
    if FLAGS.trace and not os.path.exists(FLAGS.trace):  # the first measurement only
      with jax.profiler.trace(FLAGS.trace, create_perfetto_trace=True):
        for _ in range(3):
          jax_side.sync(jax_side.run_train())
      # The traced program's optimized HLO, whose fusion names the trace's kernels carry
      # (`trace_breakdown.py --hlo`).
      with open(os.path.join(FLAGS.trace, TRACED_HLO), 'w') as f:
        f.write(jax_side.train.as_text())
      print(f'  trace of 3 {name} train steps at batch {batch}: {FLAGS.trace} '
            f'(optimized HLO: {TRACED_HLO})')
    gmacs = summary.macs(jax_side.model) / 1e9
    row = {'model': name, 'batch': batch, 'dtype': dtype, 'gmacs': gmacs, 'model_kw': model_kw,
           'compile_s': jax_side.compile_s, 'train_flops': jax_side.train_flops,
           'forward_flops': jax_side.forward_flops, 'peak_bytes': jax_side.peak_bytes,
           'state_bytes': jax_side.state_bytes, 'device': device.device_kind,
           'forward_ips': batch / jt['forward'], 'train_ips': batch / jt['train']}
    for what in ('forward', 'train'):
      for kind, t, _ in torch_timed:
        row[f'torch_{kind}_{what}_ips'] = batch / t[what]
      if torch_timed:
        kind, t, _ = min(torch_timed, key=lambda s: s[1][what])
        row[f'torch_{what}_ips'], row[f'torch_{what}_kind'] = batch / t[what], kind
    row['torch_warmup_s'] = {kind: w for kind, _, w in torch_timed}
    rows.append(row)
    if FLAGS.json:
      with open(FLAGS.json, 'a') as f:
        f.write(json.dumps(row) + '\n')
    del jax_side
    gc.collect()
  for side in torch_live:
    side.free()
  return rows


def mfu(row: dict, peak: float | None) -> float | None:
  """Model FLOPs utilisation: 6 x the paper's MACs per image (forward 2, backward 4) x train
  img/s over the chip's peak. XLA's own count also includes LayerNorm, softmax, GELU and the
  optimizer, and is not available on every backend."""
  return peak and 6 * row['gmacs'] * 1e9 * row['train_ips'] / (peak * 1e12)


def _labeller(rows: list[dict]):
  """row -> the model's name, plus the --model_kw fields whose values differ between rows."""
  kws = [row.get('model_kw') or {} for row in rows]
  varying = [k for k in dict.fromkeys(k for kw in kws for k in kw)
             if len({repr(kw.get(k)) for kw in kws}) > 1]
  return lambda row: row['model'] + ''.join(
      f' {k}={row["model_kw"][k]}' for k in varying if k in (row.get('model_kw') or {}))


def _fmt(x, spec, unit=''):
  return 'n/a' if x is None else format(x, spec) + unit


def print_tables(rows: list[dict], peak: float | None):
  label = _labeller(rows)
  print(f'{"model":<10} {"GMACs":>6} {"forward img/s":>14} {"train img/s":>12}')
  for r in rows:
    print(f'{label(r):<10} {r["gmacs"]:>6.2f} {r["forward_ips"]:>14.1f} {r["train_ips"]:>12.1f}')
  a = rows[0] if rows else None
  b = next((r for r in rows if a and r['model'] != a['model'] and r['batch'] == a['batch']
            and r.get('model_kw') == a.get('model_kw')), None)
  if b:
    print(f'{a["model"]} vs {b["model"]}: forward {a["forward_ips"] / b["forward_ips"]:.2f}x, '
          f'train {a["train_ips"] / b["train_ips"]:.2f}x faster; GMACs ratio '
          f'{b["gmacs"] / a["gmacs"]:.2f}x')
  if any('torch_train_ips' in r for r in rows):
    print()
    print('| model | batch | train img/s jax | train img/s torch | ratio | forward img/s jax | '
          'forward img/s torch | ratio |')
    print('|---|---|---|---|---|---|---|---|')
    for r in rows:
      tt, tf_ = r.get('torch_train_ips'), r.get('torch_forward_ips')
      kinds = {r.get('torch_train_kind'), r.get('torch_forward_kind')} - {None}
      tag = f' ({"/".join(sorted(kinds))})' if kinds and kinds != {'eager'} else ''
      print(f'| {label(r)} | {r["batch"]} | {r["train_ips"]:.1f} | {_fmt(tt, ".1f")}{tag} | '
            f'{_fmt(tt and r["train_ips"] / tt, ".2f", "x")} | {r["forward_ips"]:.1f} | '
            f'{_fmt(tf_, ".1f")} | {_fmt(tf_ and r["forward_ips"] / tf_, ".2f", "x")} |')
  print()
  print(f'{"model":<10} {"batch":>5} {"compile s":>9} {"train GFLOP/img":>15} '
        f'{"fwd GFLOP/img":>13} {"peak GiB":>8} {"MFU":>6}')
  for r in rows:
    per = lambda f: f and f / r['batch'] / 1e9
    used = mfu(r, peak)
    print(f'{label(r):<10} {r["batch"]:>5} {r["compile_s"]:>9.1f} '
          f'{_fmt(per(r["train_flops"]), ".2f"):>15} {_fmt(per(r.get("forward_flops")), ".2f"):>13} '
          f'{_fmt(r["peak_bytes"] and r["peak_bytes"] / 2**30, ".2f"):>8} '
          f'{"n/a" if used is None else f"{100 * used:.1f}%":>6}')
  warm = [f'{r["model"]}@{r["batch"]} ' + ', '.join(f'{k} {v:.0f} s' for k, v in r['torch_warmup_s'].items())
          for r in rows if r.get('torch_warmup_s')]
  if warm:
    print('PyTorch warm-up (2 steps; includes torch.compile): ' + '; '.join(warm))
  print('compile s: the JAX train step (lower + compile). GFLOP/img: XLA cost analysis of the '
        'step with every block unrolled / batch. peak GiB: XLA memory analysis of the train step, arguments + '
        'outputs + temporaries - donated (aliased) buffers. MFU: 6 x GMACs x train img/s / '
        + (f'{peak:.0f} TFLOP/s peak' if peak else 'peak (unknown chip: pass --peak_tflops)') + '.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  device = jax.devices()[0]
  if FLAGS.table_from:
    rows = _read_rows(FLAGS.table_from)
    print(f'{rows[0]["device"] if rows else device.device_kind}, {rows[0]["dtype"] if rows else ""}')
    same_chip = rows and rows[0]['device'] == device.device_kind
    print_tables(rows, peak_tflops(device) if same_chip else FLAGS.peak_tflops)
    return
  dtype = FLAGS.dtype or ('float32' if device.platform == 'cpu' else 'bfloat16')
  variants = [parse_model_kw(text) for text in FLAGS.model_kw or ['']]
  if 'max' in FLAGS.batch and len(variants) > 1:
    raise app.UsageError('--batch=max takes one --model_kw')
  if FLAGS.trace and os.path.exists(FLAGS.trace):  # an older trace would pass for this one
    raise app.UsageError(f'--trace: {FLAGS.trace} exists; pass a new directory.')
  cache = 'on' if jax.config.jax_compilation_cache_dir else 'off'
  print(f'jax {jax.__version__}, {jax.device_count()} x {device.device_kind} ({device.platform}), '
        f'host {platform.processor() or platform.machine()} with {os.cpu_count()} cores; '
        f'batch {",".join(FLAGS.batch)}, {dtype}, {FLAGS.steps} timed steps'
        + (f' x {FLAGS.repeats} rounds' if FLAGS.torch else '')
        + ''.join(f'; model {text}' for text in FLAGS.model_kw if text)
        + f'; persistent compile cache {cache}')
  if FLAGS.torch:
    import torch
    print(f'torch {torch.__version__} ({torch.get_num_threads()} threads on CPU)'
          f'{", CUDA " + torch.version.cuda if torch.cuda.is_available() else ""}')
  rows = []
  for batch in FLAGS.batch:
    for name in FLAGS.models:
      try:
        rows += measure(name, batch, dtype, variants)
      except model_lib.ConfigError as e:  # e.g. a --model_kw field this version lacks
        raise app.UsageError(str(e)) from None
  print_tables(rows, peak_tflops(device))


if __name__ == '__main__':
  host_memory.relaunch_with_huge_pages()  # as training does (hvt_jax/training/host_memory.py)
  app.run(main)
