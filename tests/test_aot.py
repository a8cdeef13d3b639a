"""`python -m hvt_jax.aot`: the real train and eval steps compiled for a TPU slice, no TPU needed.

The compiling tests need libtpu. Installed in the test environment, JAX would load it in every
process of the suite on a machine without a TPU, and each would print libtpu's notices about
the TPU it cannot find (breaking the one-line checks of other tests); so CI keeps it outside
the environment and names its library in $HVT_TEST_LIBTPU, which only these tests hand to JAX.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from hvt_jax import model as model_lib
from hvt_jax.data import augment
from hvt_jax.training import aot
from tests import tiny_config

LIBTPU = os.environ.get('HVT_TEST_LIBTPU')
HAVE_LIBTPU = bool(LIBTPU) or importlib.util.find_spec('libtpu') is not None
needs_libtpu = pytest.mark.skipif(
    not HAVE_LIBTPU, reason="libtpu is not installed (pip install 'hvt_jax[tpu]', or set "
    'HVT_TEST_LIBTPU to a libtpu.so): it compiles for TPUs')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def libtpu(monkeypatch):
  if LIBTPU:
    monkeypatch.setenv('TPU_LIBRARY_PATH', LIBTPU)  # read when the TPU compiler is first loaded


def _tool(*args, env=None):
  return subprocess.run([sys.executable, '-m', 'hvt_jax.aot', *args], capture_output=True,
                        text=True, cwd=ROOT, env=env, timeout=300)


def _fsdp_shard(shape, n):
  """A leaf's shape on one chip of an `n`-way fsdp axis: large leaves split their largest
  dimension that `n` divides (hvt_jax/sharding.py), small ones stay whole."""
  if np.prod(shape) < 2 ** 14 or not any(d % n == 0 for d in shape):
    return tuple(shape)
  dim = max((d for d in range(len(shape)) if shape[d] % n == 0), key=lambda d: shape[d])
  return tuple(s // n if i == dim else s for i, s in enumerate(shape))


def _tiled(shape, itemsize):
  """Bytes of an array in TPU memory at most: its two minor dimensions padded to whole
  (8 x 32-bit rows, 128 lanes) tiles."""
  shape = (1,) * max(0, 2 - len(shape)) + tuple(shape)
  rows = 8 * 4 // itemsize
  return int(np.prod(shape[:-2])) * -(-shape[-2] // rows) * rows * -(-shape[-1] // 128) * 128 * itemsize


@needs_libtpu
def test_tiny_steps_on_a_data_by_fsdp_slice(libtpu):
  """On a v5e-4 as 2 (data) x 2 (fsdp): each chip holds half of every large parameter, EMA and
  Adam moment and a quarter of the batch; 'auto' settings follow the TPU, not this CPU."""
  config = tiny_config.get_config()
  # Wide enough (128) that the blocks' kernels are large enough to split.
  config.model.update(num_heads=4, head_dim=32, dtype='auto', scan_blocks='auto')
  config.mesh = (('data', 2), ('fsdp', 2))
  devices = aot.slice_devices('v5e:2x2')
  assert [d.device_kind for d in devices] == ['TPU v5 lite'] * 4
  train, evaluate = aot.compile_steps(config, devices)

  assert (train['dtype'], train['scan_blocks'], train['mesh']) == ('bfloat16', 'false',
                                                                  {'data': 2, 'fsdp': 2})
  assert jax.default_backend() == 'cpu'  # where the 'auto' settings would otherwise come from
  model = model_lib.HVT(**{**config.model, 'dtype': 'bfloat16', 'scan_blocks': False})
  leaves = [x.shape for x in jax.tree.leaves(model_lib.abstract_params(model))]
  assert train['params'] == sum(int(np.prod(s)) for s in leaves)
  shards = [_fsdp_shard(s, 2) for s in leaves]
  assert sum(map(np.prod, shards)) < 0.6 * train['params']  # the test splits most parameters
  copies = 4  # parameters, EMA (ema_decay > 0) and Adam's two moments, all float32
  assert config.ema_decay > 0
  b, s = config.batch_size // 4, config.model.image_size
  # On a TPU the host leaves the resize to the chips: a train batch holds (c, c) canvases
  # and each window's (height, width).
  c = augment.window_canvas(config.aug, s, 'tpu')
  assert c == 32 > s
  exact = copies * 4 * sum(map(np.prod, shards)) + b * (c * c * 3 + 4 + 3 * 4 + 1 + 2 * 4)
  padded = (copies * sum(_tiled(x, 4) for x in shards) + _tiled((b, c, c, 3), 1)
            + 2 * _tiled((b, 3), 4) + _tiled((b, 2), 4) + _tiled((b,), 1)
            + 8 * _tiled((1,), 4))  # + scalars
  unsplit = copies * 4 * train['params']
  assert padded < unsplit  # so the bounds below tell a split state from a whole one
  assert exact <= train['argument_bytes'] <= padded

  e = config.eval_batch_size // 4
  exact_eval = 4 * sum(map(np.prod, shards)) + e * (s * s * 3 + 4 + 4)
  padded_eval = sum(_tiled(x, 4) for x in shards) + _tiled((e, s, s, 3), 1) + 2 * _tiled((e,), 4)
  assert exact_eval <= evaluate['argument_bytes'] <= padded_eval

  for row in (train, evaluate):
    assert row['fits'] and 0 < row['total_gib'] < row['hbm_gib'] == 16
    assert row['total_gib'] >= row['arguments_gib'] + row['temporaries_gib']
    # FLOPs of a chip's share: the whole step does devices times as many
    assert row['flops_per_step'] == pytest.approx(4 * row['flops_per_chip'])
    assert row['flops_per_image'] == pytest.approx(row['flops_per_step'] / row['batch'])
  # Training costs about 3 forward passes (forward, two backward products) per image.
  assert 2 < train['flops_per_image'] / evaluate['flops_per_image'] < 5
  assert 'fits: ' in aot.report(train) and 'per chip' in aot.report(train)


def _linear(a: float, b: float, usable: float):
  """A probe whose step needs a + b * batch GiB, refused above `usable`."""
  seen = []

  def probe(batch):
    seen.append(batch)
    need = a + b * batch
    return {'batch': batch, 'fits': need <= usable, 'total_gib': need}
  return probe, seen


@pytest.mark.parametrize('a, b, start, unit', [
    (0.5, 0.0021, 1024, 8),   # HVT-S-like on a v5e-8
    (0.4, 0.004, 1024, 4),    # far from the start
    (0.5, 0.0021, 65536, 8),  # starting above the largest
])
def test_largest_batch_search(a, b, start, unit):
  """Within 1/16 of the true largest batch, in a handful of probes, all multiples of `unit`."""
  usable = 15.5  # the compiler's limit lies a little under the nominal 16 GiB
  probe, seen = _linear(a, b, usable)
  rows = aot.search_batch(probe, start=start, unit=unit, hbm=16)
  true = int((usable - a) / b) // unit * unit
  best = max(r['batch'] for r in rows if r['fits'])
  assert true * 15 / 16 <= best <= true
  assert all(batch % unit == 0 for batch in seen) and len(seen) == len(set(seen))
  assert len(seen) <= 8


def test_largest_batch_search_ends_when_memory_is_not_linear():
  """What HVT-S-1 on a v4-8 does: near the limit the compiler trades FLOPs for memory (the
  need stays flat), then refuses with a far larger figure. The search still closes, trying
  no batch twice (it once repeated 10416 forever, the bracket [10416, 11068) at 4 images)."""
  seen = []

  def probe(batch):
    seen.append(batch)
    need = 0.2 + 0.00283 * batch if batch <= 9800 else (29.04 if batch <= 10500 else 332.0)
    return {'batch': batch, 'fits': need <= 30.75, 'total_gib': need}
  rows = aot.search_batch(probe, start=2048, unit=4, hbm=32)
  best = max(r['batch'] for r in rows if r['fits'])
  assert 10500 * 15 / 16 <= best <= 10500
  assert len(seen) == len(set(seen)) and len(seen) <= 12


def test_largest_batch_search_when_nothing_fits():
  probe, seen = _linear(20, 0.001, 15.5)
  rows = aot.search_batch(probe, start=1024, unit=8, hbm=16)
  assert not any(r['fits'] for r in rows) and seen[-1] == 8


@needs_libtpu
def test_a_bad_topology_is_one_line(libtpu):
  env = {**os.environ, **({'TPU_LIBRARY_PATH': LIBTPU} if LIBTPU else {})}
  result = _tool('--config=tests/tiny_config.py', '--topology=v9:2x2', env=env)
  assert result.returncode != 0
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith('aot: error: --topology=v9:2x2: ') and 'v5e:2x4 (v5e-8)' in lines[0]


@pytest.mark.skipif(HAVE_LIBTPU, reason='libtpu is installed here')
def test_without_libtpu_one_line_says_what_to_install():
  result = _tool('--config=tests/tiny_config.py', '--topology=v5e:2x4')
  assert result.returncode != 0
  assert result.stderr.strip().splitlines() == [
      "aot: error: compiling for a TPU needs libtpu: pip install 'hvt_jax[tpu]'"]


def test_resolve_settings_follows_the_devices():
  cpu = jax.devices('cpu')
  fields = model_lib.resolve_settings(model_lib.variant('hvt-s-1', dtype='auto'), cpu)
  assert (fields['dtype'], fields['scan_blocks'], fields['attention']) == ('float32', 'true', 'xla')
  explicit = model_lib.variant('hvt-s-1', dtype='bfloat16', scan_blocks='false')
  fields = model_lib.resolve_settings(explicit, cpu)
  assert (fields['dtype'], fields['scan_blocks']) == ('bfloat16', 'false')
  with pytest.raises(model_lib.ConfigError, match='attention=cudnn needs an NVIDIA GPU'):
    model_lib.resolve_settings(model_lib.variant('hvt-s-1', attention='cudnn'), cpu)


@needs_libtpu
def test_resolve_settings_for_tpu_devices(libtpu):
  devices = aot.slice_devices('v5e:2x2')
  fields = model_lib.resolve_settings(model_lib.variant('hvt-s-1', dtype='auto'), devices)
  assert (fields['dtype'], fields['scan_blocks'], fields['attention']) == (
      'bfloat16', 'false', 'xla')


def test_the_compilers_out_of_memory_line():
  message = ('RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total '
             'memory required for HLO temporaries (15.83G) exceeds available HBM (15.75G). HLO '
             'module: jit_train_step.')
  assert aot.oom_amounts(message) == (pytest.approx(15.83), pytest.approx(15.75))
  assert aot.oom_amounts('Used 20.5G of 512.0M hbm') == (pytest.approx(20.5), pytest.approx(0.5))
  assert aot.oom_amounts('RESOURCE_EXHAUSTED: something else') == (None, None)
  row = {'fits': False, 'total_gib': 15.83, 'usable_gib': 15.75, 'hbm_gib': 16}
  assert aot._memory_words(row) == 'does not fit: needs 15.83 GiB of 15.75 GiB per chip'
