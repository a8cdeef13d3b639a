"""The .pth reader against files that lie: every view must fit its storage, memory stays
bounded by the file's size, and a real torch.save file still reads exactly."""
import argparse
import zipfile

import numpy as np
import pytest

from hvt_jax.interop import pth_reader
from tests import torch_layout
from tests.helpers import run


def _storage(n=16):
  return np.arange(n, dtype=np.float32)


HOSTILE = {
    # name: (offset, shape, strides) over a 16-element storage, and what the error says
    'zero_strides': (0, (1 << 20, 1 << 20), (0, 0), 'claims shape'),
    'overlapping_strides': (0, (16, 16), (1, 1), 'claims shape'),
    'past_the_end': (8, (4, 4), (4, 1), 'reaches element'),
    'negative_offset': (-4, (4,), (1,), 'negative offset'),
    'negative_stride': (15, (16,), (-1,), 'negative'),
    'size_overflows_int64': (0, (1 << 62, 1 << 62, 4), (0, 0, 0), 'claims shape'),
    'mismatched_ranks': (0, (4, 4), (1,), 'strides'),
    'malformed_size': (0, ('4',), (1,), 'malformed'),
}


@pytest.mark.parametrize('case', sorted(HOSTILE))
def test_views_that_do_not_fit_their_storage_are_refused_by_name(case, tmp_path):
  offset, shape, strides, message = HOSTILE[case]
  path = tmp_path / 'bad.pth'
  torch_layout.write_pth(path, {'model': {'ok': _storage(),
                                          'blocks.0.w': torch_layout.View(_storage(), offset,
                                                                          shape, strides)}})
  with pytest.raises(pth_reader.PthError, match=message) as e:
    pth_reader.load(str(path))
  assert 'tensor model.blocks.0.w ' in str(e.value)


def test_fitting_views_read_like_numpy(tmp_path):
  s = _storage(24)
  views = {'t': torch_layout.View(s, 0, (4, 6), (1, 4)),  # transposed layout
           'tail': torch_layout.View(s, 20, (4,), (1,)),
           'scalar': torch_layout.View(s, 5, (), ()),
           'empty': torch_layout.View(s, 24, (0, 3), (3, 1)),
           'broadcast': torch_layout.View(s, 2, (3, 4), (0, 1))}  # zero stride, fits the storage
  torch_layout.write_pth(tmp_path / 'ok.pth', views)
  got = pth_reader.load(str(tmp_path / 'ok.pth'))
  np.testing.assert_array_equal(got['t'], s[:24].reshape(6, 4).T)
  np.testing.assert_array_equal(got['tail'], s[20:])
  assert got['scalar'].shape == () and got['scalar'] == 5
  assert got['empty'].shape == (0, 3)
  np.testing.assert_array_equal(got['broadcast'], np.tile(s[2:6], (3, 1)))


def test_many_views_of_one_storage_cannot_multiply_memory(tmp_path):
  s = _storage(1 << 16)
  # Each view fits; together they would copy the 256 kB storage 128 times (32 MB).
  torch_layout.write_pth(tmp_path / 'many.pth',
                         {f'w{i}': torch_layout.View(s, 0, s.shape, (1,)) for i in range(128)})
  with pytest.raises(pth_reader.PthError, match='many times over'):
    pth_reader.load(str(tmp_path / 'many.pth'))


def test_decompression_bomb_is_refused(tmp_path):
  path = tmp_path / 'bomb.pth'
  torch_layout.write_pth(path, {'w': _storage()})
  with zipfile.ZipFile(path, 'a', compression=zipfile.ZIP_DEFLATED) as z:
    with z.open('archive/data/bomb', 'w', force_zip64=True) as f:
      zeros = bytes(1 << 20)
      for _ in range(40):  # 40 MB of zeros deflate to about 40 kB
        f.write(zeros)
  assert path.stat().st_size < 1 << 20
  with pytest.raises(pth_reader.PthError, match='decompression bomb'):
    pth_reader.load(str(path))


def test_a_real_torch_checkpoint_with_shared_storage_still_reads(tmp_path):
  torch = pytest.importorskip('torch')
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  saved = {'model': {'w': base, 'wt': base.t(), 'row': base[2], 'step': torch.tensor(7),
                     'half': torch.ones(3, dtype=torch.float16)}, 'epoch': 3}
  torch.save(saved, tmp_path / 'real.pth')
  got = pth_reader.load(str(tmp_path / 'real.pth'))
  assert got['epoch'] == 3
  for name, tensor in saved['model'].items():
    np.testing.assert_array_equal(got['model'][name], tensor.numpy(), err_msg=name)
    assert got['model'][name].dtype == tensor.numpy().dtype


def test_a_full_official_training_checkpoint_reads(tiny_official_fixture):
  """Every part of the official release layout, the argparse Namespace of `args` included."""
  pth, _ = tiny_official_fixture
  ck = pth_reader.load(str(pth))
  assert set(ck) == {'model', 'optimizer', 'lr_scheduler', 'epoch', 'scaler', 'args'}
  assert isinstance(ck['args'], argparse.Namespace) and isinstance(ck['epoch'], int)
  sd = ck['model']
  assert sd['patch_embed.proj.weight'].shape == (64, 3, 16, 16)
  assert sd['blocks.0.pos_embed'].shape == (1, 7, 64) and sd['blocks.2.pos_embed'].shape == (1, 3, 64)
  assert sd['head.weight'].dtype == np.float32 and np.isfinite(sd['head.weight']).all()


def test_the_official_fixture_still_reads(official_fixture):
  pth, _ = official_fixture
  sd = pth_reader.load(str(pth))['model']
  assert sd['patch_embed.proj.weight'].shape == (192, 3, 16, 16)


def test_convert_cli_refuses_a_lying_file_in_one_line(tmp_path):
  path = tmp_path / 'bad.pth'
  torch_layout.write_pth(path, {'model': {'pos_embed': torch_layout.View(
      _storage(), 0, (1 << 20, 1 << 20), (0, 0))}})
  result = run('convert', f'--pytorch={path}', f'--output={tmp_path / "out"}')
  assert result.returncode != 0 and 'Traceback' not in result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('convert: error: tensor model.pos_embed claims shape'), last
  assert not (tmp_path / 'out').exists()
