"""Shared test settings: tiny models, and the official-layout fixture when it exists."""
import os
import pathlib
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests import their own helpers by name

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / 'shared' / 'fixtures'

# A 4-block HVT small enough to compile in a second: 64 tokens -> 31 (after block 0) -> 15 (after 2).
TINY = dict(image_size=32, patch_size=4, num_heads=2, head_dim=8, depth=4, pool_every=2,
            num_classes=5)


@pytest.fixture(scope='session', autouse=True)
def data_and_compile_cache(tmp_path_factory):
  """TFDS datasets built per test worker; compiled XLA programs shared by all test processes.

  Subprocesses (the CLIs under test) inherit both through the environment.
  """
  data = tmp_path_factory.mktemp('tfds')
  os.environ['TFDS_DATA_DIR'] = str(data)
  cache = tmp_path_factory.getbasetemp().parent / 'xla_cache'
  os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', str(cache))
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '1')
  yield data


@pytest.fixture
def official_fixture():
  pth = FIXTURES / 'hvt_ti_1_official_layout.pth'
  npz = FIXTURES / 'hvt_ti_1_official_layout.npz'
  if not (pth.exists() and npz.exists()):
    pytest.skip(f'official-layout fixture not found at {FIXTURES} (only developer and CI '
                'checkouts have ../shared/fixtures)')
  return pth, npz
