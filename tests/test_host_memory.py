import os
import subprocess
import sys
import textwrap

import pytest

from hvt_jax.training import host_memory


@pytest.mark.parametrize('environ, glibc, thp, expected', [
    ({}, (2, 36), 'madvise', host_memory.TUNABLE),
    ({}, (2, 35), 'madvise', host_memory.TUNABLE),
    ({}, (2, 34), 'madvise', None),  # no such tunable yet
    ({}, None, 'madvise', None),  # musl and other C libraries
    ({}, (2, 36), 'always', None),  # large blocks get huge pages already
    ({}, (2, 36), 'never', None),
    ({}, (2, 36), None, None),
    ({'GLIBC_TUNABLES': ''}, (2, 36), 'madvise', None),  # the user's choice, even empty, wins
    ({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}, (2, 36), 'madvise', None),
])
def test_restarts_only_where_huge_pages_help(environ, glibc, thp, expected):
  assert host_memory.tunables_to_set(environ, glibc, thp) == expected


SCRIPT = textwrap.dedent('''
    import os, sys
    print('started', flush=True)
    from hvt_jax.training import host_memory
    host_memory.relaunch_with_huge_pages()
    print('running with', repr(os.environ.get('GLIBC_TUNABLES')), sys.argv[1:])
''')


def _run(tmp_path, **env):
  script = tmp_path / 'prog.py'
  script.write_text(SCRIPT)
  environ = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
  return subprocess.run([sys.executable, '-u', str(script), '--flag=1', 'rest'], env={**environ, **env},
                        capture_output=True, text=True, check=True, cwd=os.getcwd()).stdout


def test_the_restart_keeps_the_interpreter_arguments_and_happens_once(tmp_path):
  if host_memory.tunables_to_set({}, host_memory._glibc_version(), host_memory._thp_mode()) is None:
    pytest.skip('this machine has no glibc 2.35+ with transparent huge pages in madvise mode')
  out = _run(tmp_path)
  assert out.count('started') == 2, out  # the program ran again from its start, once
  assert out.endswith(f"running with '{host_memory.TUNABLE}' ['--flag=1', 'rest']\n"), out


def test_a_users_tunables_mean_no_restart(tmp_path):
  out = _run(tmp_path, GLIBC_TUNABLES='')
  assert out == "started\nrunning with '' ['--flag=1', 'rest']\n"
