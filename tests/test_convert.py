import json
import os
import pickle
import zipfile

import jax
import numpy as np
import pytest

from hvt_jax import loading, model_dir
from hvt_jax.interop import convert, pth_reader
from hvt_jax import model as model_lib
from tests import torch_layout
from tests.helpers import run

TINY_SD = dict(width=128, depth=4, patch=4, image=32, classes=5)


def _logits(model, params, x_nchw):
  return np.asarray(jax.jit(lambda p, x: model.apply({'params': p}, x))(params, x_nchw.transpose(0, 2, 3, 1)))


def test_tiny_official_checkpoint_matches_official_logits(tiny_official_fixture, tmp_path):
  """The official architecture's own logits for a checkpoint in the official release layout,
  reproduced by converting it: the check runs on every clone."""
  pth, npz = tiny_official_fixture
  ref = np.load(npz)
  out = convert.convert(str(pth), str(tmp_path / 'tiny'))
  model, params = loading.load(out)
  assert (model.num_heads, model.head_dim, model.depth, model.pool_every) == (1, 64, 4, 2)
  assert (model.image_size, model.num_classes) == (64, 10)
  assert model_lib.param_count(params) == int(ref['num_params'])
  assert model.tokens_per_block() == list(ref['seq_lens'])
  logits = _logits(model, params, ref['x'])
  np.testing.assert_allclose(logits, ref['logits'], atol=1e-5, rtol=0)
  # Against the float64 run of the official model too: the gap is float32 rounding, not a bug.
  np.testing.assert_allclose(logits, ref['logits_fp64'], atol=1e-5, rtol=0)


def test_official_fixture_matches_official_logits(official_fixture, tmp_path):
  pth, npz = official_fixture
  ref = np.load(npz)
  out = convert.convert(str(pth), str(tmp_path / 'ti1'))
  model, params = loading.load(out)
  assert model.config() == model_lib.variant('hvt-ti-1')
  assert model_lib.param_count(params) == int(ref['num_params'])
  assert model.tokens_per_block() == list(ref['seq_lens'])
  np.testing.assert_allclose(_logits(model, params, ref['x']), ref['logits'], atol=1e-4, rtol=0)


@pytest.mark.parametrize('kind', ['pool_every_2', 'pool_block_0_only', 'deit_class_token'])
def test_converted_random_weights_match_numpy_reference(kind, tmp_path):
  """Reader, converter and model against an independent float64 numpy forward pass."""
  rng = np.random.default_rng(0)
  setup, expected_every = {
      'pool_every_2': (dict(pooling_blocks=[0, 2], pooled_tokens=[31, 15]), 2),
      'pool_block_0_only': (dict(pooling_blocks=[0], pooled_tokens=[31]), 4),
      'deit_class_token': (dict(pooling_blocks=[], pooled_tokens=[], class_token=True), 0),
  }[kind]
  sd = torch_layout.random_state_dict(rng, **TINY_SD, **setup)
  # Full training files carry more than the weights; bare state dicts exist too.
  saved = sd if kind == 'deit_class_token' else {'model': sd, 'epoch': 7, 'optimizer': {'state': {}}}
  torch_layout.write_pth(tmp_path / 'ck.pth', saved)
  model, params = loading.load(convert.convert(str(tmp_path / 'ck.pth'), str(tmp_path / 'out')))
  assert (model.num_heads, model.depth, model.patch_size, model.image_size) == (2, 4, 4, 32)
  assert (model.pool_every, model.class_token) == (expected_every, kind == 'deit_class_token')
  x = rng.normal(size=(2, 3, 32, 32)).astype(np.float32)
  ref = torch_layout.reference_logits(sd, x, num_heads=2, class_token=model.class_token)
  np.testing.assert_allclose(_logits(model, params, x), ref, atol=1e-4, rtol=1e-4)


def _tiny_pth(path, **extra):
  sd = torch_layout.random_state_dict(np.random.default_rng(0), **TINY_SD, pooling_blocks=[0],
                                      pooled_tokens=[31])
  sd.update(extra)
  torch_layout.write_pth(path, {'model': sd})
  return path


def test_refuses_pickles_that_would_run_code(tmp_path):
  marker = tmp_path / 'pwned'
  payload = pickle.dumps({'model': _Exploit(f'touch {marker}')}, protocol=2)
  with zipfile.ZipFile(tmp_path / 'evil.pth', 'w') as z:
    z.writestr('evil/data.pkl', payload)
  with pytest.raises(pth_reader.PthError, match=r'refusing to unpickle'):
    pth_reader.load(str(tmp_path / 'evil.pth'))
  assert not marker.exists()


class _Exploit:
  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return os.system, (self.command,)


def test_truncated_and_foreign_files_give_clear_errors(tmp_path):
  good = _tiny_pth(tmp_path / 'good.pth')
  data = good.read_bytes()
  (tmp_path / 'cut.pth').write_bytes(data[:len(data) // 2])
  with pytest.raises(pth_reader.PthError, match='not a PyTorch zip checkpoint'):
    pth_reader.load(str(tmp_path / 'cut.pth'))
  with zipfile.ZipFile(good) as z, zipfile.ZipFile(tmp_path / 'nodata.pth', 'w') as out:
    for name in z.namelist():
      if not name.endswith('/data/0'):
        out.writestr(name, z.read(name))
  with pytest.raises(pth_reader.PthError, match='missing from the archive'):
    pth_reader.load(str(tmp_path / 'nodata.pth'))
  with pytest.raises(pth_reader.PthError, match='no such file'):
    pth_reader.load(str(tmp_path / 'absent.pth'))


def test_unknown_tensors_are_refused(tmp_path):
  pth = _tiny_pth(tmp_path / 'distilled.pth', dist_token=np.zeros((1, 1, 128), np.float32))
  with pytest.raises(convert.ConvertError, match='dist_token'):
    convert.convert(str(pth), str(tmp_path / 'out'))
  assert not (tmp_path / 'out').exists()


def test_never_overwrites_and_cli_prints_one_line(tmp_path):
  pth = _tiny_pth(tmp_path / 'ck.pth')
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'keep.txt').write_text('mine')
  result = run('convert', f'--pytorch={pth}', f'--output={out}', timeout=120)
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1].startswith('convert: error: ')
  assert 'already exists and is not empty' in result.stderr and 'Traceback' not in result.stderr
  assert sorted(os.listdir(out)) == ['keep.txt'] and (out / 'keep.txt').read_text() == 'mine'


def test_damaged_model_dirs_give_clear_errors(tmp_path):
  out = convert.convert(str(_tiny_pth(tmp_path / 'ck.pth')), str(tmp_path / 'out'))
  meta = json.loads((tmp_path / 'out' / 'model.json').read_text())
  assert meta['model']['pool_every'] == 4 and 'converted from' in meta['source']
  (tmp_path / 'out' / 'model.json').write_text('{"model": {"depth": ')
  with pytest.raises(model_dir.CheckpointError, match='model.json is corrupt'):
    loading.load(out)
  (tmp_path / 'out' / 'model.json').write_text(json.dumps(meta))
  for f in (tmp_path / 'out' / 'params').rglob('*'):
    if f.is_file() and f.name != '_CHECKPOINT_METADATA':
      f.write_bytes(b'garbage')
  with pytest.raises(model_dir.CheckpointError, match='corrupt or incomplete'):
    loading.load(out)
