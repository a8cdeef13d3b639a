"""What ends a run with one line instead of a traceback, without losing saved work.

An unusable workdir is refused before anything is compiled. A disk that fills (or turns
read-only) while saving stops the run; Orbax writes each step into a temporary directory
and renames it only when complete, so the previous checkpoint stays the latest one. A run
whose loss or gradients stop being finite is stopped before it saves or logs that state,
so the latest checkpoint is always a good one to resume from.
"""
from __future__ import annotations

import contextlib
import errno
import os
import tempfile

import jax
import jax.numpy as jnp

from hvt_jax.errors import UserError


class RunStopped(UserError):
  """The run cannot go on; the message says what is kept and how to resume."""


def check_workdir(workdir: str) -> None:
  """Raises RunStopped, in one line, unless `workdir` is or can become a writable directory.

  Creates nothing: a probe file in the workdir or its nearest existing parent tells, where
  `os.access` would not (root passes it on read-only mounts).
  """
  if '://' in workdir:  # cloud storage: no local probe; Orbax reports its own errors
    return
  path = existing = os.path.abspath(workdir)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    where = 'is a file' if existing == path else f'cannot be created: {existing} is a file'
    raise RunStopped(f'--workdir {workdir} {where}; pass a directory (new or from an earlier '
                     'run).')
  try:
    with tempfile.TemporaryFile(dir=existing):
      pass
  except OSError as e:
    raise RunStopped(f'--workdir {workdir} is not writable ({existing}: {e.strerror}); pass a '
                     'directory you can write to.') from None


# Orbax reports failed writes from TensorStore as ValueError with the OS reason in the text.
_STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES)
_STORAGE_TEXTS = ('No space left on device', 'Disk quota exceeded', 'Read-only file system')


def storage_reason(error: BaseException | None) -> str | None:
  """Why a write failed, if `error` (or what caused it) is the storage failing; else None."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in _STORAGE_ERRNOS:
      return error.strerror
    for reason in _STORAGE_TEXTS:
      if reason in str(error):
        return reason
    error = error.__cause__ or error.__context__
  return None


def last_complete_step(checkpoints_dir: str) -> int | None:
  """The newest step directory Orbax finished: unfinished ones still carry a temporary name."""
  try:
    steps = [int(n) for n in os.listdir(checkpoints_dir) if n.isdigit()]
  except OSError:
    return None
  return max(steps, default=None)


@contextlib.contextmanager
def storage_errors(workdir: str, checkpoints_dir: str):
  """Turns a failing disk, wherever it shows (a save, the wait for one, a metrics write),
  into RunStopped naming the step a rerun resumes from."""
  try:
    yield
  except UserError:
    raise  # already one line that says what to do
  except Exception as e:  # Orbax raises from its save threads with many types
    reason = storage_reason(e)
    if reason is None:
      raise
    step = last_complete_step(checkpoints_dir)
    resume = (f'the last complete checkpoint, step {step}, is intact; a rerun of the same command '
              'resumes from it' if step is not None else 'no checkpoint was completed; a rerun '
              'starts over')
    raise RunStopped(f'writing to {workdir} failed ({reason}): {resume}. Free some space (or '
                     'fix the disk) first.') from None


@jax.jit
def track_finite(finite, first_bad, ok, step):
  """(all steps so far finite, the first step that was not), kept on device: no step waits."""
  return finite & ok, jnp.where(finite & ~ok, step, first_bad)


def diverged(first_bad: int, step: int, last_good: int | None, workdir: str) -> str:
  where = (f'the last good checkpoint is step {last_good}, which a rerun of the same command '
           'resumes from' if last_good is not None else 'no checkpoint was saved before it')
  return (f'the loss or gradients became non-finite (NaN/inf) at step {first_bad}; stopped at '
          f'step {step} without saving. In {workdir}, {where}. Lower --config.optim.lr or set '
          '--config.optim.grad_clip in a new --workdir (--config.init_from can start it from '
          'the last good checkpoint), or rerun with --config.skip_nonfinite=True to skip such '
          'updates.')
