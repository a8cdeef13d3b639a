"""The device mesh and how arrays lie on it.

The config names the mesh axes, e.g. `(('data', -1),)` or
`(('data', -1), ('fsdp', 4))` (-1: all remaining devices). The batch is split
over every axis; parameters are replicated, or with an `fsdp` axis, split along
their largest divisible dimension.
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from hvt_jax.errors import UserError


class MeshError(UserError):
  pass


def make_mesh(axes: Sequence[tuple[str, int]], devices=None) -> jax.sharding.Mesh:
  devices = list(jax.devices() if devices is None else devices)
  names = [name for name, _ in axes]
  sizes = [int(size) for _, size in axes]
  if sizes.count(-1) > 1:
    raise MeshError(f'mesh {tuple(axes)}: at most one axis may have size -1.')
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise MeshError(f'mesh {tuple(axes)}: {len(devices)} devices do not divide into axes of {known}.')
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise MeshError(f'mesh {tuple(axes)} needs {int(np.prod(sizes))} devices but there are '
                    f'{len(devices)}; use -1 for one axis to take the rest.')
  # Auto axes: XLA propagates shardings from the inputs (GSPMD), so model code needs no
  # sharding annotations; jax.make_mesh would otherwise default to Explicit axes.
  auto = (jax.sharding.AxisType.Auto,) * len(names)
  return jax.make_mesh(sizes, names, axis_types=auto, devices=devices)


def batch_spec(mesh: jax.sharding.Mesh) -> jax.P:
  """Leading (batch) dimension over every mesh axis."""
  return jax.P(tuple(mesh.axis_names))


def batch_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, batch_spec(mesh))


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, jax.P())


def param_spec(shape: Sequence[int], mesh: jax.sharding.Mesh, axis: str = 'fsdp',
               min_size: int = 2 ** 14) -> jax.P:
  """FSDP: split the largest dimension the `axis` size divides; small arrays stay whole."""
  if axis not in mesh.axis_names or mesh.shape[axis] == 1 or int(np.prod(shape)) < min_size:
    return jax.P()
  n = mesh.shape[axis]
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % n == 0:
      spec = [None] * len(shape)
      spec[dim] = axis
      return jax.P(*spec)
  return jax.P()
