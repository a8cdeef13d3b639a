"""The device-dependent model settings: `dtype`, `scan_blocks` and `attention`, whose 'auto'
depends on the devices the model runs on.

`resolve(fields, device)` decides them once, for an explicit target device (`resolve_settings`
in `network.py` is the public entry): a model built from the answer asks JAX for no device when
it is traced, which a TPU step compiled on a CPU host needs. One exception: on a cuDNN-capable
GPU `attention` stays 'auto' (or 'cudnn'), because the choice is made per block from its token
count; the trace then checks the host's first device, and a GPU step is traced on its GPU host.

A model used unresolved (`create('hvt-s-1')`, then `apply`) decides each 'auto' when it is
traced, from JAX's default backend and devices on this host: the devices it will run on, unless
the step is compiled for others.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from hvt_jax.model.variants import ConfigError

ATTENTION = ('auto', 'xla', 'cudnn')


def _cudnn_usable(device, dtype) -> bool:
  capability = getattr(device, 'compute_capability', None)
  return (device.platform == 'gpu' and capability is not None and float(capability) >= 8.0
          and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16))


def _check_cudnn(setting: str, device, dtype) -> bool:
  """Whether cuDNN's attention can run on `device` in `dtype`; an explicit 'cudnn' that cannot
  raises ConfigError."""
  if setting not in ATTENTION:
    raise ConfigError(f'attention={setting!r}: choose one of {", ".join(ATTENTION)}.')
  usable = _cudnn_usable(device, dtype)
  if setting == 'cudnn' and not usable:
    raise ConfigError(f'attention=cudnn needs an NVIDIA GPU (compute capability 8.0+) and '
                      f'dtype bfloat16 or float16, not {device.device_kind} with {jnp.dtype(dtype).name}; '
                      "use attention='auto' or 'xla'.")
  return usable


def attention_implementation(setting: str, dtype, tokens: int) -> str:
  """How blocks of `tokens` tokens attend: 'xla', 'cudnn' or 'cudnn-padded'.

  cuDNN's fused attention needs an NVIDIA GPU of compute capability 8.0 or newer and 16-bit
  inputs. JAX refuses to train it on an odd token count (an H100 run hit this at HVT-S-1's 97
  tokens after the first pool): there 'auto' runs XLA's attention, and an explicit 'cudnn' pads
  one masked token ('cudnn-padded', see `attention.attend`). Everywhere else 'auto' is XLA's
  attention. Any setting but 'xla' checks the host's first device.
  """
  if setting == 'xla':
    return setting
  if not _check_cudnn(setting, jax.devices()[0], dtype):
    return 'xla'
  if tokens % 2 == 0:
    return 'cudnn'
  return 'cudnn-padded' if setting == 'cudnn' else 'xla'


def scans_blocks(setting: bool | str, platform: str | None = None) -> bool:
  """`model.scan_blocks`: True, False, or 'auto', which scans on CPU only.

  On CPU the scan trains faster and compiles faster (docs/performance.md); on a GPU unrolled blocks
  train faster, because the loop copies its carried and stacked buffers every iteration. Config
  files and the command line give strings ('auto', 'true', 'false'); `HVT(...)` also takes bools.
  `platform`: where the model runs ('cpu', 'gpu', 'tpu'); None: JAX's default backend.
  """
  value = str(setting).lower()
  if value not in ('auto', 'true', 'false'):
    raise ConfigError(f'scan_blocks={setting!r}: choose auto, true or false.')
  if value == 'auto':
    return (platform or jax.default_backend()) == 'cpu'
  return value == 'true'


def compute_dtype(setting: str, platform: str | None = None) -> jnp.dtype:
  """`model.dtype`: a dtype name, or 'auto' for bfloat16 on GPU and TPU and float32 on CPU
  (where bfloat16 arithmetic is emulated and slower). `platform` as for `scans_blocks`."""
  if setting == 'auto':
    on_accelerator = (platform or jax.default_backend()) in ('gpu', 'tpu')
    return jnp.dtype(jnp.bfloat16 if on_accelerator else jnp.float32)
  return jnp.dtype(setting)


def resolve(fields: Mapping[str, Any], device) -> dict[str, Any]:
  """Every field of `fields` (all of `HVT`'s), with `dtype`, `scan_blocks` and `attention`
  decided for `device`: a dtype name, 'true' or 'false', and 'xla' wherever cuDNN cannot run."""
  fields = dict(fields)
  fields['dtype'] = compute_dtype(fields['dtype'], device.platform).name
  fields['scan_blocks'] = str(scans_blocks(fields['scan_blocks'], device.platform)).lower()
  if fields['attention'] != 'xla' and not _check_cudnn(fields['attention'], device, fields['dtype']):
    fields['attention'] = 'xla'
  return fields
