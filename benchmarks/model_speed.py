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
The pieces: `timing.py` (the JAX side and the interleaved rounds), `torch_hvt.py` (the PyTorch
side), `memory_fit.py` (`--batch=max`), `speed_report.py` (the rows and tables; `--table_from`).
"""
from __future__ import annotations

import os

# PyTorch shares the accelerator: JAX allocates as it goes instead of taking 75% up front.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

import gc
import platform
import sys
import time

from absl import app, flags
import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import memory_fit  # noqa: E402 (benchmarks/ is not a package)
import speed_report  # noqa: E402
import timing  # noqa: E402

from hvt_jax import model as model_lib  # noqa: E402
from hvt_jax import summary  # noqa: E402
from hvt_jax.training import host_memory  # noqa: E402

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

_START = time.perf_counter()


def peak_tflops(device) -> float | None:
  return FLAGS.peak_tflops or speed_report.known_peak(device.device_kind)


def _on_gpu() -> bool:
  return jax.devices()[0].platform == 'gpu'


def _torch_kinds() -> list[bool]:
  """Which PyTorch variants to time: False = eager, True = torch.compile."""
  if FLAGS.torch_compile == 'no' or (FLAGS.torch_compile == 'auto' and not _on_gpu()):
    return [False]
  left = FLAGS.time_budget - (time.perf_counter() - _START) if FLAGS.time_budget else None
  if left is not None and left < 150:
    print(f'  (torch.compile skipped: {left:.0f} s of the time budget left)')
    return [False]
  return [False, True] if FLAGS.torch_compile == 'auto' else [True]


def _torch_sides(fields: dict, batch: int, dtype: str) -> list:
  """The PyTorch variants that could be built at this batch (one that fails is reported)."""
  import torch_hvt  # needs torch: only with --torch
  sides = []
  for compiled in _torch_kinds():
    try:
      sides.append(torch_hvt.TorchSide(fields, batch, dtype, compiled, _on_gpu()))
    except Exception as e:  # e.g. out of memory at the largest JAX batch: say so, go on
      print(f'  torch {"compiled" if compiled else "eager"} at batch {batch}: '
            f'{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ""}')
      torch_hvt.free_memory()
  return sides


def _free_memory():
  gc.collect()
  if FLAGS.torch:
    import torch_hvt
    torch_hvt.free_memory()


def measure(name: str, batch_arg: str, dtype: str, variants: list[dict]) -> list[dict]:
  """One row per `--model_kw` variant of one model at one batch.

  PyTorch is built once and timed interleaved with every variant. At batch=max (one variant)
  PyTorch runs alone first and frees the device, then JAX; if JAX still runs out of memory, the
  batch shrinks and both are measured again.
  """
  if batch_arg != 'max':
    return _measure(name, dtype, variants, batch=int(batch_arg))
  limit = memory_fit.device_limit(FLAGS.memory_gb)
  if not limit:
    raise app.UsageError('--batch=max needs the device memory: this device does not report '
                         'it; pass --memory_gb.')
  model_kw = variants[0]
  probe = None
  if FLAGS.probe_from and os.path.exists(FLAGS.probe_from):
    probe = memory_fit.probe_row(speed_report.read_rows(FLAGS.probe_from), name, dtype, model_kw)
  compile_at = lambda batch: timing.JaxSide(name, batch, dtype, model_kw, allocate=False)
  fit = lambda limit: memory_fit.largest_batch(compile_at, name, limit,
                                                probe_batch=FLAGS.probe_batch, row=probe)
  return memory_fit.run_within(lambda limit: _measure(name, dtype, variants[:1], compiled=fit(limit)),
                               name, limit, _free_memory)


def _trace(side: timing.JaxSide):
  """A profiler trace of 3 train steps, and the traced program's optimized HLO, whose fusion
  names the trace's kernels carry (`trace_breakdown.py --hlo`)."""
  with jax.profiler.trace(FLAGS.trace, create_perfetto_trace=True):
    for _ in range(3):
      side.sync(side.run_train())
  with open(os.path.join(FLAGS.trace, TRACED_HLO), 'w') as f:
    f.write(side.train.as_text())
  print(f'  trace of 3 {side.name} train steps at batch {side.batch}: {FLAGS.trace} '
        f'(optimized HLO: {TRACED_HLO})')


def _row(jax_side: timing.JaxSide, dtype: str, model_kw: dict, jt: dict, torch_timed: list) -> dict:
  """One measurement as a JSON row: JAX's figures, and PyTorch's per kind and the faster."""
  batch = jax_side.batch
  row = {'model': jax_side.name, 'batch': batch, 'dtype': dtype,
         'gmacs': summary.macs(jax_side.model) / 1e9, 'model_kw': model_kw,
         'compile_s': jax_side.compile_s, 'train_flops': jax_side.train_flops,
         'forward_flops': jax_side.forward_flops, 'peak_bytes': jax_side.peak_bytes,
         'state_bytes': jax_side.state_bytes, 'device': jax.devices()[0].device_kind,
         'jax': jax.__version__, 'args': sys.argv[1:],
         'forward_ips': batch / jt['forward'], 'train_ips': batch / jt['train']}
  for what in ('forward', 'train'):
    for kind, t, _ in torch_timed:
      row[f'torch_{kind}_{what}_ips'] = batch / t[what]
    if torch_timed:
      kind, t, _ = min(torch_timed, key=lambda s: s[1][what])
      row[f'torch_{what}_ips'], row[f'torch_{what}_kind'] = batch / t[what], kind
  row['torch_warmup_s'] = {kind: w for kind, _, w in torch_timed}
  return row


def _measure(name: str, dtype: str, variants: list[dict], *, batch: int | None = None,
             compiled: timing.JaxSide | None = None) -> list[dict]:
  """`measure`'s rows at `batch`, or (batch=max) with `compiled`, the one variant's side."""
  sequential = compiled is not None
  batch = compiled.batch if sequential else batch
  torch_live, torch_done = [], []
  rows = []
  for v, model_kw in enumerate(variants):
    jax_side = compiled or timing.JaxSide(name, batch, dtype, model_kw, allocate=False)
    compiled = None  # freed with jax_side at the end of this variant
    if FLAGS.torch and v == 0:
      torch_live = _torch_sides(jax_side.fields, batch, dtype)
      if sequential:  # time each now and free the device for the next one
        for side in torch_live:
          torch_done.append((side.kind, timing.rounds([side], FLAGS.steps, FLAGS.repeats)[0],
                             side.warmup_s))
          side.free()
        torch_live = []
    jax_side.allocate()
    timed = timing.rounds([jax_side] + torch_live, FLAGS.steps, FLAGS.repeats)
    torch_timed = torch_done + [(s.kind, timed[i + 1], s.warmup_s) for i, s in enumerate(torch_live)]
    if FLAGS.trace and not os.path.exists(FLAGS.trace):  # the first measurement only
      _trace(jax_side)
    rows.append(_row(jax_side, dtype, model_kw, timed[0], torch_timed))
    if FLAGS.json:
      speed_report.append_row(FLAGS.json, rows[-1])
    del jax_side
    gc.collect()
  for side in torch_live:
    side.free()
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  device = jax.devices()[0]
  if FLAGS.table_from:
    rows = speed_report.read_rows(FLAGS.table_from)
    print(f'{rows[0]["device"] if rows else device.device_kind}, {rows[0]["dtype"] if rows else ""}')
    same_chip = rows and rows[0]['device'] == device.device_kind
    speed_report.print_tables(rows, peak_tflops(device) if same_chip else FLAGS.peak_tflops)
    return
  dtype = FLAGS.dtype or timing.default_dtype(device)
  variants = [timing.parse_model_kw(text) for text in FLAGS.model_kw or ['']]
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
  speed_report.print_tables(rows, peak_tflops(device))


if __name__ == '__main__':
  host_memory.configure()  # as training does (hvt_jax/training/host_memory.py)
  app.run(main)
