"""The package's layers: which modules may import which, function-level imports included, and no
import cycle between hvt_jax modules.

Read from the source with `ast`, so an import hidden in a function body (where a cycle used to
hide) counts as much as one at the top of a file.
"""
from __future__ import annotations

import ast
import sys

from tests.helpers import REPO

PACKAGE = REPO / 'hvt_jax'
COMMANDS = ('main', 'convert', 'export', 'predict', 'prepare_data', 'summary', 'aot', 'colab')
_ABOVE_MODEL = ('hvt_jax.data', 'hvt_jax.training', 'hvt_jax.interop', 'hvt_jax.cli',
                'hvt_jax.console', 'hvt_jax.defaults', 'hvt_jax.loading', 'hvt_jax.model_dir',
                *(f'hvt_jax.{c}' for c in COMMANDS))
# module (or package, with its modules) -> what it must not import (modules or packages)
FORBIDDEN = {
    'hvt_jax.model': _ABOVE_MODEL,
    'hvt_jax.data': ('hvt_jax.training', 'hvt_jax.interop', 'hvt_jax.cli', 'hvt_jax.console',
                     'hvt_jax.defaults', 'hvt_jax.loading', 'hvt_jax.model_dir',
                     *(f'hvt_jax.{c}' for c in COMMANDS)),
    'hvt_jax.model_dir': ('hvt_jax.interop', 'hvt_jax.training', 'hvt_jax.data', 'hvt_jax.cli',
                          'hvt_jax.defaults', 'hvt_jax.loading',
                          *(f'hvt_jax.{c}' for c in COMMANDS)),
}
# Modules that import nothing but the standard library.
STDLIB_ONLY = ('hvt_jax.published', 'hvt_jax.errors')
# Modules whose top level must not load jax or TensorFlow: the commands import them before they
# set the native libraries' log levels, and the package root loads its names lazily.
NO_HEAVY_AT_TOP = ('hvt_jax', 'hvt_jax.cli')
HEAVY = ('jax', 'jaxlib', 'tensorflow', 'tensorflow_datasets', 'flax', 'optax', 'orbax', 'clu')


def module_sources() -> dict[str, str]:
  """Every module under hvt_jax/, by dotted name (a package by its own name), with its source."""
  sources = {}
  for path in sorted(PACKAGE.rglob('*.py')):
    parts = path.relative_to(REPO).with_suffix('').parts
    if parts[-1] == '__init__':
      parts = parts[:-1]
    sources['.'.join(parts)] = path.read_text()
  return sources


def _is_package(name: str, sources: dict[str, str]) -> bool:
  return any(other.startswith(name + '.') for other in sources)


def imports(name: str, source: str, modules, top_level_only: bool = False) -> set[str]:
  """The modules `name`'s source imports, anywhere in it (or at its top level only), as dotted
  names; `from P import X` counts as P.X when that is one of `modules`, else as P."""
  tree = ast.parse(source)
  if top_level_only:  # statements outside any function or class, `if` and `try` blocks included
    nodes, stack = [], list(tree.body)
    while stack:
      node = stack.pop()
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        continue
      nodes.append(node)
      stack.extend(ast.iter_child_nodes(node))
  else:
    nodes = list(ast.walk(tree))
  found = set()
  for node in nodes:
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:  # relative: from the module's package upwards
        package = name.split('.') if name in modules and _is_package(name, modules) else \
            name.split('.')[:-1]
        package = package[:len(package) - node.level + 1]
        base = '.'.join(package + ([base] if base else []))
      for alias in node.names:
        full = f'{base}.{alias.name}'
        found.add(full if full in modules else base)
  return found


def graph(sources: dict[str, str]) -> dict[str, set[str]]:
  """hvt_jax module -> the hvt_jax modules it imports (function-level imports included)."""
  return {name: {m for m in imports(name, src, sources) if m in sources and m != name}
          for name, src in sources.items()}


def _within(module: str, area: str) -> bool:
  return module == area or module.startswith(area + '.')


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
  """One cycle (as a path that returns to its start) per strongly connected group of modules."""
  index, low, stack, on_stack, groups = {}, {}, [], set(), []

  def connect(v):  # Tarjan's algorithm
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(edges.get(v, ())):
      if w not in index:
        connect(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      group = set()
      while True:
        w = stack.pop()
        on_stack.discard(w)
        group.add(w)
        if w == v:
          break
      if len(group) > 1:
        groups.append(group)

  for v in sorted(edges):
    if v not in index:
      connect(v)
  found = []
  for group in groups:  # a path through the group back to its first module
    start = min(group)
    path, seen = [start], {start}
    while True:
      step = min(w for w in edges[path[-1]] if w in group)
      if step == start or step in seen:
        found.append(path[path.index(step):] + [step])
        break
      path.append(step)
      seen.add(step)
  return found


def violations(sources: dict[str, str]) -> list[str]:
  """Every broken layer rule and every import cycle, one line each."""
  edges = graph(sources)
  problems = []
  for name, targets in sorted(edges.items()):
    for area, forbidden in FORBIDDEN.items():
      if _within(name, area):
        for target in sorted(targets):
          if any(_within(target, f) for f in forbidden):
            problems.append(f'{name} imports {target}')
  for name in STDLIB_ONLY:
    for target in sorted(imports(name, sources[name], sources)):
      if target.split('.')[0] not in sys.stdlib_module_names and target != '__future__':
        problems.append(f'{name} imports {target}, not the standard library')
  for name in NO_HEAVY_AT_TOP:
    for target in sorted(imports(name, sources[name], sources, top_level_only=True)):
      if target.split('.')[0] in HEAVY or (name == 'hvt_jax' and _within(target, 'hvt_jax')):
        problems.append(f'{name} imports {target} at its top level')
  problems += [f'import cycle: {" -> ".join(c)}' for c in cycles(edges)]
  return problems


def test_the_package_keeps_its_layers_and_has_no_import_cycle():
  sources = module_sources()
  assert {'hvt_jax.model_dir', 'hvt_jax.published', 'hvt_jax.loading', 'hvt_jax.model',
          'hvt_jax.training.checkpoint', 'hvt_jax.interop.weights'} <= set(sources)
  edges = graph(sources)
  # The scan sees what it must: the arrows the layers are made of.
  assert 'hvt_jax.model_dir' in edges['hvt_jax.training.checkpoint']
  assert {'hvt_jax.published', 'hvt_jax.model_dir'} <= edges['hvt_jax.interop.weights']
  assert violations(sources) == []


def test_a_planted_function_level_import_is_reported():
  sources = module_sources()
  planted = dict(sources, **{'hvt_jax.model.planted': (
      'def f():\n  from hvt_jax.training import checkpoint\n  return checkpoint\n')})
  assert violations(planted) == ['hvt_jax.model.planted imports hvt_jax.training.checkpoint']
  relative = dict(sources, **{'hvt_jax.data.planted': 'from ..interop import convert\n'})
  assert violations(relative) == ['hvt_jax.data.planted imports hvt_jax.interop.convert']


def test_a_planted_cycle_and_a_dependency_of_the_table_are_reported():
  sources = module_sources()
  cyclic = dict(sources)
  cyclic['hvt_jax.interop.convert'] += '\n\ndef _late():\n  from hvt_jax import loading\n'
  assert violations(cyclic) == [
      'import cycle: hvt_jax.interop.convert -> hvt_jax.loading -> hvt_jax.interop.weights -> '
      'hvt_jax.interop.convert']
  table = dict(sources)
  table['hvt_jax.published'] = 'import numpy as np\nfrom hvt_jax import errors\n'
  assert violations(table) == ['hvt_jax.published imports hvt_jax.errors, not the standard library',
                               'hvt_jax.published imports numpy, not the standard library']


def test_the_package_root_and_cli_load_no_heavy_library_at_import():
  sources = module_sources()
  eager = dict(sources, hvt_jax='from hvt_jax.loading import load\n')
  assert violations(eager) == ['hvt_jax imports hvt_jax.loading at its top level']
  heavy = dict(sources)
  heavy['hvt_jax.cli'] = 'import jax\n\ndef later():\n  import tensorflow\n'
  assert violations(heavy) == ['hvt_jax.cli imports jax at its top level']
