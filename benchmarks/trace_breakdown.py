"""Where a traced train step's device time goes: kernel time per step, by kind of kernel.

  python benchmarks/trace_breakdown.py perfetto_trace.json.gz --steps=3 [--top=20]
      [--hlo=train_step.hlo.txt [--largest=8]]

Reads the Perfetto JSON that `jax.profiler.trace(..., create_perfetto_trace=True)` writes
(`model_speed.py --trace=DIR`, kept by `gpu_check.sh` under HVT_GPU_CHECK_OUT). Kernels are
grouped by their names: convolutions, cuDNN attention, GEMMs, copies, XLA's fusions by
their root (transpose, dynamic-update-slice, reductions, softmax, the rest).

A CPU trace has no device rows; there the XLA:CPU operations (thunks) on the host threads are
grouped instead, when traced with XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true. XLA:CPU runs
Eigen's matrix products asynchronously, so part of their time is booked to what runs beside them.
A library fusion (YNNPACK, oneDNN) is named for the library, not for what it holds: YNNPACK also
runs reductions. Given the traced program's optimized HLO (`--hlo`: the `train_step.hlo.txt`
that `model_speed.py --trace=DIR` writes beside the trace, or a `*.cpu_after_optimizations.txt`
from XLA_FLAGS=--xla_dump_to=DIR), those without a matrix product are counted apart; without it
every YNNPACK fusion counts as a GEMM. `--largest=N` lists the HLO's N largest fusions, on any
device: a backward pass that re-fuses a growing sum into each consumer shows up there.

  XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true \
      python benchmarks/model_speed.py --models=hvt-s-0 --batch=16 --steps=3 --trace=/tmp/trace
  python benchmarks/trace_breakdown.py /tmp/trace/plugins/profile/*/perfetto_trace.json.gz \
      --steps=3 --hlo=/tmp/trace/train_step.hlo.txt
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
from typing import NamedTuple

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
LIBRARY_REDUCTIONS = 'library fusions without a product (reductions)'
CPU_KINDS = [
    ('GEMMs (YNNPACK fusions, Eigen dots)', r'^(ynn_fusion|xnn_fusion|dot|dot_general)\b'),
    ('zero-filling loop buffers (broadcast)', r'^wrapped_broadcast'),
    ('stacking per block (dynamic-slice etc., stack)', r'dynamic-update-slice|dynamic-slice|^stack\b'),
    ('copies and transposes', r'copy|transpose'),
    ('other elementwise fusions', r''),
]
# An XLA:CPU thunk is named for its HLO instruction, e.g. 'ynn_fusion.11'; the host rows also
# hold Python frames ('$api.py:...'), the executor ('ThunkExecutor::Execute') and others.
_HLO_NAME = re.compile(r'[a-z][a-z0-9_-]*(\.\d+)?')


def device_kernels(trace: dict) -> list[dict]:
  """Complete events on the device rows ('/device:...' processes)."""
  devices = {e['pid'] for e in trace['traceEvents']
             if e.get('ph') == 'M' and e.get('name') == 'process_name'
             and e['args']['name'].startswith('/device:')}
  return [e for e in trace['traceEvents'] if e.get('ph') == 'X' and e['pid'] in devices]


def cpu_operations(trace: dict) -> list[dict]:
  """Complete events named like HLO instructions: XLA:CPU's thunks."""
  return [e for e in trace['traceEvents'] if e.get('ph') == 'X' and _HLO_NAME.fullmatch(e['name'])]


class Fusion(NamedTuple):
  name: str
  result: str  # its result type
  operands: int
  body: list[str]  # the instructions of its computation
  line: str  # the fusion instruction itself


def fusions(hlo_text: str) -> list[Fusion]:
  """Every fusion that runs as a kernel in an optimized HLO module's text (not those nested in
  another fusion)."""
  bodies, current = {}, None
  for line in hlo_text.splitlines():
    header = re.match(r'(?:ENTRY )?%?([\w.-]+) \(.*\{$', line)  # a computation opens
    if header:
      current = bodies.setdefault(header.group(1), [])
    elif line.strip() == '}':
      current = None
    elif current is not None and line.strip():
      current.append(line)
  pattern = re.compile(r'\s*(?:ROOT )?%?([\w.-]+) = (.*?) fusion\((.*?)\), kind=.*calls=%?([\w.-]+)')
  calls = {name: [m for m in map(pattern.match, body) if m] for name, body in bodies.items()}
  nested = {m.group(4) for found in calls.values() for m in found}
  return [Fusion(m.group(1), m.group(2), len([o for o in m.group(3).split(',') if o.strip()]),
                 bodies.get(m.group(4), []), m.string)
          for name, found in calls.items() if name not in nested for m in found]


def library_fusions_without_product(found: list[Fusion]) -> set[str]:
  """Names of the library fusions (kind __ynn_fusion, __onednn_fusion, ...) among `found` whose
  computation holds no dot or convolution: on CPU, YNNPACK's reductions."""
  return {f.name for f in found if re.search(r'"kind":"__\w+_fusion"', f.line)
          and not re.search(r' (dot|convolution)\(', '\n'.join(f.body))}


def breakdown(kernels: list[dict], kinds=KINDS,
              reductions: set[str] = frozenset()) -> collections.Counter:
  """Microseconds per kind; `reductions` names library fusions to count apart from GEMMs."""
  out = collections.Counter()
  for e in kernels:
    if e['name'] in reductions:
      out[LIBRARY_REDUCTIONS] += e['dur']
      continue
    out[next(kind for kind, pattern in kinds if re.search(pattern, e['name']))] += e['dur']
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('trace')
  parser.add_argument('--steps', type=int, default=3, help='train steps in the trace')
  parser.add_argument('--top', type=int, default=0, help='also list the N costliest kernels')
  parser.add_argument('--hlo', help="the traced program's optimized HLO text, a path or a pattern "
                      'matching one file; on CPU, library fusions without a matrix product are '
                      'then counted apart from the GEMMs')
  parser.add_argument('--largest', type=int, default=0,
                      help="with --hlo: also list the HLO's N largest fusions (instructions, "
                      'operands)')
  args = parser.parse_args()
  if args.largest and not args.hlo:
    parser.error('--largest lists fusions of the HLO: pass --hlo too.')
  found_fusions = []
  if args.hlo:
    hlo = args.hlo
    # The shell leaves a pattern after `--hlo=` unexpanded, and a dump dir names its files by
    # module number: take the pattern when it names one file.
    found = [hlo] if os.path.exists(hlo) else sorted(glob.glob(hlo))
    if len(found) > 1:
      parser.error(f'--hlo: {hlo} matches {len(found)} files ({", ".join(found[:3])}'
                   f'{", ..." if len(found) > 3 else ""}); pass one.')
    try:
      with open(found[0] if found else hlo) as f:
        found_fusions = fusions(f.read())
    except OSError as e:
      parser.error(f'--hlo: cannot read {hlo} ({e.strerror}); pass the train_step.hlo.txt that '
                   'model_speed.py --trace=DIR writes, or one *.cpu_after_optimizations.txt from '
                   'XLA_FLAGS=--xla_dump_to=DIR.')
  with gzip.open(args.trace) if args.trace.endswith('.gz') else open(args.trace) as f:
    trace = json.load(f)
  kernels, kinds, what = device_kernels(trace), KINDS, 'kernels'
  reductions = set()
  if not kernels:
    kernels, kinds, what = cpu_operations(trace), CPU_KINDS, 'XLA:CPU operations'
    reductions = library_fusions_without_product(found_fusions)
  if not kernels:
    raise SystemExit(f'{args.trace}: no device kernels and no XLA:CPU operations in this trace; '
                     'on CPU, trace with XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true.')
  kinds = breakdown(kernels, kinds, reductions)
  total = sum(kinds.values())
  print(f'{total / args.steps / 1e3:.2f} ms of {what} per step, '
        f'{len(kernels) / args.steps:.0f} {what} per step')
  for kind, us in kinds.most_common():
    print(f'  {kind:<48} {us / args.steps / 1e3:7.2f} ms  {100 * us / total:5.1f}%')
  if args.top:
    by_name = collections.Counter()
    for e in kernels:
      by_name[e['name']] += e['dur']
    for name, us in by_name.most_common(args.top):
      print(f'  {us / args.steps / 1e3:7.2f} ms  {name[:100]}')
  if args.largest:
    print(f'The {args.largest} largest fusions of the HLO: instructions, operands, result, name')
    for f in sorted(found_fusions, key=lambda f: len(f.body), reverse=True)[:args.largest]:
      print(f'  {len(f.body):6d} {f.operands:5d}  {f.result[:40]:<40}  {f.name}')


if __name__ == '__main__':
  main()
