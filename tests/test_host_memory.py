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
    host_memory.configure()
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


@pytest.mark.parametrize('environ, physical_mb, expected', [
    ({}, 24_000, {host_memory.POOL: 'true', 'TF_CPU_BFC_MEM_LIMIT_IN_MB': '24000'}),
    ({}, None, {host_memory.POOL: 'true'}),  # TensorFlow's own limit then
    ({'TF_CPU_BFC_MEM_LIMIT_IN_MB': '512'}, 24_000, {host_memory.POOL: 'true'}),
    ({host_memory.POOL: 'false'}, 24_000, {}),  # the user's choice wins
    ({host_memory.POOL: ''}, 24_000, {}),
])
def test_tensorflow_gets_a_pool_unless_the_user_chose(environ, physical_mb, expected):
  assert host_memory.pool_settings(environ, physical_mb) == expected


POOL_SCRIPT = textwrap.dedent('''
    from hvt_jax.training import host_memory
    host_memory.configure()
    import tensorflow as tf
    tf.zeros([512, 512]).numpy()
    try:  # only a pooling (BFC) allocator keeps these statistics
      print('pooled', tf.config.experimental.get_memory_info('CPU:0')['peak'] >= 512 * 512 * 4)
    except ValueError:
      print('not pooled')
''')


@pytest.mark.parametrize('user, expected', [(None, 'pooled True'), ('false', 'not pooled')])
def test_configure_pools_tensorflows_memory(tmp_path, user, expected):
  script = tmp_path / 'pool.py'
  script.write_text(POOL_SCRIPT)
  environ = {k: v for k, v in os.environ.items() if not k.startswith('TF_CPU_')}
  if user is not None:
    environ[host_memory.POOL] = user
  out = subprocess.run([sys.executable, str(script)], env=environ, capture_output=True, text=True,
                       check=True, cwd=os.getcwd()).stdout
  assert out.splitlines()[-1] == expected, out
