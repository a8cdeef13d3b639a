"""benchmarks/speed_report.py: the benchmarks' JSON rows as markdown tables, the rows kept in
benchmarks/results/, and the largest-batch search of benchmarks/memory_fit.py."""
import json
import types

import pytest

from tests.bench_helpers import load_benchmark, run_benchmark
from tests.helpers import REPO

# Two model_speed.py rows as `--json` writes them, filed with notes of where they ran.
_MODEL_SPEED = dict(model='hvt-s-1', batch=16, dtype='float32', gmacs=2.4, model_kw={},
                    compile_s=12.6, train_flops=16 * 14.45e9, forward_flops=16 * 4.88e9,
                    peak_bytes=int(0.88 * 2**30), state_bytes=353394324, device='cpu',
                    forward_ips=17.4, train_ips=5.2, torch_eager_train_ips=3.0,
                    torch_train_ips=3.0, torch_train_kind='eager', torch_forward_ips=8.0,
                    torch_forward_kind='eager', torch_warmup_s={'eager': 22.7})


def _report(tmp_path, rows, *args):
  path = tmp_path / 'rows.jsonl'
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  return run_benchmark('speed_report.py', str(path), *args)


def test_model_speed_rows_give_a_markdown_table_with_their_notes(tmp_path):
  rows = [dict(_MODEL_SPEED, round=1, jax='0.10.2', code='fdee21e'),
          dict(_MODEL_SPEED, model='hvt-s-0', gmacs=4.57, train_ips=2.9, forward_ips=9.1,
               compile_s=5.9, round=1, jax='0.12.0.1', code='fdee21e', torch_train_ips=None,
               torch_forward_ips=None, torch_train_kind=None, torch_forward_kind=None)]
  out = _report(tmp_path, rows, '--peak_tflops=1')
  assert out.returncode == 0, out.stderr
  assert out.stdout.splitlines() == [
      # Notes and fields that every row shares head the table; those that differ are columns.
      'cpu, float32, round 1, code fdee21e',
      '| jax | model | batch | train img/s jax | torch | ratio | forward img/s jax | torch | ratio '
      '| JAX train step compile | JAX peak GiB | MFU |',
      '|---|---|---|---|---|---|---|---|---|---|---|---|',
      '| 0.10.2 | hvt-s-1 | 16 | 5.2 | 3.0 | 1.73x | 17.4 | 8.0 | 2.17x | 12.6 s | 0.88 | 7.5% |',
      '| 0.12.0.1 | hvt-s-0 | 16 | 2.9 | n/a | n/a | 9.1 | n/a | n/a | 5.9 s | 0.88 | 8.0% |']


def test_model_speed_rows_print_as_model_speed_prints_them(tmp_path):
  out = _report(tmp_path, [_MODEL_SPEED], '--console')
  assert out.returncode == 0, out.stderr
  assert '| hvt-s-1 | 16 | 5.2 | 3.0 | 1.73x | 17.4 | 8.0 | 2.17x |' in out.stdout
  assert 'PyTorch warm-up (2 steps; includes torch.compile): hvt-s-1@16 eager 23 s' in out.stdout


def test_train_speed_rows_give_the_run_its_figures(tmp_path):
  row = dict(args=['--config=configs/hvt_s.py:recipe=plain', '--config.batch_size=64',
                   '--steps=20', '--target_img_s=9195', '--json=/tmp/rows.jsonl'],
             batch=64, img_s=90.31, input_wait=0.3071, host_cpu_ms_per_image=8.934,
             device='cpu', platform='cpu', devices=1, host_cores=2, jax='0.12.0.1')
  out = _report(tmp_path, [dict(row, code='before'), dict(row, img_s=144.4, code='after')])
  assert out.returncode == 0, out.stderr
  assert out.stdout.splitlines() == [
      'cpu x1, 2 host cores, jax 0.12.0.1',
      '| code | run | img/s | input wait | host CPU-ms per image |',
      '|---|---|---|---|---|',
      '| before | `--config=configs/hvt_s.py:recipe=plain --config.batch_size=64 --steps=20` '
      '| 90.3 | 30.7% | 8.93 |',
      '| after | `--config=configs/hvt_s.py:recipe=plain --config.batch_size=64 --steps=20` '
      '| 144.4 | 30.7% | 8.93 |']


@pytest.mark.parametrize('path', sorted((REPO / 'benchmarks' / 'results').glob('*.jsonl')),
                         ids=lambda p: p.name)
def test_every_kept_results_file_gives_a_table_row_per_row(path):
  rows = [line for line in path.read_text().splitlines() if line.strip()]
  out = run_benchmark('speed_report.py', str(path))
  assert out.returncode == 0, out.stderr
  table = [line for line in out.stdout.splitlines() if line.startswith('|')]
  assert len(table) == 2 + len(rows), out.stdout  # header, rule, one line a row


def test_rows_of_two_benchmarks_in_one_file_are_refused_in_one_line(tmp_path):
  aot = dict(topology='v5e:2x4', step='train', argv=[], batch=8)
  out = _report(tmp_path, [_MODEL_SPEED, aot])
  assert out.returncode == 2 and out.stdout == ''
  assert out.stderr.strip().splitlines()[-1].endswith(
      'rows of aot and model_speed in one file; keep one kind a file.'), out.stderr


def test_largest_batch_takes_the_slope_of_one_probe_and_shrinks_while_it_does_not_fit():
  memory_fit = load_benchmark('memory_fit')
  state, per_example = 1000, 10
  compiled = []

  def compile_at(batch):  # a step whose peak grows a little faster than linearly in the batch
    compiled.append(batch)
    return types.SimpleNamespace(batch=batch, state_bytes=state,
                                 peak_bytes=state + per_example * batch + batch ** 2 // 200)

  side = memory_fit.largest_batch(compile_at, 'm', 8000, probe_batch=64)
  # First the probe; the slope it gives overestimates, so the first estimate does not fit and
  # the search shrinks it to one that does.
  probe, first = compiled[:2]
  assert probe == 64 and compile_at(first).peak_bytes > 8000
  assert side.peak_bytes <= 8000 and side.batch % 32 == 0 and side.batch < first
  compiled.clear()
  row = {'batch': 64, 'peak_bytes': compile_at(64).peak_bytes, 'state_bytes': state}
  compiled.clear()
  assert memory_fit.largest_batch(compile_at, 'm', 8000, probe_batch=64, row=row).batch == side.batch
  assert 64 not in compiled  # the row stood in for the probe's compile
  assert [memory_fit.round_batch(b) for b in (3.7, 63.9, 64, 100, 130)] == [3, 63, 64, 96, 128]
