"""The default console is for people: short lines, no absl prefixes, no TensorFlow start-up
notices; `--verbosity=0` brings the full absl log back."""
import re

import jax

from hvt_jax import model as model_lib
from hvt_jax.training import checkpoint
from tests.helpers import run, run_main

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
  model_dir = checkpoint.save_model(str(tmp_path / 'model'), model,
                                    model_lib.init_params(model, jax.random.key(0)))
  (tmp_path / 'notes.jpg').write_text('not an image')
  result = run('predict', f'--model={model_dir}', str(tmp_path / 'notes.jpg'))
  assert result.returncode == 1
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('predict: error: '), result.stderr[-2000:]
  assert 'notes.jpg: not a readable image (Unknown image file format.' in lines[0], lines[0]
  assert '{{' not in lines[0] and '[Op:' not in lines[0] and lines[0].endswith('required.)')
