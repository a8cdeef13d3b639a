"""Workdirs that cannot be used, and disks that fill while saving: one line, nothing lost."""
import contextlib
import errno
import subprocess

import numpy as np
import pytest

from hvt_jax import loading
from hvt_jax.training import checkpoint, safety
from tests.helpers import run_main


@contextlib.contextmanager
def tmpfs(path, options):
  """A small filesystem at `path`, if this machine lets the test mount one (root in CI)."""
  path.mkdir(parents=True, exist_ok=True)
  mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', str(path)],
                           capture_output=True).returncode == 0
  if not mounted:
    pytest.skip('cannot mount a tmpfs here (needs root); the injected-error tests still run')
  try:
    yield path
  finally:
    subprocess.run(['umount', '-l', str(path)], check=False)


def test_a_file_as_workdir_is_one_line_before_any_work(tmp_path):
  (tmp_path / 'file').write_text('')
  result = run_main(tmp_path / 'file', check=False, timeout=300)
  assert result.returncode != 0 and 'Traceback' not in result.stderr
  lines = result.stderr.strip().splitlines()
  assert lines[-1] == (f'main: error: --workdir {tmp_path / "file"} is a file; pass a directory '
                       '(new or from an earlier run).')
  assert len(lines) <= 2 and 'Training' not in result.stderr  # at most the devices line before


def test_a_workdir_under_a_file_is_refused_and_nothing_is_created(tmp_path):
  (tmp_path / 'file').write_text('')
  with pytest.raises(safety.RunStopped, match=f'cannot be created: {tmp_path / "file"} is a file'):
    safety.check_workdir(str(tmp_path / 'file' / 'run'))
  safety.check_workdir(str(tmp_path / 'new' / 'run'))
  assert not (tmp_path / 'new').exists()


def test_a_read_only_workdir_is_refused(tmp_path):
  with tmpfs(tmp_path / 'ro', 'ro,size=64k') as ro:
    with pytest.raises(safety.RunStopped, match='is not writable .*Read-only file system'):
      safety.check_workdir(str(ro / 'run'))


def test_a_failed_write_names_the_last_complete_step(tmp_path):
  ckpt = tmp_path / 'checkpoints'
  for name in ('4', '8', '12.orbax-checkpoint-tmp'):  # 12 was being written when the disk filled
    (ckpt / name).mkdir(parents=True)
  with pytest.raises(safety.RunStopped, match=r'failed \(No space left on device\): the last '
                     r'complete checkpoint, step 8, is intact'):
    with safety.storage_errors(str(tmp_path), str(ckpt)):
      raise OSError(errno.ENOSPC, 'No space left on device')
  # As Orbax re-raises a TensorStore failure from its save thread.
  with pytest.raises(safety.RunStopped, match='No space left on device'):
    with safety.storage_errors(str(tmp_path), str(ckpt)):
      try:
        raise ValueError('RESOURCE_EXHAUSTED: Error writing local file "x": Failed to write 334 '
                         "bytes to file 5: No space left on device [os_error_code='28']")
      except ValueError as e:
        raise RuntimeError('Save Finalize thread failed.') from e
  # Out of device memory is not a disk problem: it keeps its traceback.
  with pytest.raises(ValueError, match='Out of memory'):
    with safety.storage_errors(str(tmp_path), str(ckpt)):
      raise ValueError('RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1GiB.')


def test_disk_full_while_saving_stops_in_one_line_and_keeps_the_last_checkpoint(tmp_path):
  # A tiny checkpoint takes about 1.1 MB: the step-4 save fits, the step-8 one does not.
  with tmpfs(tmp_path / 'disk', 'size=2m') as disk:
    result = run_main(disk / 'run', '--config.max_steps=12', check=False)
    assert result.returncode != 0 and 'Traceback' not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last == (f'main: error: writing to {disk / "run"} failed (No space left on device): '
                    'the last complete checkpoint, step 4, is intact; a rerun of the same command '
                    'resumes from it. Free some space (or fix the disk) first.'), last
    assert checkpoint.manager(str(disk / 'run'), read_only=True).all_steps() == [4]
    _, params = loading.load(str(disk / 'run'), sharding='cpu')
    assert all(np.isfinite(np.asarray(p)).all() for p in params['head'].values())
    subprocess.run(['mount', '-o', 'remount,size=16m', str(disk)], check=True)
    resumed = run_main(disk / 'run', '--config.max_steps=12')
    assert f'Resumed {disk / "run"} from step 4.' in resumed.stderr
    assert checkpoint.manager(str(disk / 'run'), read_only=True).latest_step() == 12
