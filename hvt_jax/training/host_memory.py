"""Host memory of a training process: huge pages for XLA (Linux with glibc), a pool for TensorFlow.

XLA:CPU allocates a train step's temporary buffers as one block per execution, over a GB for
HVT-S-0 at batch 16. glibc serves a block that large with a fresh `mmap` and unmaps it when the
step ends, so every step faults its pages in again, 4 KiB at a time. With glibc's
`glibc.malloc.hugetlb=1` tunable, large blocks are mapped with transparent huge pages (2 MiB):
the faults all but vanish and the step gets faster (docs/performance.md has the figures).

glibc reads its tunables once, when a process starts, so `python -m hvt_jax.main` (and
`benchmarks/model_speed.py`) restart themselves once with it set. A user's own GLIBC_TUNABLES,
even an empty one, is left alone; so are systems where it cannot help.

TensorFlow's input pipeline allocates each batch afresh too: a batch of canvases is ~50 MB,
which glibc also maps afresh, so the kernel zeroes its pages before `padded_batch` fills them.
With `TF_CPU_ALLOCATOR_USE_BFC` TensorFlow keeps the memory it frees in a pool of its own and
serves the next batch from it; the train pipeline then costs ~7% less host CPU per image
(docs/performance.md, "Input"). The pool does not shrink: it holds the pipeline's peak.
"""
from __future__ import annotations

import os
import re
import sys

TUNABLE = 'glibc.malloc.hugetlb=1'
POOL = 'TF_CPU_ALLOCATOR_USE_BFC'
_POOL_LIMIT = 'TF_CPU_BFC_MEM_LIMIT_IN_MB'
_THP_MODE = '/sys/kernel/mm/transparent_hugepage/enabled'


def _glibc_version() -> tuple[int, int] | None:
  try:
    found = re.fullmatch(r'glibc (\d+)\.(\d+).*', os.confstr('CS_GNU_LIBC_VERSION') or '')
  except (ValueError, OSError, AttributeError):  # not glibc, or no confstr
    return None
  return (int(found[1]), int(found[2])) if found else None


def _thp_mode() -> str | None:
  """The bracketed choice in e.g. 'always [madvise] never', or None without THP."""
  try:
    with open(_THP_MODE) as f:
      found = re.search(r'\[(\w+)\]', f.read())
  except OSError:
    return None
  return found[1] if found else None


def tunables_to_set(environ, glibc: tuple[int, int] | None, thp_mode: str | None) -> str | None:
  """GLIBC_TUNABLES to restart with, or None to run as is.

  Only where it changes something: glibc 2.35 or newer (the first with the tunable), and
  transparent huge pages in 'madvise' mode (with 'always' large blocks get them already; with
  'never' nothing can). A GLIBC_TUNABLES already in the environment, even empty, wins.
  """
  if 'GLIBC_TUNABLES' in environ or glibc is None or glibc < (2, 35) or thp_mode != 'madvise':
    return None
  return TUNABLE


def pool_settings(environ, physical_mb: int | None) -> dict[str, str]:
  """Environment variables that give TensorFlow's CPU tensors a pool, or {} where the user has
  chosen (`POOL` set, to anything). The pool may grow to all of the machine's memory
  (`physical_mb`), where TensorFlow's own default would fail allocations past 64 GB."""
  if POOL in environ:
    return {}
  limit = {} if physical_mb is None or _POOL_LIMIT in environ else {_POOL_LIMIT: str(physical_mb)}
  return {POOL: 'true', **limit}


def _physical_mb() -> int | None:
  try:
    return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') // 2 ** 20
  except (ValueError, OSError, AttributeError):
    return None


def configure() -> None:
  """Sets up this process's host memory, first thing in a program: the pool for TensorFlow
  (read when TensorFlow first allocates a tensor, so before any TF op), then the restart with
  huge pages where `tunables_to_set` says it helps (glibc reads its tunables only at start)."""
  os.environ.update(pool_settings(os.environ, _physical_mb()))
  if not sys.platform.startswith('linux'):
    return
  tunables = tunables_to_set(os.environ, _glibc_version(), _thp_mode())
  if tunables is None:
    return
  os.environ['GLIBC_TUNABLES'] = tunables  # also what stops the restarted process restarting
  sys.stdout.flush()
  sys.stderr.flush()
  os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
