"""Huge pages for the host memory of a training process (Linux with glibc).

XLA:CPU allocates a train step's temporary buffers as one block per execution, over a GB for
HVT-S-0 at batch 16. glibc serves a block that large with a fresh `mmap` and unmaps it when the
step ends, so every step faults its pages in again, 4 KiB at a time. With glibc's
`glibc.malloc.hugetlb=1` tunable, large blocks are mapped with transparent huge pages (2 MiB):
the faults all but vanish and the step gets faster (docs/performance.md has the figures).

glibc reads its tunables once, when a process starts, so `python -m hvt_jax.main` (and
`benchmarks/model_speed.py`) restart themselves once with it set. A user's own GLIBC_TUNABLES,
even an empty one, is left alone; so are systems where it cannot help.
"""
from __future__ import annotations

import os
import re
import sys

TUNABLE = 'glibc.malloc.hugetlb=1'
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


def relaunch_with_huge_pages() -> None:
  """Re-executes this program, same interpreter and arguments, with the tunable set; returns
  without doing anything where `tunables_to_set` says it would not help."""
  if not sys.platform.startswith('linux'):
    return
  tunables = tunables_to_set(os.environ, _glibc_version(), _thp_mode())
  if tunables is None:
    return
  os.environ['GLIBC_TUNABLES'] = tunables  # also what stops the restarted process restarting
  sys.stdout.flush()
  sys.stderr.flush()
  os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
