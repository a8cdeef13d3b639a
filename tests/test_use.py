"""Using saved weights elsewhere: load, export, predict, other device counts, the README example."""
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_image

import hvt_jax
from hvt_jax import loading, model_dir
from hvt_jax.training import checkpoint
from hvt_jax.interop import export
from hvt_jax import model as model_lib
from tests import tiny_config
from tests.helpers import REPO, run, run_main


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A finished tiny run: checkpoints at steps 8 (evaluated) and 12, with EMA."""
  path = tmp_path_factory.mktemp('run')
  run_main(path, '--config.max_steps=12', '--config.checkpoint_every_steps=4',
           '--config.eval_every_steps=8', '--config.keep_checkpoints=1', timeout=600)
  return path


def _logits(model, params, seed=0):
  x = np.random.default_rng(seed).normal(size=(2, model.image_size, model.image_size, 3))
  return np.asarray(jax.jit(lambda p, x: model.apply({'params': p}, x))(params, x.astype(np.float32)))


def test_load_latest_best_raw_and_ema_without_the_optimizer(workdir):
  steps = checkpoint.manager(str(workdir), read_only=True).all_steps()
  assert steps == [8, 12]  # latest 1 kept, plus the best (the only evaluated earlier step)
  for step in steps:
    shutil.rmtree(workdir / 'checkpoints' / str(step) / 'opt')  # loading must not need it
  latest_model, latest = loading.load(str(workdir))
  _, best = loading.load(str(workdir), best=True)
  _, ema = loading.load(str(workdir), ema=True)
  _, step8 = loading.load(str(workdir / 'checkpoints'), step=8)
  assert latest_model.depth == 4 and latest_model.image_size == 16
  np.testing.assert_array_equal(_logits(latest_model, best), _logits(latest_model, step8))
  assert not np.allclose(_logits(latest_model, latest), _logits(latest_model, best))
  assert not np.allclose(_logits(latest_model, latest), _logits(latest_model, ema))
  with pytest.raises(model_dir.CheckpointError, match=r'no checkpoint at step 5; it has steps \[8, 12\]'):
    loading.load(str(workdir), step=5)


def test_a_model_dir_written_by_hand_in_the_first_layout_loads(tmp_path):
  """model.json + params/ as the first versions wrote them (and save_model still does)."""
  import orbax.checkpoint as ocp
  model = model_lib.HVT(**tiny_config.get_config().model)
  params = model_lib.init_params(model, jax.random.key(5))
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(tmp_path / 'old' / 'params', params)
  ckptr.wait_until_finished()
  meta = {'model': model.config(), 'source': 'converted from hvt.pth', 'class_names': None,
          'preprocess': {'crop_pct': 0.875, 'interpolation': 'bicubic',
                         'mean': [0.485, 0.456, 0.406], 'std': [0.229, 0.224, 0.225]}}
  (tmp_path / 'old' / 'model.json').write_text(json.dumps(meta))
  saved = loading.resolve(str(tmp_path / 'old'))
  assert saved.meta == meta and saved.step is None and saved.model == model
  loaded_model, loaded = hvt_jax.load(str(tmp_path / 'old'))
  assert loaded_model == model
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(model_dir.CheckpointError, match='apply to training workdirs only'):
    hvt_jax.load(str(tmp_path / 'old'), ema=True)


def test_a_model_saved_with_gpu_run_settings_loads_and_runs_here(tmp_path):
  """attention='cudnn' (which needs a GPU), remat and a forced scan, as a GPU run might save
  them: loading takes this machine's defaults for how the model runs, never what it computes."""
  base = model_lib.HVT(**tiny_config.get_config().model)
  params = model_lib.init_params(base, jax.random.key(3))
  model_dir.save_model(str(tmp_path / 'gpu'), base, params)
  saved = base.clone(attention='cudnn', remat=True, scan_blocks=False)  # as on the GPU machine
  meta = json.loads((tmp_path / 'gpu' / 'model.json').read_text())
  (tmp_path / 'gpu' / 'model.json').write_text(json.dumps({**meta, 'model': saved.config()}))
  model, loaded = hvt_jax.load(str(tmp_path / 'gpu'))
  assert {k: getattr(model, k) for k in model_lib.RUN_SETTINGS} == {
      k: model_lib.field_defaults()[k] for k in model_lib.RUN_SETTINGS}
  assert model.config() == {**saved.config(), **{k: getattr(model, k) for k in model_lib.RUN_SETTINGS}}
  np.testing.assert_allclose(_logits(model, loaded), _logits(base, params), rtol=1e-5, atol=1e-5)


def test_export_writes_a_small_params_only_model(workdir, tmp_path):
  out = tmp_path / 'exported'
  result = run('export', f'--workdir={workdir}', f'--output={out}', '--ema')
  assert result.returncode == 0, result.stderr[-2000:]
  meta = json.loads((out / 'model.json').read_text())
  assert meta['class_names'] == [str(i) for i in range(10)] and 'EMA weights of step 12' in meta['source']
  assert sorted(os.listdir(out)) == ['model.json', 'params']
  model, params = loading.load(str(out))
  ref_model, ref = loading.load(str(workdir), ema=True)
  np.testing.assert_array_equal(_logits(model, params), _logits(ref_model, ref))
  size = sum(f.stat().st_size for f in out.rglob('*') if f.is_file())
  assert size < 3 * 4 * model_lib.param_count(params)  # weights once, no optimizer moments
  again = run('export', f'--workdir={workdir}', f'--output={out}')
  assert again.returncode != 0 and 'already exists' in again.stderr.strip().splitlines()[-1]


def test_predict_prints_top5_and_one_line_per_bad_file(workdir, tmp_path):
  out = export.export(str(workdir), str(tmp_path / 'model'))
  photo = load_sample_image('china.jpg')
  Image.fromarray(photo).save(tmp_path / 'china.jpg')
  Image.fromarray(photo[:200, :300]).save(tmp_path / 'crop.png')
  (tmp_path / 'notes.jpg').write_text('not an image')
  files = [tmp_path / 'china.jpg', tmp_path / 'notes.jpg', tmp_path / 'absent.jpg', tmp_path / 'crop.png']
  result = run('predict', f'--model={out}', *map(str, files))
  assert result.returncode == 1
  errors = result.stderr.strip().splitlines()
  assert len([e for e in errors if e.startswith('predict: error: ')]) == 2
  assert any('notes.jpg: not a readable image' in e for e in errors)
  assert any('absent.jpg: no such file' in e for e in errors)
  lines = result.stdout.strip().splitlines()
  assert lines[0].endswith('china.jpg') and lines[6].endswith('crop.png')
  probs = [float(re.match(r'\s+([\d.]+)%\s+\d$', line).group(1)) for line in lines[1:6]]
  assert probs == sorted(probs, reverse=True) and sum(probs) <= 100.01


EIGHT_DEVICES = r'''
import os, sys
os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
import jax, numpy as np
import hvt_jax
mesh = jax.make_mesh((4,), ('x',))
model, params = hvt_jax.load(sys.argv[1], sharding=jax.sharding.NamedSharding(mesh, jax.P()))
leaf = params['blocks_0']['attn']['qkv']['kernel']
print('DEVICES', len(leaf.sharding.device_set))
'''


@pytest.mark.slow
def test_fsdp_checkpoint_from_8_devices_restores_on_1_and_on_4(tmp_path):
  fsdp = tmp_path / 'fsdp'
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  # Width 128 makes the big kernels large enough to be split over the fsdp axis.
  run_main(fsdp, '--config.max_steps=4', '--config.model.head_dim=64',
           "--config.mesh=(('data', 4), ('fsdp', 2))", env=env, timeout=600)
  saved = json.loads((fsdp / 'checkpoints' / '4' / 'params' / '_sharding').read_text())
  assert any('fsdp' in v for v in saved.values())  # really saved split across devices
  model, params = loading.load(str(fsdp))  # this process: one CPU device
  assert len(jax.devices()) == 1
  assert params['blocks_0']['attn']['qkv']['kernel'].shape == (128, 384)
  assert np.isfinite(_logits(model, params)).all()
  result = subprocess.run([sys.executable, '-c', EIGHT_DEVICES, str(fsdp)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'DEVICES 4' in result.stdout


def _readme_example():
  text = (REPO / 'README.md').read_text()
  block = text.split('<!-- use:example -->', 1)[1].split('```python', 1)[1].split('```', 1)[0]
  return block


def test_readme_example_runs(workdir, tmp_path):
  code = _readme_example()
  assert len(code.strip().splitlines()) <= 12
  export.export(str(workdir), str(tmp_path / 'hvt_model'))
  Image.fromarray(load_sample_image('flower.jpg')).save(tmp_path / 'flower.jpg')
  result = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  printed = result.stdout.strip().splitlines()
  assert len(printed) == 2 and '(1, 16, 32)' in printed[1]  # tokens entering the first pool
