"""The Colab notebooks' runtime check: the second line of their install cell.

  !pip install -q git+https://github.com/hvt-jax/hvt_jax
  !python -m hvt_jax.colab

Installing hvt_jax moves jax and jaxlib to the versions it needs, but pip leaves the runtime's
accelerator plugin (Colab's GPU runtime ships jax-cuda12-plugin and jax-cuda12-pjrt at its own
jax's version, the TPU runtime libtpu) where it was, since nothing hvt_jax requires names it.
jax refuses a plugin built for another jaxlib, and then runs on the CPU without an error. So
this brings the plugin to what jax's own extra (`jax[cuda12]`, `jax[tpu]`, ...) asks for at the
installed jax version, then starts jax in a fresh process and prints one line: the devices it
got, or what to do.

It runs as its own process (`!python -m`), before the notebook's kernel imports jax: a process
that has imported jax keeps the jaxlib and plugin it loaded, whatever pip installs afterwards.
The exit status is 0 when jax got the accelerator, or runs on the CPU and
HVT_COLAB_EXPECT_CPU=1 says a CPU runtime is expected (CI, which has no GPU); 1 otherwise.
"""
from __future__ import annotations

import glob
import importlib.metadata as metadata
import json
import os
import re
import shutil
import subprocess
import sys

# Not a direct dependency: matplotlib and TensorFlow, which hvt_jax requires, require it.
from packaging.requirements import Requirement

# Where to switch the runtime, named as Colab's menu names it.
CHANGE_RUNTIME = 'Runtime > Change runtime type'
RESTART = 'Runtime > Restart session'
_PROBE = ('import json, jax; print(json.dumps({"backend": jax.default_backend(), '
          '"devices": [str(d) for d in jax.devices()]}))')


def version(name: str) -> str | None:
  try:
    return metadata.version(name)
  except metadata.PackageNotFoundError:
    return None


def hardware() -> str | None:
  """'tpu' or 'gpu' when the machine has one (whatever jax can use), else None."""
  if glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*') or os.environ.get(
      'TPU_ACCELERATOR_TYPE') or os.environ.get('COLAB_TPU_ADDR'):
    return 'tpu'
  if os.path.exists('/dev/nvidia0') or _nvidia_smi():
    return 'gpu'
  return None


def _nvidia_smi() -> str:
  """`nvidia-smi`'s report ('' without a working driver)."""
  if not shutil.which('nvidia-smi'):
    return ''
  try:
    result = subprocess.run(['nvidia-smi'], capture_output=True, text=True, timeout=60)
  except (OSError, subprocess.TimeoutExpired):
    return ''
  return result.stdout if result.returncode == 0 else ''


def jax_extra(installed: dict[str, str | None], device: str | None, driver_cuda: int | None,
              ) -> str | None:
  """The jax extra this runtime needs: the plugin it has, else the one its hardware takes.

  With pip's CUDA libraries installed (Colab's GPU runtime has them), `cuda12`/`cuda13` keeps
  using them and pip upgrades them only below the plugin's floors; without, the `-local` extra
  keeps the system's CUDA. A GPU without any plugin gets the CUDA major its driver reports.
  """
  if installed.get('libtpu') or device == 'tpu':
    return 'tpu'
  major = next((m for m in ('13', '12') if installed.get(f'jax-cuda{m}-plugin')), None)
  if major is None and device == 'gpu':
    major = '13' if (driver_cuda or 12) >= 13 else '12'
  if major is None:
    return None
  return f'cuda{major}' if installed.get(f'nvidia-cuda-runtime-cu{major}') else f'cuda{major}-local'


def unmet(jax_requires: list[str], extra: str, installed: dict[str, str | None],
          plugin_requires: dict[str, list[str]]) -> list[str]:
  """What jax[extra] asks for of the `installed` packages (jaxlib, the plugins, libtpu) that is
  not there at the right version, as 'name have'; the rest (requests, ...) is pip's business.

  A CUDA plugin's own pin on its PJRT half (jax-cuda12-pjrt==V) counts too.
  """
  wanted = [r for r in map(Requirement, jax_requires)
            if r.marker is not None and r.marker.evaluate({'extra': extra})]
  for r in list(wanted):
    wanted += [Requirement(p) for p in plugin_requires.get(r.name, [])
               if p.startswith('jax-') and 'extra ==' not in p]
  missing = []
  for r in wanted:
    if r.name not in installed:
      continue
    have = installed[r.name]
    if have is None or not r.specifier.contains(have, prereleases=True):
      missing.append(f'{r.name} {have or "missing"}')
  return missing


def probe() -> dict:
  """jax's backend and devices, from a fresh process (the plugins installed now)."""
  result = subprocess.run([sys.executable, '-c', _PROBE], capture_output=True, text=True,
                          timeout=600)
  if result.returncode != 0:
    last = (result.stderr.strip().splitlines() or ['no output'])[-1]
    return {'backend': None, 'devices': [], 'error': last}
  return json.loads(result.stdout.strip().splitlines()[-1])


def verdict(jax_version: str, device: str | None, got: dict, expect_cpu: bool) -> tuple[bool, str]:
  """(ok, the one line to print) for the devices jax got on this hardware."""
  backend, devices = got['backend'], got['devices']
  if backend in ('gpu', 'tpu', 'cuda', 'rocm'):
    return True, (f'jax {jax_version} runs on {len(devices)} {backend} device(s): '
                  f'{", ".join(devices)}')
  if got.get('error'):
    return False, (f'jax {jax_version} does not start ({got["error"]}): {RESTART}, then run this '
                   'cell again')
  if device:
    return False, (f'jax {jax_version} runs on the CPU although this runtime has a '
                   f'{device.upper()}: {RESTART}, then run this cell again')
  if expect_cpu:
    return True, f'jax {jax_version} runs on the CPU, as HVT_COLAB_EXPECT_CPU=1 expects'
  return False, (f'jax {jax_version} runs on the CPU (this runtime has no GPU or TPU): for one, '
                 f'{CHANGE_RUNTIME}, then run this cell again')


def _installed() -> dict[str, str | None]:
  names = ['jax', 'jaxlib', 'libtpu', 'nvidia-cuda-runtime-cu12', 'nvidia-cuda-runtime-cu13']
  for major in ('12', '13'):
    names += [f'jax-cuda{major}-plugin', f'jax-cuda{major}-pjrt']
  return {name: version(name) for name in names}


def _plugin_requires(installed: dict[str, str | None]) -> dict[str, list[str]]:
  return {name: metadata.requires(name) or [] for name in installed
          if name.endswith('-plugin') and installed[name]}


def main() -> int:
  installed = _installed()
  jax_version = installed['jax']  # installed with hvt_jax, which requires it
  device = hardware()
  cuda = re.search(r'CUDA Version: (\d+)', _nvidia_smi()) if device == 'gpu' else None
  extra = jax_extra(installed, device, int(cuda.group(1)) if cuda else None)
  if extra:
    missing = unmet(metadata.requires('jax') or [], extra, installed, _plugin_requires(installed))
    if missing:
      target = f'jax[{extra}]=={jax_version}'
      print(f'{", ".join(missing)} does not match jax {jax_version}: pip install {target}',
            flush=True)
      install = subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', target])
      if install.returncode != 0:
        print(f'pip could not install {target}: run this cell again')
        return 1
  ok, line = verdict(jax_version, device, probe(), os.environ.get('HVT_COLAB_EXPECT_CPU') == '1')
  print(line)
  return 0 if ok else 1


if __name__ == '__main__':
  from hvt_jax import cli
  cli.quiet_native_logs()  # inherited by the probe, whose last line of stderr is the one shown
  sys.exit(main())
