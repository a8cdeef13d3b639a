"""What the benchmark tests share: running a script of benchmarks/ and loading one as a module."""
import importlib.util
import os
import subprocess
import sys

from tests.helpers import REPO


def run_benchmark(script: str, *args, timeout: int = 300, **env) -> subprocess.CompletedProcess:
  """`python benchmarks/<script> *args` from the repo root on the CPU; `env` adds variables."""
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS='cpu', **env)
  return subprocess.run([sys.executable, str(REPO / 'benchmarks' / script), *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=timeout)


def load_benchmark(name: str):
  """benchmarks/`name`.py as a module, to call its functions."""
  spec = importlib.util.spec_from_file_location(name, REPO / 'benchmarks' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def run_trace_breakdown(trace, *args, timeout: int = 60) -> subprocess.CompletedProcess:
  return run_benchmark('trace_breakdown.py', str(trace), *args, timeout=timeout)
