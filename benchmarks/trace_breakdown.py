"""Where a traced train step's device time goes: kernel time per step, by kind of kernel.

  python benchmarks/trace_breakdown.py perfetto_trace.json.gz --steps=3 [--top=20]

Reads the Perfetto JSON that `jax.profiler.trace(..., create_perfetto_trace=True)` writes
(`model_speed.py --trace=DIR`, kept by `gpu_check.sh` under HVT_GPU_CHECK_OUT). Kernels are
grouped by their names: convolutions, cuDNN attention, GEMMs, copies, XLA's fusions by
their root (transpose, dynamic-update-slice, reductions, softmax, the rest).
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import re

# (kind, pattern on the kernel name), first match wins.
KINDS = [
    ('cuDNN attention', r'sdpa|fmha|flash|cudnn::fusion'),
    ('convolutions (cuDNN)', r'fprop|dgrad|wgrad|nhwcAddPadding|convolution'),
    ('GEMMs (cuBLAS, Triton, CUTLASS)', r'nvjet|gemm|xmma|cutlass|cublas|sm90_'),
    ('copies (memcpy, memset)', r'(?i)memcpy|memset'),
    ('stacking loop residuals (dynamic-update-slice)', r'dynamic_update_slice'),
    ('transposes', r'transpose'),
    ('softmax', r'softmax'),
    ('LayerNorm and other reductions', r'reduce'),
    ('other elementwise fusions', r''),
]


def device_kernels(trace: dict) -> list[dict]:
  """Complete events on the device rows ('/device:...' processes)."""
  devices = {e['pid'] for e in trace['traceEvents']
             if e.get('ph') == 'M' and e.get('name') == 'process_name'
             and e['args']['name'].startswith('/device:')}
  return [e for e in trace['traceEvents'] if e.get('ph') == 'X' and e['pid'] in devices]


def breakdown(kernels: list[dict]) -> collections.Counter:
  """Microseconds per kind."""
  out = collections.Counter()
  for e in kernels:
    out[next(kind for kind, pattern in KINDS if re.search(pattern, e['name']))] += e['dur']
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('trace')
  parser.add_argument('--steps', type=int, default=3, help='train steps in the trace')
  parser.add_argument('--top', type=int, default=0, help='also list the N costliest kernels')
  args = parser.parse_args()
  with gzip.open(args.trace) if args.trace.endswith('.gz') else open(args.trace) as f:
    kernels = device_kernels(json.load(f))
  if not kernels:
    raise SystemExit(f'{args.trace}: no device kernels in this trace (a CPU trace has none).')
  kinds = breakdown(kernels)
  total = sum(kinds.values())
  print(f'{total / args.steps / 1e3:.2f} ms of kernels per step, '
        f'{len(kernels) / args.steps:.0f} kernels per step')
  for kind, us in kinds.most_common():
    print(f'  {kind:<48} {us / args.steps / 1e3:7.2f} ms  {100 * us / total:5.1f}%')
  if args.top:
    by_name = collections.Counter()
    for e in kernels:
      by_name[e['name']] += e['dur']
    for name, us in by_name.most_common(args.top):
      print(f'  {us / args.steps / 1e3:7.2f} ms  {name[:100]}')


if __name__ == '__main__':
  main()
