"""One HVT block's parts, forward + backward, in JAX and in PyTorch at the same shapes; and the
MLP's GEMMs alone. Where a train step's time goes, part by part, on CPU or GPU.

  python benchmarks/block_speed.py                     # batch 16 x 196 tokens, width 384, float32
  python benchmarks/block_speed.py --batch=256 --dtype=bfloat16   # GPU-sized

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

from hvt_jax.model import hvt

try:
  import torch
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import torch_hvt
except ImportError:
  torch = None


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
  args = parser.parse_args()
  b, n, width, heads = args.batch, args.tokens, 384, 6
  dtype = jnp.dtype(args.dtype)
  x = jax.random.normal(jax.random.key(0), (b, n, width), dtype)
  weight = jax.random.normal(jax.random.key(1), (b, n, width), dtype)
  gpu = jax.default_backend() == 'gpu'
  parts = {
      'attention': hvt.Attention(heads, width // heads, 0.0, 0.0, dtype,
                                 hvt.attention_implementation('auto', dtype, n)),
      'mlp': hvt.Mlp(4 * width, 0.0, dtype),
      'layernorm': hvt.layer_norm('norm', dtype),
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
  # The MLP's first layer as bare products: forward, input gradient, weight gradient.
  m, k, f = b * n, width, 4 * width
  a, w = x.reshape(m, k), jax.random.normal(jax.random.key(3), (k, f), dtype)
  dy = jax.random.normal(jax.random.key(4), (m, f), dtype)
  products = {'x @ w': (lambda a, w, dy: a @ w), 'dy @ w.T': (lambda a, w, dy: dy @ w.T),
              'x.T @ dy': (lambda a, w, dy: a.T @ dy)}
  if torch is not None:
    torch_args = [torch.tensor(np.asarray(t, np.float32), device=device, dtype=torch_dtype)
                  for t in (a, w, dy)]
  for name, product in products.items():
    fn = jax.jit(product)  # arguments, not closed-over constants, which XLA could fold away
    seconds = median_seconds(lambda: jax.block_until_ready(fn(a, w, dy)), args.repeats)
    row = f'{name:<10} jax {2 * m * k * f / seconds / 1e9:7.0f} GFLOP/s'
    if torch is not None:
      seconds = median_seconds(lambda: (product(*torch_args), sync()), args.repeats)
      row += f'   torch {2 * m * k * f / seconds / 1e9:7.0f} GFLOP/s'
    print(row)

if __name__ == '__main__':
  main()
