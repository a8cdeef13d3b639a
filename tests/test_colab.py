"""hvt_jax.colab, the notebooks' runtime check: which jax extra a runtime needs, what of it is
missing, and the one line it prints. .ci/colab_check.sh runs it on a rebuilt Colab runtime."""
import importlib.metadata as metadata
import os
import subprocess
import sys

import pytest

from hvt_jax import colab

JAX = metadata.version('jax')
JAX_REQUIRES = metadata.requires('jax')  # this jax's own extras: cuda12, cuda13, tpu, ...
# jax-cuda12-plugin's unconditional pin on its PJRT half, as its wheel's metadata gives it.
PLUGIN_REQUIRES = lambda v: {'jax-cuda12-plugin': [
    f'jax-cuda12-pjrt=={v}',
    'nvidia-cublas-cu12>=12.1.3.1; sys_platform == "linux" and extra == "with-cuda"']}


def colab_runtime(plugin, pjrt=None):
  """Colab's GPU runtime after `pip install hvt_jax`: jax moved on, the plugin where it was."""
  return {'jax': JAX, 'jaxlib': JAX, 'jax-cuda12-plugin': plugin,
          'jax-cuda12-pjrt': pjrt or plugin, 'nvidia-cuda-runtime-cu12': '12.9.79'}


def test_the_extra_follows_the_plugin_then_the_hardware():
  assert colab.jax_extra(colab_runtime('0.7.2'), None, None) == 'cuda12'
  without_pip_cuda = {**colab_runtime('0.7.2'), 'nvidia-cuda-runtime-cu12': None}
  assert colab.jax_extra(without_pip_cuda, 'gpu', 12) == 'cuda12-local'  # the system's CUDA
  assert colab.jax_extra({'jax': JAX, 'libtpu': '0.0.20'}, None, None) == 'tpu'
  assert colab.jax_extra({'jax': JAX}, 'tpu', None) == 'tpu'
  assert colab.jax_extra({'jax': JAX}, 'gpu', 13) == 'cuda13-local'
  assert colab.jax_extra({'jax': JAX}, 'gpu', 12) == 'cuda12-local'
  assert colab.jax_extra({'jax': JAX}, None, None) is None  # a CPU runtime: nothing to match


def test_unmet_reads_jax_own_extras():
  old = colab_runtime('0.7.2')
  assert colab.unmet(JAX_REQUIRES, 'cuda12', old, PLUGIN_REQUIRES('0.7.2')) == [
      'jax-cuda12-plugin 0.7.2']
  # The plugin matched but its PJRT half left behind.
  half = colab_runtime(JAX, pjrt='0.7.2')
  assert colab.unmet(JAX_REQUIRES, 'cuda12', half, PLUGIN_REQUIRES(JAX)) == [
      'jax-cuda12-pjrt 0.7.2']
  matched = colab_runtime(JAX)
  assert colab.unmet(JAX_REQUIRES, 'cuda12', matched, PLUGIN_REQUIRES(JAX)) == []
  no_cuda13 = {**matched, 'jax-cuda13-plugin': None}
  assert colab.unmet(JAX_REQUIRES, 'cuda13', no_cuda13, {}) == ['jax-cuda13-plugin missing']
  assert colab.unmet(JAX_REQUIRES, 'tpu', {'jax': JAX, 'jaxlib': JAX, 'libtpu': '0.0.1'}, {}) == [
      'libtpu 0.0.1']


def test_verdict_is_one_line_saying_what_to_do():
  gpu = {'backend': 'gpu', 'devices': ['cuda:0']}
  cpu = {'backend': 'cpu', 'devices': ['TFRT_CPU_0']}
  ok, line = colab.verdict(JAX, 'gpu', gpu, expect_cpu=False)
  assert ok and line == f'jax {JAX} runs on 1 gpu device(s): cuda:0'
  ok, line = colab.verdict(JAX, 'gpu', cpu, expect_cpu=True)  # a GPU that jax did not get
  assert not ok and colab.RESTART in line and 'GPU' in line
  ok, line = colab.verdict(JAX, None, cpu, expect_cpu=False)
  assert not ok and colab.CHANGE_RUNTIME in line
  assert colab.verdict(JAX, None, cpu, expect_cpu=True)[0]
  broken = {'backend': None, 'devices': [], 'error': 'RuntimeError: plugin version mismatch'}
  ok, line = colab.verdict(JAX, 'gpu', broken, expect_cpu=False)
  assert not ok and 'plugin version mismatch' in line and colab.RESTART in line
  for _, line in [colab.verdict(JAX, d, g, e) for d in (None, 'gpu') for g in (gpu, cpu, broken)
                  for e in (False, True)]:
    assert '\n' not in line


@pytest.mark.skipif(colab.hardware() is not None, reason='this machine has a GPU or TPU')
@pytest.mark.parametrize('expect_cpu', [False, True])
def test_the_install_cell_command_on_a_cpu_machine(expect_cpu, tmp_path):
  """`python -m hvt_jax.colab` as the install cell runs it: no plugin here, so nothing to install,
  then jax started for real in a fresh process."""
  env = {k: v for k, v in os.environ.items() if k != 'HVT_COLAB_EXPECT_CPU'}
  if expect_cpu:
    env['HVT_COLAB_EXPECT_CPU'] = '1'
  result = subprocess.run([sys.executable, '-m', 'hvt_jax.colab'], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 1, result.stdout + result.stderr
  assert result.returncode == (0 if expect_cpu else 1), lines
  assert lines[0].startswith(f'jax {JAX} runs on the CPU')
  assert (colab.CHANGE_RUNTIME in lines[0]) != expect_cpu
