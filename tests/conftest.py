"""Fixtures for every test: per-worker datasets, a shared compile cache, the official fixture."""
import os

import pytest

from tests.helpers import REPO

FIXTURES = REPO.parent / 'shared' / 'fixtures'
# The tiny official-layout checkpoint and the official model's logits for it, carried in the repo so
# that every clone checks the converter against the official architecture.
TINY_FIXTURE = REPO / 'tests' / 'fixtures' / 'hvt_tiny_official_layout'


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
def tiny_official_fixture():
  """A full official training checkpoint (1 head x 64, depth 4, pooling every 2 blocks, 64x64
  images, 10 classes; random weights) and the official model's logits for three images."""
  return TINY_FIXTURE.with_suffix('.pth'), TINY_FIXTURE.with_suffix('.npz')


@pytest.fixture
def official_fixture():
  """The larger HVT-Ti-1 fixture, beside developer and CI checkouts only."""
  pth = FIXTURES / 'hvt_ti_1_official_layout.pth'
  npz = FIXTURES / 'hvt_ti_1_official_layout.npz'
  if not (pth.exists() and npz.exists()):
    pytest.skip(f'official-layout fixture not found at {FIXTURES} (only developer and CI '
                'checkouts have ../shared/fixtures)')
  return pth, npz
