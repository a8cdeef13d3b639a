"""Export formats, each checked numerically against the JAX model: Orbax, StableHLO, SavedModel, .pth."""
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from hvt_jax import loading
from hvt_jax.interop import convert, export, pth_reader
from tests import helpers, torch_layout

TINY_SD = dict(width=128, depth=4, patch=4, image=32, classes=5)
KINDS = {'hvt': dict(pooling_blocks=[0, 2], pooled_tokens=[31, 15]),
         'deit': dict(pooling_blocks=[], pooled_tokens=[], class_token=True)}


@pytest.fixture(scope='module')
def model_dirs(tmp_path_factory):
  """Converted random official-layout checkpoints: an HVT pooling every 2 blocks and a DeiT."""
  root = tmp_path_factory.mktemp('models')
  dirs = {}
  for kind, setup in KINDS.items():
    sd = torch_layout.random_state_dict(np.random.default_rng(1), **TINY_SD, **setup)
    torch_layout.write_pth(root / f'{kind}.pth', {'model': sd})
    dirs[kind] = convert.convert(str(root / f'{kind}.pth'), str(root / kind))
  return dirs


def _images(n=7):
  return np.random.default_rng(2).normal(size=(n, 32, 32, 3)).astype(np.float32)


def _jax_logits(model_dir, x):
  model, params = loading.load(model_dir, sharding='cpu')
  return np.asarray(jax.jit(lambda p, x: model.apply({'params': p}, x))(params, x))


def _run_alone(tmp_path, script, *args):
  """Runs `script` in a fresh Python that must not import hvt_jax; returns its saved arrays."""
  path = tmp_path / 'standalone.py'
  path.write_text(textwrap.dedent(script) + textwrap.dedent('''
      assert not [m for m in sys.modules if m.startswith('hvt_jax')], 'imported hvt_jax'
      np.savez(sys.argv[-1], **out)
      '''))
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  result = subprocess.run([sys.executable, str(path), *map(str, args), str(tmp_path / 'out.npz')],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  return np.load(tmp_path / 'out.npz')


def test_orbax_from_a_model_dir(model_dirs, tmp_path):
  out = export.export(model_dirs['hvt'], str(tmp_path / 'copy'))
  x = _images()
  np.testing.assert_array_equal(_jax_logits(out, x), _jax_logits(model_dirs['hvt'], x))
  source = loading.resolve(out).meta['source']
  assert source.startswith(f'exported {model_dirs["hvt"]} (converted from')


def test_stablehlo_runs_standalone_at_any_batch(model_dirs, tmp_path):
  out = export.export(model_dirs['hvt'], str(tmp_path / 'hlo'), format='stablehlo')
  assert sorted(os.listdir(out)) == ['model.json', 'model.stablehlo']
  x = _images()
  np.save(tmp_path / 'x.npy', x)
  got = _run_alone(tmp_path, '''
      import sys
      import numpy as np
      from jax import export
      exported = export.deserialize(open(sys.argv[1] + '/model.stablehlo', 'rb').read())
      x = np.load(sys.argv[2])
      out = {f'batch{n}': np.asarray(exported.call(x[:n])) for n in (1, 7)}
      ''', out, tmp_path / 'x.npy')
  expected = _jax_logits(model_dirs['hvt'], x)
  np.testing.assert_allclose(got['batch1'], expected[:1], atol=1e-5, rtol=0)
  np.testing.assert_allclose(got['batch7'], expected, atol=1e-5, rtol=0)


def test_savedmodel_serving_default(model_dirs, tmp_path):
  import tensorflow as tf  # the export imported it already
  out = export.export(model_dirs['deit'], str(tmp_path / 'sm'), format='savedmodel')
  assert loading.resolve(os.path.join(out, 'assets.extra')).meta['format'] == 'savedmodel'
  serve = tf.saved_model.load(out).signatures['serving_default']
  spec = serve.structured_input_signature[1]['images']
  assert spec.shape.as_list() == [None, 32, 32, 3] and spec.dtype == tf.float32
  x = _images()
  expected = _jax_logits(model_dirs['deit'], x)
  for n in (1, 7):
    got = serve(images=tf.constant(x[:n]))['logits'].numpy()
    np.testing.assert_allclose(got, expected[:n], atol=1e-4, rtol=0)


@pytest.mark.parametrize('kind', KINDS)
def test_pytorch_round_trip_is_bit_for_bit(kind, model_dirs, tmp_path):
  out = export.export(model_dirs[kind], str(tmp_path / 'model.pth'), format='pytorch')
  model, params = loading.load(model_dirs[kind], sharding='cpu')
  saved = pth_reader.load(out)
  assert list(saved) == ['model']
  assert list(saved['model']) == [name for name, _, _ in convert.official_layout(model.config())]
  model2, params2 = convert.read(out)
  assert model2 == model
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(params2)):
    assert a.dtype == b.dtype == np.float32 and np.array_equal(np.asarray(a), b), path
  x = _images(2)
  ref = torch_layout.reference_logits(saved['model'], x.transpose(0, 3, 1, 2), num_heads=2,
                                      class_token=model.class_token)
  np.testing.assert_allclose(_jax_logits(model_dirs[kind], x), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('kind', KINDS)
def test_pytorch_file_loads_in_torch_strictly(kind, model_dirs, tmp_path):
  torch = pytest.importorskip('torch', reason='PyTorch is not installed: torch.load is not tested')
  out = export.export(model_dirs[kind], str(tmp_path / 'model.pth'), format='pytorch')
  sd = torch.load(out, weights_only=True)['model']
  model, _ = loading.load(model_dirs[kind], sharding='cpu')
  module = torch_layout.official_module(torch, model.config())
  module.load_state_dict(sd, strict=True)
  x = _images(2)
  ref = torch_layout.reference_logits({k: v.numpy() for k, v in module.state_dict().items()},
                                      x.transpose(0, 3, 1, 2), num_heads=2, class_token=model.class_token)
  np.testing.assert_allclose(_jax_logits(model_dirs[kind], x), ref, atol=1e-4, rtol=1e-4)


def test_cli_writes_then_refuses_an_existing_output(model_dirs, tmp_path):
  out = tmp_path / 'model.pth'
  args = [f'--model={model_dirs["hvt"]}', f'--output={out}', '--format=pytorch']
  first = helpers.run('export', *args)
  assert first.returncode == 0, first.stderr
  assert first.stdout.startswith(f'wrote {out} (pytorch') and 'parameters' in first.stdout
  data = out.read_bytes()
  again = helpers.run('export', *args)
  assert again.returncode != 0 and 'Traceback' not in again.stderr
  assert again.stderr.strip().splitlines()[-1] == (
      f'export: error: {out} already exists; choose a new --output or remove it yourself '
      '(nothing was written).')
  assert out.read_bytes() == data
