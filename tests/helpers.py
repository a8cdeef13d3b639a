"""What many tests share: where the checkout is, a tiny model, and running the commands."""
import json
import os
import pathlib
import socket
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]

# A 4-block HVT small enough to compile in a second: 64 tokens -> 31 (after block 0) -> 15 (after 2).
TINY_MODEL = dict(image_size=32, patch_size=4, num_heads=2, head_dim=8, depth=4, pool_every=2,
                  num_classes=5)

# The training config the command-line runs use: the demo shrunk to seconds (see the file).
TINY_CONFIG = str(REPO / 'tests' / 'tiny_config.py')


def run(command, *args, check=False, timeout=300, env=None, wait=True):
  """Runs `python -m hvt_jax.<command> *args` from the repo root, as a user would.

  Returns the finished process (output captured as text); with `check`, a failure raises with the
  end of its stderr. With `wait=False`, returns the started process, stderr merged into stdout.
  `env` adds to the current environment.
  """
  cmd = [sys.executable, '-m', f'hvt_jax.{command}', *args]
  env = {**os.environ, **(env or {})}
  if not wait:
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
  result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
  if check and result.returncode != 0:
    raise AssertionError(f'{command} failed ({result.returncode}):\n{result.stderr[-3000:]}')
  return result


def run_main(workdir, *overrides, check=True, timeout=400, env=None, wait=True):
  """Trains with the tiny config in `workdir`; `overrides` are `--config.<key>=<value>` flags."""
  return run('main', f'--config={TINY_CONFIG}', f'--workdir={workdir}', *overrides, check=check,
             timeout=timeout, env=env, wait=wait)


def run_on_devices(script: str, devices: int = 8, timeout: int = 600) -> dict:
  """Runs Python `script` in a fresh process with `devices` simulated CPU devices and returns
  the JSON it prints after 'RESULT' (a process, since the device count is fixed at start-up)."""
  env = {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'}
  result = subprocess.run([sys.executable, '-c', script], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.split('RESULT', 1)[1])


def free_port() -> int:
  """A TCP port on 127.0.0.1 free now, for a local multi-process run's coordinator."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]
