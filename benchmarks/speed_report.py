"""Benchmark rows as data: the JSON lines the benchmarks append (`--json=FILE`), and the tables
made from them. benchmarks/results/ keeps the rows behind docs/performance.md's tables, for those
a benchmark wrote rows for.

  python benchmarks/speed_report.py benchmarks/results/train_speed.jsonl   # a markdown table
  python benchmarks/speed_report.py rows.jsonl --peak_tflops=989           # MFU for that peak
  python benchmarks/speed_report.py rows.jsonl --console   # model_speed.py's tables, as it prints

Each file's rows are of one kind, told apart by their fields: `model_speed.py`'s (img/s of the
forward and train step, against PyTorch's where measured), `train_speed.py`'s (the real loop's
img/s, input wait, host CPU ms per image) or `python -m hvt_jax.aot`'s (a TPU slice's compiled
step: memory per chip, FLOPs). A row may carry notes of where it was measured, added when it was
filed (`round`, `jax`, `code`, `note`; the AOT tool's `train_step_code`): those that differ
between a file's rows become the table's first columns, the rest its heading.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Callable

# Dense bf16 peak TFLOP/s per chip (vendor data sheets), matched against device_kind in order.
PEAK_BF16_TFLOPS = [
    ('H100 PCIe', 756.0), ('H100 NVL', 835.0), ('H100', 989.0), ('H200', 989.0), ('GH200', 989.0),
    ('A100', 312.0), ('TPU v4', 275.0), ('TPU v5 lite', 197.0), ('TPU v5e', 197.0),
    ('TPU v5p', 459.0), ('TPU v5', 459.0), ('TPU v6 lite', 918.0), ('TPU v6e', 918.0),
]
# Notes on where a row was measured (not measured themselves), in the order they are shown.
NOTES = ('round', 'jax', 'code', 'train_step_code', 'machine', 'note')


def known_peak(device_kind: str) -> float | None:
  """The chip's dense bf16 peak TFLOP/s, if it is a known one."""
  return next((t for key, t in PEAK_BF16_TFLOPS if key.lower() in device_kind.lower()), None)


def read_rows(path: str) -> list[dict]:
  """The rows a --json file holds, one JSON object per line."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def append_row(path: str, row: dict) -> None:
  """One more line of `path`; values JSON has no type for (a config's tuples) as their text."""
  with open(path, 'a') as f:
    f.write(json.dumps(row, default=str) + '\n')


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


def _jax_torch_cells(r: dict) -> list[str]:
  """A model_speed row's img/s, JAX against PyTorch (the faster kind, named unless eager)."""
  tt, tf_ = r.get('torch_train_ips'), r.get('torch_forward_ips')
  kinds = {r.get('torch_train_kind'), r.get('torch_forward_kind')} - {None}
  tag = f' ({"/".join(sorted(kinds))})' if kinds and kinds != {'eager'} else ''
  return [f'{r["train_ips"]:.1f}', _fmt(tt, '.1f') + tag, _fmt(tt and r['train_ips'] / tt, '.2f', 'x'),
          f'{r["forward_ips"]:.1f}', _fmt(tf_, '.1f'),
          _fmt(tf_ and r['forward_ips'] / tf_, '.2f', 'x')]


def _line(cells: list[str]) -> str:
  return '| ' + ' | '.join(cells) + ' |'


_TORCH_HEADER = ('| model | batch | train img/s jax | train img/s torch | ratio | forward img/s jax | '
                 'forward img/s torch | ratio |')


def print_tables(rows: list[dict], peak: float | None):
  """`model_speed.py`'s three tables: img/s and the pooling ratio; against PyTorch; the compile,
  XLA's FLOPs and memory, MFU."""
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
    print(_TORCH_HEADER)
    print('|---|---|---|---|---|---|---|---|')
    for r in rows:
      print(_line([label(r), str(r['batch'])] + _jax_torch_cells(r)))
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


def kind(row: dict) -> str:
  """Which benchmark wrote the row: 'model_speed', 'train_speed' or 'aot'."""
  if 'train_ips' in row:
    return 'model_speed'
  if 'img_s' in row and 'input_wait' in row:
    return 'train_speed'
  if 'topology' in row and 'step' in row:
    return 'aot'
  raise ValueError(f'a row with fields {", ".join(sorted(row)[:8])}, ... is none of '
                   'model_speed.py\'s, train_speed.py\'s or hvt_jax.aot\'s.')


def _notes(rows: list[dict], keys=NOTES) -> tuple[list[str], list[str]]:
  """(the note keys whose values differ between rows, 'key value' of those that do not)."""
  present = [k for k in keys if any(k in r for r in rows)]
  varying = [k for k in present if len({repr(r.get(k)) for r in rows}) > 1]
  fixed = [f'{k} {rows[0][k]}' for k in present if k not in varying]
  return varying, fixed


def _table(rows: list[dict], header: list[str], cells: Callable[[dict], list[str]],
           heading: list[str]) -> str:
  """A markdown table: the varying notes first, then `cells(row)`; the heading line above."""
  varying, fixed = _notes(rows)
  lines = [', '.join(heading + fixed)] if heading + fixed else []
  lines.append(_line(varying + header))
  lines.append('|' + '---|' * (len(varying) + len(header)))
  for r in rows:
    lines.append(_line([str(r.get(k, '')) for k in varying] + cells(r)))
  return '\n'.join(lines)


def _model_speed_table(rows: list[dict], peak: float | None) -> str:
  label = _labeller(rows)
  where = [k for k in ('device', 'dtype') if len({r[k] for r in rows}) == 1]

  def cells(r):
    used = mfu(r, peak)
    return [r[k] for k in ('device', 'dtype') if k not in where] + [
        label(r), str(r['batch'])] + _jax_torch_cells(r) + [
        f'{r["compile_s"]:.1f} s', _fmt(r['peak_bytes'] and r['peak_bytes'] / 2**30, '.2f'),
        'n/a' if used is None else f'{100 * used:.1f}%']

  header = [k for k in ('device', 'dtype') if k not in where] + [
      'model', 'batch', 'train img/s jax', 'torch', 'ratio', 'forward img/s jax', 'torch',
      'ratio', 'JAX train step compile', 'JAX peak GiB', 'MFU']
  return _table(rows, header, cells, [rows[0][k] for k in where])


def _train_speed_table(rows: list[dict]) -> str:
  def run(r):  # the command's own arguments, less where it wrote and what it was compared to
    return ' '.join(a for a in r['args'] if not a.startswith(('--json', '--target_img_s')))

  def cells(r):
    return [f'`{run(r)}`', f'{r["img_s"]:.1f}', f'{100 * r["input_wait"]:.1f}%',
            f'{r["host_cpu_ms_per_image"]:.2f}']

  platforms = {f'{r["device"]} x{r["devices"]}, {r["host_cores"]} host cores' for r in rows}
  heading = sorted(platforms) if len(platforms) == 1 else []
  return _table(rows, ['run', 'img/s', 'input wait', 'host CPU-ms per image'], cells, heading)


def _aot_table(rows: list[dict]) -> str:
  def config(r):
    return ' '.join(a for a in r['argv']
                    if not a.startswith(('--json', '--topology', '--batch', '--step')))

  def cells(r):
    flops = r.get('flops_per_image')
    return [f'`{config(r)}`', f'{r["topology"]} ({r["device_kind"]})', r['step'], str(r['batch']),
            f'{r["total_gib"]:.2f} of {r["hbm_gib"]}', 'fits' if r['fits'] else 'does not fit',
            _fmt(flops and flops / 1e9, '.2f'), f'{r["compile_s"]:.0f} s']

  return _table(rows, ['config', 'slice', 'step', 'batch', 'GiB per chip', 'fits',
                       'GFLOP per image', 'compile'], cells, [])


def markdown(rows: list[dict], peak: float | None = None) -> str:
  """The markdown table of one file's rows (of one kind). `peak`: TFLOP/s for model_speed's MFU;
  default the rows' chip's, if known."""
  if not rows:
    raise ValueError('no rows.')
  kinds = {kind(r) for r in rows}
  if len(kinds) > 1:
    raise ValueError(f'rows of {" and ".join(sorted(kinds))} in one file; keep one kind a file.')
  what = kinds.pop()
  if what == 'model_speed':
    return _model_speed_table(rows, peak or known_peak(rows[0]['device']))
  return _train_speed_table(rows) if what == 'train_speed' else _aot_table(rows)


def main(argv: list[str] | None = None):
  parser = argparse.ArgumentParser(prog='speed_report.py', description=__doc__.splitlines()[0])
  parser.add_argument('files', nargs='+', help='JSON-lines files the benchmarks wrote (--json)')
  parser.add_argument('--peak_tflops', type=float, default=None,
                      help='the chip\'s peak TFLOP/s for MFU; default: known chips\' dense bf16 peak')
  parser.add_argument('--console', action='store_true',
                      help='model_speed.py rows: its three tables, as it prints them')
  args = parser.parse_args(argv)
  for i, path in enumerate(args.files):
    if not os.path.isfile(path):
      parser.error(f'{path}: no such file.')
    try:
      rows = read_rows(path)  # a line that is not JSON: a ValueError too
      if args.console:
        if any(kind(r) != 'model_speed' for r in rows):
          raise ValueError('--console prints model_speed.py rows only.')
        print_tables(rows, args.peak_tflops or (known_peak(rows[0]['device']) if rows else None))
      else:
        print(('\n' if i else '') + markdown(rows, args.peak_tflops))
    except ValueError as e:
      parser.error(f'{path}: {e}')


if __name__ == '__main__':
  main()
