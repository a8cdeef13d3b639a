"""Parameters, GMACs and tokens per stage of HVT models.

  python -m hvt_jax.summary                                  # every published model
  python -m hvt_jax.summary --model=hvt-s-2 --xla            # one model, plus XLA's count
  python -m hvt_jax.summary --config=configs/hvt_s.py:stages=2

"GMACs" follow the paper's convention (docs/architecture.md): multiply-accumulates per
image as ptflops 0.6.4 counts them with an attention hook: the patch conv and
every Linear (a Linear's bias adds its output width once, the conv's bias once per
output element), q·kᵀ and attn·v, and each max-pool's input size. LayerNorm,
GELU, softmax and residual adds are not counted. XLA's cost analysis counts every
floating-point operation (a multiply-add is 2) of the compiled forward pass.
"""
from __future__ import annotations

from hvt_jax import cli

if __name__ == '__main__':
  cli.quiet_native_logs()  # before jax, imported below, reads its log settings

import itertools

from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags

from hvt_jax import model as model_lib
from hvt_jax import published

PUBLISHED = tuple(published.PUBLISHED)  # the models with released weights


def macs(model: model_lib.HVT) -> int:
  """Per-image multiply-accumulates in the paper's counting convention."""
  width = model.num_heads * model.head_dim
  hidden = int(width * model.mlp_ratio)
  patches = (model.image_size // model.patch_size) ** 2
  total = patches * width * 3 * model.patch_size ** 2 + patches * width  # conv + its bias
  counts = model.tokens_per_block()
  for i, n in enumerate(counts[:-1]):
    linear = n * width * (4 * width + 2 * hidden)  # qkv, proj, fc1, fc2
    bias = 3 * width + width + hidden + width
    attention = 2 * n * n * width  # q·kᵀ and attn·v
    pool = n * width if model_lib.pools_at(i, model.pool_every) else 0
    total += linear + bias + attention + pool
  return total + width * model.num_classes + model.num_classes


def xla_flops(model: model_lib.HVT, params=None) -> float:
  """FLOPs of one image's forward pass as XLA's cost analysis of the compiled program sees it."""
  model = model.clone(scan_blocks=False)  # the cost analysis counts a loop's body once
  if params is None:
    params = model_lib.abstract_params(model)
  images = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, 3), jnp.float32)
  compiled = jax.jit(lambda p, x: model.apply({'params': p}, x)).lower(params, images).compile()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax returns one dict per device
    cost = cost[0]
  return float(cost['flops'])


def tokens_per_stage(model: model_lib.HVT) -> list[tuple[int, int]]:
  """(tokens, number of blocks) for each run of blocks that see the same token count."""
  counts = model.tokens_per_block()[:-1]
  return [(n, len(list(group))) for n, group in itertools.groupby(counts)]


def describe(name: str, model: model_lib.HVT, with_xla: bool) -> dict:
  params = model_lib.abstract_params(model)
  row = {
      'model': name,
      'params': model_lib.param_count(params),
      'gmacs': macs(model) / 1e9,
      'stages': ' -> '.join(f'{n}x{blocks}' for n, blocks in tokens_per_stage(model)),
  }
  if with_xla:
    row['xla_gflops'] = xla_flops(model, params) / 1e9
  return row


def format_table(rows: list[dict]) -> str:
  header = f'{"model":<12} {"params":>12} {"GMACs":>7}'
  if 'xla_gflops' in rows[0]:
    header += f' {"XLA GFLOPs":>11}'
  lines = [header + '  tokens x blocks per stage']
  for r in rows:
    line = f'{r["model"]:<12} {r["params"]:>12,} {r["gmacs"]:>7.2f}'
    if 'xla_gflops' in r:
      line += f' {r["xla_gflops"]:>11.2f}'
    lines.append(line + f'  {r["stages"]}')
  return '\n'.join(lines)


FLAGS = flags.FLAGS


def define_flags() -> None:
  """Only when run as a program: importing the module defines no flags."""
  flags.DEFINE_list('model', list(PUBLISHED), 'published model names (see hvt_jax.model.VARIANTS)')
  flags.DEFINE_bool('xla', False, 'also compile each model and print XLA cost-analysis GFLOPs')
  config_flags.DEFINE_config_file('config', None, 'training config; summarizes its config.model')


def main(argv):
  del argv
  config = cli.config()
  if config is not None:
    models = [('config', model_lib.create(dict(config.model)))]
  else:
    models = [(name, model_lib.create(name)) for name in FLAGS.model]
  print(format_table([describe(name, m, FLAGS.xla) for name, m in models]))


if __name__ == '__main__':
  define_flags()
  cli.run(main)
