"""One HVT block's parts, forward + backward, in JAX and in PyTorch at the same shapes; and the
MLP's GEMMs alone. Where a train step's time goes, part by part, on CPU or GPU.

  python benchmarks/block_speed.py                     # batch 16 x 196 tokens, width 384, float32
  python benchmarks/block_speed.py --batch=256 --dtype=bfloat16   # GPU-sized
  python benchmarks/block_speed.py --parts=products    # only the bare matrix products

Each part is `jax.grad` of a fixed linear function of its output (no cheap-to-skip sum, no
expensive sin), against `torch.autograd` of the same; median of --repeats after 2 warm-ups.
PyTorch is optional (`pip install -r benchmarks/requirements.txt`).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from hvt_jax.model import layers, settings

try:
  import torch
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import torch_hvt
except ImportError:
  torch = None


PARTS = ('attention', 'mlp', 'layernorm', 'products')  # what --parts can choose


def median_seconds(fn, repeats: int) -> float:
  fn(), fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--tokens', type=int, default=196)
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  parser.add_argument('--repeats', type=int, default=7)
  parser.add_argument('--parts', default=','.join(PARTS),
                      help='comma-separated: which of the layers and the bare products to time')
  args = parser.parse_args()
  chosen = args.parts.split(',')
  unknown = set(chosen) - set(PARTS)
  if unknown:
    parser.error(f'--parts: unknown {", ".join(sorted(unknown))}; choose from {", ".join(PARTS)}.')
  b, n, width, heads = args.batch, args.tokens, 384, 6
  dtype = jnp.dtype(args.dtype)
  x = jax.random.normal(jax.random.key(0), (b, n, width), dtype)
  weight = jax.random.normal(jax.random.key(1), (b, n, width), dtype)
  gpu = jax.default_backend() == 'gpu'
  parts = {
      'attention': layers.Attention(heads, width // heads, 0.0, 0.0, dtype,
                                    settings.attention_implementation('auto', dtype, n)),
      'mlp': layers.Mlp(4 * width, 0.0, dtype),
      'layernorm': layers.layer_norm('norm', dtype),
  }
  if torch is not None:
    device = 'cuda' if gpu and torch.cuda.is_available() else 'cpu'
    if device == 'cpu':
      torch.set_num_threads(os.cpu_count())
    torch_dtype = torch_hvt.torch_dtype(args.dtype)
    tx = torch.tensor(np.asarray(x, np.float32), device=device, dtype=torch_dtype, requires_grad=True)
    tw = torch.tensor(np.asarray(weight, np.float32), device=device, dtype=torch_dtype)
    torch_parts = {
        'attention': torch_hvt.Attention(width, heads, 0.0),
        'mlp': torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.GELU(),
                                   torch.nn.Linear(4 * width, width)),
        'layernorm': torch.nn.LayerNorm(width, eps=1e-6),
    }
    sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
  print(f'jax {jax.__version__} on {jax.devices()[0].device_kind}'
        + (f', torch {torch.__version__}' if torch is not None else ', no torch')
        + f'; batch {b} x {n} tokens x {width}, {args.dtype}, forward + backward, median ms')
  for name, module in parts.items():
    if name not in chosen:
      continue
    extra = () if name == 'layernorm' else (False,)
    params = module.init(jax.random.key(2), x, *extra)['params']
    grad = jax.jit(jax.grad(
        lambda p, v, m=module, e=extra: jnp.sum(m.apply({'params': p}, v, *e) * weight), (0, 1)))
    row = f'{name:<10} jax {1e3 * median_seconds(lambda: jax.block_until_ready(grad(params, x)), args.repeats):7.1f}'
    if torch is not None:
      tm = torch_parts[name].to(device=device, dtype=torch_dtype)

      def step(tm=tm):
        tm.zero_grad(set_to_none=True)
        tx.grad = None
        (tm(tx) * tw).sum().backward()
        sync()

      row += f'   torch {1e3 * median_seconds(step, args.repeats):7.1f}'
    print(row)
  if 'products' not in chosen:
    return
  # Bare products. The MLP's first layer: forward, input gradient, weight gradient. Attention's
  # batched per-head products, q k^T and p v: XLA:CPU hands these to YNNPACK, which runs a
  # batched product on one thread (docs/performance.md).
  m, k, f = b * n, width, 4 * width
  a, w = x.reshape(m, k), jax.random.normal(jax.random.key(3), (k, f), dtype)
  dy = jax.random.normal(jax.random.key(4), (m, f), dtype)
  q = x.reshape(b, n, heads, width // heads).transpose(0, 2, 1, 3)
  p = jax.random.uniform(jax.random.key(5), (b, heads, n, n), dtype)
  gemm, per_head = 2 * m * k * f, 2 * b * heads * n * n * (width // heads)
  products = {'x @ w': (lambda a, w: a @ w, (a, w), gemm),
              'dy @ w.T': (lambda dy, w: dy @ w.T, (dy, w), gemm),
              'x.T @ dy': (lambda a, dy: a.T @ dy, (a, dy), gemm),
              'q @ k.T': (lambda q, k: q @ k.swapaxes(-1, -2), (q, q), per_head),
              'p @ v': (lambda p, v: p @ v, (p, q), per_head)}
  for name, (product, operands, flops) in products.items():
    fn = jax.jit(product)  # arguments, not closed-over constants, which XLA could fold away
    seconds = median_seconds(lambda: jax.block_until_ready(fn(*operands)), args.repeats)
    row = f'{name:<10} jax {flops / seconds / 1e9:7.0f} GFLOP/s'
    if torch is not None:
      torch_operands = [torch.tensor(np.asarray(t, np.float32), device=device, dtype=torch_dtype)
                        for t in operands]
      seconds = median_seconds(lambda: (product(*torch_operands), sync()), args.repeats)
      row += f'   torch {flops / seconds / 1e9:7.0f} GFLOP/s'
    print(row)

if __name__ == '__main__':
  main()
