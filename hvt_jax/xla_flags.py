"""XLA:CPU flags this project sets for itself, measured on its train step (README, Speed).

XLA reads $XLA_FLAGS once, when JAX starts its first backend, so `use_cpu_flags()` runs when
`hvt_jax` is imported. It only appends: a flag the user already put in $XLA_FLAGS wins, and
nothing is added where JAX may pick a GPU or TPU (a JAX plugin is installed, or $JAX_PLATFORMS
names another platform first), nor for a jaxlib these flags were not measured on (XLA aborts on a
flag it does not know). HVT_JAX_NO_XLA_FLAGS=1 turns it off.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os

# Each one measured on the whole HVT-S-1 / S-0 train step, batch 16, float32 (README, Speed).
CPU_FLAGS = {
    '--xla_cpu_experimental_xnn_graph_fusion_mode': 'XNN_GRAPH_FUSION_MODE_GREEDY',
}
MEASURED_JAXLIB = ('0.10.',)  # versions whose XLA knows every flag above


def _will_run_on_cpu() -> bool:
  platforms = os.environ.get('JAX_PLATFORMS', '').strip()
  if platforms:
    return platforms.split(',')[0].strip().lower() == 'cpu'
  plugins = importlib.metadata.entry_points(group='jax_plugins')
  if len(plugins):
    return False
  # Accelerator plugins that register by namespace package, and TPU's runtime.
  return not any(importlib.util.find_spec(name) for name in ('jax_plugins', 'libtpu'))


def _jaxlib_version() -> str:
  try:
    return importlib.metadata.version('jaxlib')
  except importlib.metadata.PackageNotFoundError:
    return ''


def missing_flags(current: str) -> list[str]:
  """The project's flags that `current` (an XLA_FLAGS string) does not set already."""
  given = {item.split('=', 1)[0] for item in current.split()}
  return [f'{name}={value}' for name, value in CPU_FLAGS.items() if name not in given]


def use_cpu_flags() -> list[str]:
  """Appends the missing project flags to $XLA_FLAGS when JAX will run on the CPU; returns them."""
  if os.environ.get('HVT_JAX_NO_XLA_FLAGS') or not _will_run_on_cpu():
    return []
  if not _jaxlib_version().startswith(MEASURED_JAXLIB):
    return []
  current = os.environ.get('XLA_FLAGS', '')
  added = missing_flags(current)
  if added:
    os.environ['XLA_FLAGS'] = ' '.join([current] + added).strip()
  return added
