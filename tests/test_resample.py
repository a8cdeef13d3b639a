"""Models at another image size: position embeddings resampled from the saved ones."""
import json

import jax
import numpy as np
import pytest
from PIL import Image

from hvt_jax import model as model_lib
from hvt_jax.interop import convert
from hvt_jax.model import resample
from hvt_jax import loading
from tests import torch_layout
from tests.helpers import TINY_CONFIG, TINY_MODEL, run



def _params(**overrides):
  model = model_lib.create({**TINY_MODEL, **overrides})
  return model, model_lib.init_params(model, jax.random.key(0))


def test_resamplers_match_pytorch_interpolate():
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(0)
  for n_in, n_out in [(14, 24), (24, 14), (8, 12), (7, 3)]:
    x = rng.normal(size=(1, 2, n_in, n_in))
    ref = torch.nn.functional.interpolate(torch.tensor(x), size=(n_out, n_out), mode='bicubic',
                                          align_corners=False).numpy()
    m = resample.cubic_matrix(n_in, n_out)
    np.testing.assert_allclose(np.einsum('yh,xw,bchw->bcyx', m, m, x), ref, atol=1e-12)
    seq = rng.normal(size=(1, 2, n_in))
    ref = torch.nn.functional.interpolate(torch.tensor(seq), size=n_out, mode='linear',
                                          align_corners=True).numpy()
    np.testing.assert_allclose(np.einsum('on,bcn->bco', resample.linear_matrix(n_in, n_out), seq),
                               ref, atol=1e-12)


def test_same_size_is_the_identity_and_other_sizes_reshape_every_embedding():
  model, params = _params()
  same = resample.resample_params(params, model.config(), 32)
  for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(params)):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
  big, out = resample.at_size(model, params, 48)
  # 48 / 4 = 12: 144 tokens, 71 after block 0's pool, 35 after block 2's.
  assert big.tokens_per_block() == [144, 71, 71, 35, 35]
  assert out['pos_embed'].shape == (1, 144, 16)
  assert out['blocks_0']['pos_embed'].shape == (1, 71, 16)
  assert out['blocks_2']['pos_embed'].shape == (1, 35, 16)
  # Ends aligned: the first and last pooled positions keep their embeddings.
  for name in ('blocks_0', 'blocks_2'):
    old, new = np.asarray(params[name]['pos_embed']), np.asarray(out[name]['pos_embed'])
    np.testing.assert_allclose(new[:, [0, -1]], old[:, [0, -1]], rtol=1e-6)
  np.testing.assert_array_equal(out['blocks_1']['attn']['qkv']['kernel'],
                                params['blocks_1']['attn']['qkv']['kernel'])
  logits = big.apply({'params': out}, np.zeros((2, 48, 48, 3), np.float32))
  assert logits.shape == (2, 5) and np.isfinite(logits).all()


def test_deit_class_token_entry_stays():
  model, params = _params(pool_every=0, class_token=True)
  _, out = resample.at_size(model, params, 48)
  assert out['pos_embed'].shape == (1, 1 + 144, 16)
  np.testing.assert_array_equal(out['pos_embed'][:, 0], params['pos_embed'][:, 0])


@pytest.mark.parametrize('size,needle', [(30, 'not divisible by patch size 4'),
                                         (8, 'pooling after block 2 needs at least 3 tokens')])
def test_impossible_sizes_get_the_model_error(size, needle):
  model, params = _params()
  with pytest.raises(model_lib.ConfigError, match=needle) as e:
    resample.resample_params(params, model.config(), size)
  assert '\n' not in str(e.value)


def test_official_224_model_evaluates_at_384(tmp_path):
  """HVT-Ti-1 in the official layout (random weights), converted, loaded at 384."""
  sd = torch_layout.random_state_dict(np.random.default_rng(0), width=192, depth=12, patch=16,
                                      image=224, classes=1000, pooling_blocks=[0],
                                      pooled_tokens=[97])
  torch_layout.write_pth(tmp_path / 'ti.pth', {'model': sd})
  out = convert.convert(str(tmp_path / 'ti.pth'), str(tmp_path / 'ti'))
  model, params = loading.load(out, image_size=384)
  assert model.image_size == 384 and model.tokens_per_block()[1] == 287  # (576 - 3) // 2 + 1
  x = np.random.default_rng(1).normal(size=(1, 384, 384, 3)).astype(np.float32)
  logits = np.asarray(jax.jit(lambda p, x: model.apply({'params': p}, x))(params, x))
  assert logits.shape == (1, 1000) and np.isfinite(logits).all()


def test_predict_at_another_size_and_its_error_line(tmp_path):
  sd = torch_layout.random_state_dict(np.random.default_rng(0), width=64, depth=4, patch=4,
                                      image=32, classes=5, pooling_blocks=[0], pooled_tokens=[31])
  torch_layout.write_pth(tmp_path / 'm.pth', {'model': sd})
  out = convert.convert(str(tmp_path / 'm.pth'), str(tmp_path / 'm'))
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), np.uint8)).save(
      tmp_path / 'x.png')
  ok = run('predict', f'--model={out}', '--image_size=48', str(tmp_path / 'x.png'), timeout=600)
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert ok.stdout.count('class ') == 5
  bad = run('predict', f'--model={out}', '--image_size=30', str(tmp_path / 'x.png'), timeout=600)
  assert bad.returncode == 1
  assert bad.stderr.strip().splitlines()[-1] == (
      'predict: error: image size 30 is not divisible by patch size 4; use a multiple of 4 (e.g. 28).')


@pytest.mark.slow
def test_trained_digits_model_keeps_its_accuracy_from_32_to_48_px(tmp_path):
  """Trains the tiny config at 32 px, then evaluates it at 32 and, resampled, at 48.

  docs/reference.md's figure is the full demo's (99.67% -> 82.0%); this briefly trained model loses
  more (measured: 63.3% -> 29.0%), but stays well above chance (10%).
  """
  workdir = tmp_path / 'run'
  train = run('main', f'--config={TINY_CONFIG}', f'--workdir={workdir}',
               '--config.model.image_size=32', '--config.eval_every_steps=1000',
               '--config.checkpoint_every_steps=1000', timeout=600)  # its 3 epochs: 138 steps
  assert train.returncode == 0, train.stderr[-3000:]
  top1 = {}
  for size in (32, 48):
    out = tmp_path / f'eval{size}'
    ev = run('main', f'--config={TINY_CONFIG}', f'--workdir={out}',
              '--config.eval_only', f'--config.init_from={workdir}',
              f'--config.model.image_size={size}', timeout=600)
    assert ev.returncode == 0, ev.stderr[-3000:]
    top1[size] = json.loads((out / 'eval_results.json').read_text())['eval/top1']
  print('held-out top-1 at 32 px and resampled to 48 px:', top1)
  assert top1[32] > 60  # it learned (chance is 10%)
  assert top1[48] > 20
