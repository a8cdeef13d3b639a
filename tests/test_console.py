"""The default console is for people: short lines, no absl prefixes, no TensorFlow start-up
notices; `--verbosity=0` brings the full absl log back."""
import json
import os
import re
import subprocess
import sys

import jax

from hvt_jax import model as model_lib
from hvt_jax.model_dir import save_model
from tests.helpers import REPO, run, run_main

ABSL_PREFIX = re.compile(r'^[IWEF]\d{4} \d\d:\d\d:\d\d', re.M)
NATIVE_NOISE = ('oneDNN', 'All log messages before absl::InitializeLog()', 'cpu_feature_guard')


def _no_log_settings(monkeypatch):
  """As a user's shell has it: the test process itself imported hvt_jax (and jax)."""
  for name in ('TF_CPP_MIN_LOG_LEVEL', 'TF_ENABLE_ONEDNN_OPTS'):
    monkeypatch.delenv(name, raising=False)


def test_default_console_is_one_line_per_event_and_verbosity_restores_the_log(tmp_path,
                                                                              monkeypatch):
  _no_log_settings(monkeypatch)
  quiet = run_main(tmp_path, '--config.max_steps=8')
  out = quiet.stdout + quiet.stderr
  assert not ABSL_PREFIX.search(out), out[-2000:]
  assert not any(noise in out for noise in NATIVE_NOISE), out[-2000:]
  steps = re.findall(r'^step (\d+)/8  epoch [\d.]+  loss [\d.]+  lr [\d.e+-]+  \d+ img/s  '
                     r'input wait \d+%  ETA \S+$', out, re.M)
  assert steps == ['4', '8'], out[-2000:]
  assert re.search(r'^eval at step 8: top-1 [\d.]+%  top-5 [\d.]+%  loss [\d.]+ \| EMA top-1', out,
                   re.M), out[-2000:]
  last = quiet.stderr.strip().splitlines()[-1]
  assert last.startswith(f'Done. Curves: {tmp_path}/curves.png; best checkpoint: step 8 '), last
  assert last.endswith(f'{tmp_path}/checkpoints/8'), last

  verbose = run_main(tmp_path, '--config.max_steps=12', '--verbosity=0')
  assert ABSL_PREFIX.search(verbose.stderr) and 'train/loss=' in verbose.stderr
  assert 'Resumed' in verbose.stderr and not re.search(r'^step \d+/', verbose.stderr, re.M)


def test_predict_on_a_broken_image_prints_only_its_error_line(tmp_path, monkeypatch):
  _no_log_settings(monkeypatch)
  model = model_lib.HVT(**model_lib.variant('hvt-ti-1', image_size=32, patch_size=8, depth=2,
                                            num_classes=3))
  model_dir = save_model(str(tmp_path / 'model'), model,
                          model_lib.init_params(model, jax.random.key(0)))
  (tmp_path / 'notes.jpg').write_text('not an image')
  result = run('predict', f'--model={model_dir}', str(tmp_path / 'notes.jpg'))
  assert result.returncode == 1
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('predict: error: '), result.stderr[-2000:]
  assert 'notes.jpg: not a readable image (Unknown image file format.' in lines[0], lines[0]
  assert '{{' not in lines[0] and '[Op:' not in lines[0] and lines[0].endswith('required.)')


def _environment_changes(code: str) -> list:
  """What `code` (run in a fresh process without log settings) prints as JSON."""
  env = {k: v for k, v in os.environ.items()
         if k not in ('TF_CPP_MIN_LOG_LEVEL', 'TF_ENABLE_ONEDNN_OPTS')}
  changes = ('lambda before: {k: v for k, v in os.environ.items() if before.get(k) != v}')
  result = subprocess.run([sys.executable, '-c', f'import json, os, sys; changes = {changes}; {code}'],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_importing_the_package_leaves_the_environment_and_the_command_line_alone():
  """Only the commands quiet the native logs; a library import sets nothing and reads no argv.
  `load` and `create` import jax, which sets its own default, and nothing else changes."""
  jax_alone = _environment_changes('before = dict(os.environ); import jax; '
                                   'print(json.dumps([changes(before)]))')
  package = _environment_changes(
      'del sys.argv; before = dict(os.environ); import hvt_jax; top = changes(before); '
      'hvt_jax.load, hvt_jax.create, hvt_jax.HVT, hvt_jax.model.init_params; '
      'print(json.dumps([top, changes(before)]))')
  assert package == [{}, jax_alone[0]]
  assert 'TF_ENABLE_ONEDNN_OPTS' not in package[1]
  assert package[1].get('TF_CPP_MIN_LOG_LEVEL') != '2'  # what cli.quiet_native_logs sets
