"""Published weights by name: download from a local HTTP server, cache, integrity and failures."""
import hashlib
import http.server
import json
import os
import shutil
import socket
import threading
import types

import jax
import numpy as np
import pytest

import hvt_jax
from hvt_jax import loading, model_dir, published
from hvt_jax import model as model_lib
from hvt_jax.interop import convert, weights
from tests import helpers, torch_layout

TINY_SD = dict(width=128, depth=4, patch=4, image=32, classes=5)
FILE = 'v1.0/tiny_1.pth'


def _tiny_sd(seed=0, pooling=(0,)):
  tokens = {0: 31, 2: 15}
  return torch_layout.random_state_dict(np.random.default_rng(seed), **TINY_SD,
                                        pooling_blocks=list(pooling),
                                        pooled_tokens=[tokens[i] for i in pooling])


@pytest.fixture(autouse=True)
def no_proxy_for_localhost(monkeypatch):
  monkeypatch.setenv('no_proxy', '127.0.0.1')  # a CI proxy must not stand in for the test server


@pytest.fixture
def server(tmp_path):
  """A release mirror on 127.0.0.1 serving `root`; paths in `truncate` send half the body."""
  root = tmp_path / 'release'
  root.mkdir()
  truncate = set()

  class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
      f = root / self.path.lstrip('/')
      if not f.is_file():
        self.send_error(404)
        return
      data = f.read_bytes()
      self.send_response(200)
      self.send_header('Content-Length', str(len(data)))
      self.end_headers()
      # HTTP/1.0: the connection closes after this, so a short body is a cut-off download.
      self.wfile.write(data[:len(data) // 2] if self.path.lstrip('/') in truncate else data)

    def log_message(self, *args):
      pass

  httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()

  def stop():
    httpd.shutdown()
    httpd.server_close()

  state = types.SimpleNamespace(root=root, truncate=truncate, stop=stop,
                                url=f'http://127.0.0.1:{httpd.server_address[1]}')
  yield state
  if thread.is_alive():
    stop()


@pytest.fixture
def tiny_release(server, tmp_path, monkeypatch):
  """A published name `tiny-1` (the real code path, a small file) behind the local mirror."""
  (server.root / 'v1.0').mkdir()
  torch_layout.write_pth(server.root / FILE, {'model': _tiny_sd(), 'epoch': 299})
  count = sum(a.size for a in _tiny_sd().values())
  monkeypatch.setitem(published.PUBLISHED, 'tiny-1', published.Published(FILE, count, 50.0, 80.0))
  monkeypatch.setenv('HVT_JAX_CACHE', str(tmp_path / 'cache'))
  monkeypatch.setenv('HVT_JAX_WEIGHTS_URL', server.url + '/')
  return server


def _cache_files(tmp_path):
  root = tmp_path / 'cache'
  if not root.exists():
    return []
  return sorted(str(p.relative_to(root)) for p in root.rglob('*') if p.is_file())


def _same_params(a, b):
  pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b))
  return jax.tree.structure(a) == jax.tree.structure(b) and all(
      np.array_equal(np.asarray(x), np.asarray(y)) for x, y in pairs)


def test_table_agrees_with_the_model_variants():
  for name, entry in published.PUBLISHED.items():
    model = model_lib.HVT(**model_lib.variant(name))
    assert model_lib.param_count(model_lib.abstract_params(model)) == entry.params, name
  assert weights.url('hvt-s-1') == f'{published.RELEASE_URL}/v1.1/hvt_s_1.pth'


def test_download_then_cached_without_the_server(tiny_release, tmp_path):
  model, params = hvt_jax.load('tiny-1')
  expected_model, expected = convert.read(str(tiny_release.root / FILE))
  assert model == expected_model and _same_params(params, expected)
  cached = tmp_path / 'cache' / 'downloads' / 'v1.0' / 'tiny_1.pth'
  assert cached.read_bytes() == (tiny_release.root / FILE).read_bytes()
  sha = hashlib.sha256(cached.read_bytes()).hexdigest()
  assert json.loads((cached.parent / 'tiny_1.pth.json').read_text())['sha256'] == sha
  meta = loading.resolve(str(tmp_path / 'cache' / 'models' / 'tiny-1')).meta
  assert meta['sha256'] == sha and meta['source'] == f'{tiny_release.url}/{FILE}'
  assert not [f for f in _cache_files(tmp_path) if '.part' in f or '.tmp' in f]

  tiny_release.stop()
  model2, params2 = hvt_jax.load('tiny-1')  # offline now: the cache alone
  assert model2 == model and _same_params(params2, params)
  assert loading.resolve('tiny-1').meta['sha256'] == sha
  (tmp_path / 'tiny-1').mkdir()  # an existing path of that name wins over the published name
  with pytest.raises(model_dir.CheckpointError, match='holds no model dir'):
    loading.load(str(tmp_path / 'tiny-1'))


def test_truncated_download_keeps_nothing_and_a_retry_works(tiny_release, tmp_path):
  tiny_release.truncate.add(FILE)
  size = (tiny_release.root / FILE).stat().st_size
  with pytest.raises(weights.WeightsError, match=f'ended after {size // 2:,} of {size:,} bytes'):
    hvt_jax.load('tiny-1')
  assert _cache_files(tmp_path) == []
  tiny_release.truncate.clear()
  hvt_jax.load('tiny-1')
  assert 'downloads/v1.0/tiny_1.pth' in _cache_files(tmp_path)


@pytest.mark.parametrize('wrong', ['html_page', 'other_model'])
def test_wrong_file_at_the_url_is_refused(wrong, tiny_release, tmp_path):
  if wrong == 'html_page':
    (tiny_release.root / FILE).write_text('<html>rate limited</html>')
    message = "not tiny-1's published weights"
  else:  # a real checkpoint, but pooling twice: 128 x 15 more parameters
    torch_layout.write_pth(tiny_release.root / FILE, {'model': _tiny_sd(pooling=(0, 2))})
    message = 'holds a model of .* parameters, but tiny-1 has'
  with pytest.raises(weights.WeightsError, match=message):
    hvt_jax.load('tiny-1')
  assert _cache_files(tmp_path) == []


def test_changed_files_are_detected(tiny_release, tmp_path):
  hvt_jax.load('tiny-1')
  cached = tmp_path / 'cache' / 'downloads' / 'v1.0' / 'tiny_1.pth'
  original = cached.read_bytes()
  torch_layout.write_pth(cached, {'model': _tiny_sd(seed=1)})  # same shapes, other weights
  with pytest.raises(weights.WeightsError, match='changed since it was converted'):
    hvt_jax.load('tiny-1')
  cached.write_bytes(original)
  hvt_jax.load('tiny-1')  # the file that was converted: fine again

  # The release itself changes: a new download disagrees with the recorded sha256.
  torch_layout.write_pth(tiny_release.root / FILE, {'model': _tiny_sd(seed=1)})
  cached.unlink()
  shutil.rmtree(tmp_path / 'cache' / 'models')
  with pytest.raises(weights.WeightsError, match='changed since it was first downloaded'):
    hvt_jax.load('tiny-1')
  assert not cached.exists()


def test_a_corrupt_cached_model_dir_is_one_clear_error(tiny_release, tmp_path):
  hvt_jax.load('tiny-1')
  model_json = tmp_path / 'cache' / 'models' / 'tiny-1' / 'model.json'
  model_json.write_text('{"model": ')  # cut off mid-write
  cached = tmp_path / 'cache' / 'downloads' / 'v1.0' / 'tiny_1.pth'
  with pytest.raises(weights.WeightsError, match=f'{model_json} is corrupt .*; remove '
                     f'{model_json.parent} and it is converted again'):
    hvt_jax.load('tiny-1')
  assert cached.read_bytes() == (tiny_release.root / FILE).read_bytes()  # nothing lost
  shutil.rmtree(model_json.parent)  # as the message says
  tiny_release.stop()
  assert _same_params(hvt_jax.load('tiny-1')[1], convert.read(str(cached))[1])


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_no_server_is_one_line_naming_url_and_path(tmp_path):
  url = f'http://127.0.0.1:{_free_port()}'
  env = dict(HVT_JAX_CACHE=str(tmp_path / 'cache'), HVT_JAX_WEIGHTS_URL=url)
  result = helpers.run('export', '--model=hvt-ti-1', f'--output={tmp_path / "out"}', env=env)
  assert result.returncode != 0 and 'Traceback' not in result.stderr
  line = result.stderr.strip().splitlines()[-1]
  assert line.startswith(f'export: error: cannot download {url}/v1.0/hvt_ti_1.pth (')
  assert f'put the file at {tmp_path}/cache/downloads/v1.0/hvt_ti_1.pth by hand' in line
  assert not (tmp_path / 'cache' / 'downloads' / 'v1.0' / 'hvt_ti_1.pth').exists()


def test_published_name_end_to_end(server, tmp_path, monkeypatch):
  """The real table entry: an HVT-Ti-1-shaped file passes the published parameter count, then
  predict and export read the name from the cache with the server gone."""
  sd = torch_layout.random_state_dict(np.random.default_rng(0), width=192, depth=12, patch=16,
                                      image=224, classes=1000, pooling_blocks=[0], pooled_tokens=[97])
  (server.root / 'v1.0').mkdir()
  torch_layout.write_pth(server.root / 'v1.0' / 'hvt_ti_1.pth', {'model': sd})
  monkeypatch.setenv('HVT_JAX_CACHE', str(tmp_path / 'cache'))
  monkeypatch.setenv('HVT_JAX_WEIGHTS_URL', server.url)
  out = weights.fetch('hvt-ti-1')
  assert loading.resolve(out).meta['model'] == model_lib.variant('hvt-ti-1')
  server.stop()
  from PIL import Image
  Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / 'black.png')
  result = helpers.run('predict', '--model=hvt-ti-1', '--top=2', '--batch=1',
                       str(tmp_path / 'black.png'))
  assert result.returncode == 0, result.stderr
  assert len(result.stdout.strip().splitlines()) == 3 and '%' in result.stdout


def test_a_file_put_where_the_error_says_is_used(tiny_release, tmp_path, monkeypatch):
  monkeypatch.setenv('HVT_JAX_WEIGHTS_URL', f'http://127.0.0.1:{_free_port()}')
  with pytest.raises(weights.WeightsError, match='without network') as error:
    hvt_jax.load('tiny-1')
  where = str(error.value).split('put the file at ', 1)[1].split(' by hand')[0]
  os.makedirs(os.path.dirname(where), exist_ok=True)
  shutil.copy(tiny_release.root / FILE, where)
  model, params = hvt_jax.load('tiny-1')
  assert _same_params(params, convert.read(str(tiny_release.root / FILE))[1])
