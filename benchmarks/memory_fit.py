"""The largest batch whose compiled JAX train step fits the device memory (`model_speed.py
--batch=max`), by XLA's memory analysis of the compiled step.

Peak memory is near-linear in the batch: one probe (a compile, or a row that `model_speed.py
--json` wrote for the same model) gives the slope, a second compile checks the estimate and
shrinks it while it does not fit.
"""
from __future__ import annotations

from typing import Any, Callable

import jax

# The share of the limit the estimate aims at; the rest leaves room for the slope's error.
AIM = 0.9
# On an out-of-memory error when run, the limit shrinks by this factor and the fit starts again.
SHRINK_WHEN_RUN = 0.85


def device_limit(memory_gb: float | None) -> float | None:
  """Bytes to fit in: `memory_gb` when given, else what the first device reports, if it does."""
  if memory_gb:
    return memory_gb * 2**30
  return (jax.devices()[0].memory_stats() or {}).get('bytes_limit')


def round_batch(estimate: float) -> int:
  """Multiples of 32 (whole warps, even splits over devices); small values as they are."""
  b = int(estimate)
  return b // 32 * 32 if b >= 64 else max(1, b)


def probe_row(rows: list[dict], name: str, dtype: str, model_kw: dict) -> dict | None:
  """The first of `rows` measured with the same model, dtype and fields that has the step's
  peak and state bytes, if any."""
  return next((r for r in rows if r['model'] == name and r['dtype'] == dtype
               and r.get('model_kw', {}) == model_kw and r.get('peak_bytes')
               and r.get('state_bytes') is not None), None)


def largest_batch(compile_at: Callable[[int], Any], name: str, limit_bytes: float, *,
                  probe_batch: int, row: dict | None = None):
  """The train step compiled at the largest batch (a multiple of 32) that XLA says fits.

  `compile_at(batch)` compiles the step (a side with `batch`, `peak_bytes` and `state_bytes`);
  `row`, from an earlier run, saves the probe's compile.
  """
  probe = None
  if row is None:
    probe = compile_at(probe_batch)
    if probe.peak_bytes is None:
      return probe
    row = {'batch': probe.batch, 'peak_bytes': probe.peak_bytes, 'state_bytes': probe.state_bytes}
  per_example = (row['peak_bytes'] - row['state_bytes']) / row['batch']
  batch = round_batch((AIM * limit_bytes - row['state_bytes']) / max(per_example, 1))
  print(f'  {name}: {row["peak_bytes"] / 2**30:.2f} GiB at batch {row["batch"]} -> trying '
        f'{batch} for {limit_bytes / 2**30:.2f} GiB')
  for _ in range(4):
    side = probe if probe and batch == probe.batch else compile_at(batch)
    if side.peak_bytes is None or side.peak_bytes <= limit_bytes:
      return side
    smaller = round_batch(batch * limit_bytes / side.peak_bytes * 0.97)
    if smaller >= batch:
      break
    batch = smaller
    print(f'  {name}: does not fit ({side.peak_bytes / 2**30:.2f} GiB); trying {batch}')
  raise SystemExit(f'model_speed: {name} does not fit in {limit_bytes / 2**30:.2f} GiB even at batch '
                   f'{batch}; pass a larger --memory_gb or a smaller model.')


def run_within(measure: Callable[[float], Any], name: str, limit_bytes: float,
               free: Callable[[], None]):
  """`measure(limit)`, again within a smaller limit while running it runs out of memory.

  XLA's peak is what the program needs, not what the allocator can hand out after fragmentation
  (a first GPU run failed to allocate a block under its limit; docs/performance.md), so a step
  that fits by the analysis may still fail when run.
  """
  for _ in range(3):
    try:
      return measure(limit_bytes)
    except jax.errors.JaxRuntimeError as e:
      if 'RESOURCE_EXHAUSTED' not in str(e):
        raise
      limit_bytes *= SHRINK_WHEN_RUN
      print(f'  {name}: out of memory when run; trying again within {limit_bytes / 2**30:.1f} GiB')
      free()
  raise SystemExit(f'model_speed: {name} kept running out of memory; pass a smaller --memory_gb.')
