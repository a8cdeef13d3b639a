"""benchmarks/train_speed.py: the real training loop on synthetic JPEGs, its figures read from the
run's own metrics.jsonl."""
import json
import os
import subprocess
import sys

from hvt_jax.training import curves
from tests.helpers import REPO, TINY_CONFIG


def _train_speed(*args) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, str(REPO / 'benchmarks' / 'train_speed.py'),
                         f'--config={TINY_CONFIG}', '--config.batch_size=8', '--distinct=4',
                         '--images=32', '--classes=3', *args],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_train_speed_prints_and_saves_the_loops_own_figures(tmp_path):
  workdir, rows = tmp_path / 'run', tmp_path / 'rows.jsonl'
  out = _train_speed('--steps=3', '--warmup_steps=1', '--log_every=2', '--target_img_s=1000',
                     f'--workdir={workdir}', f'--json={rows}')
  assert out.returncode == 0, out.stderr[-3000:]
  row, = [json.loads(line) for line in rows.read_text().splitlines()]
  # Steps 3-6 timed (3 rounded up to two log intervals of 2), after the untimed steps 1-2
  # (1 rounded up to one interval).
  assert row['timed_steps'] == 4 and 'timed: steps 3-6 (after 2 untimed' in out.stdout, out.stdout
  logged = [r for r in curves.read(str(workdir)) if 'perf/input_wait' in r]
  assert [r['step'] for r in logged] == [2, 4, 6]
  timed = logged[1:]  # equal intervals: the run's figures are the rows' means
  mean = lambda key: sum(r[key] for r in timed) / len(timed)
  assert abs(row['host_cpu_ms_per_image'] - mean('perf/host_cpu_ms_per_image')) < 1e-9
  walls = [2 * 8 / r['train/images_per_sec_per_device'] for r in timed]
  assert abs(row['img_s'] - 4 * 8 / sum(walls)) < 1e-6 * row['img_s']
  wait = sum(r['perf/input_wait'] * w for r, w in zip(timed, walls)) / sum(walls)
  assert abs(row['input_wait'] - wait) < 1e-9 and 0 <= wait <= 1
  assert abs(row['cores_for_target'] - row['host_cpu_ms_per_image']) < 1e-9  # 1000 img/s
  assert f'{row["img_s"]:9.1f} images/s' in out.stdout
  assert f'{100 * row["input_wait"]:9.1f} % of the time the step waited for input' in out.stdout
  assert f'{row["cores_for_target"]:9.1f} busy cores to feed 1000 images/s' in out.stdout
  # The folder: 32 train images in the three classes the model was given.
  assert json.loads((workdir / 'config.json').read_text())['model']['num_classes'] == 3


def test_train_speed_refuses_an_existing_workdir_in_one_line(tmp_path):
  out = _train_speed(f'--workdir={tmp_path}')
  assert out.returncode != 0 and 'Traceback' not in out.stderr
  assert out.stderr.strip().splitlines()[-1] == (
      f'train_speed: error: --workdir: {tmp_path} exists; pass a new directory.'), out.stderr
