"""Fixtures for every test: per-worker datasets, a shared compile cache, the official fixture."""
import os

import pytest

from tests.helpers import REPO

FIXTURES = REPO.parent / 'shared' / 'fixtures'


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
