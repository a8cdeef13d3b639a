"""The PyTorch baseline of the speed benchmark: an HVT equal to the official one, and its train step.

Built from the same fields as `hvt_jax.model.HVT` (extra fields such as `attention` or `remat`
are ignored), with the official parameter names (`blocks.{i}.attn.qkv.weight`, ...), so an
official state dict loads as is and `state_dict_from_flax` maps hvt_jax parameters onto it.
Attention runs through `F.scaled_dot_product_attention` (PyTorch picks flash / memory-efficient
kernels on GPU). `TorchSide` is the baseline as `model_speed.py` times it. Optional: needs torch (benchmarks/requirements.txt); nothing in hvt_jax imports it.
"""
from __future__ import annotations

import gc
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _pools_at(block: int, pool_every: int) -> bool:
  # Same rule as hvt_jax.model.pools_at, restated so this file needs no JAX.
  return pool_every > 0 and block % pool_every == 0


class Attention(nn.Module):

  def __init__(self, width: int, num_heads: int, attention_dropout: float):
    super().__init__()
    self.num_heads, self.attention_dropout = num_heads, attention_dropout
    self.qkv = nn.Linear(width, 3 * width)
    self.proj = nn.Linear(width, width)

  def forward(self, x):
    b, n, width = x.shape
    # Features ordered [q, k, v] with heads contiguous: (3, B, heads, N, head_dim).
    q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    p = self.attention_dropout if self.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
    return self.proj(out.transpose(1, 2).reshape(b, n, width))


class Block(nn.Module):

  def __init__(self, width: int, num_heads: int, hidden: int, drop_path: float, dropout: float,
               attention_dropout: float, pool: tuple[int, int] | None, pooled_tokens: int):
    super().__init__()
    self.norm1 = nn.LayerNorm(width, eps=1e-6)
    self.attn = Attention(width, num_heads, attention_dropout)
    self.norm2 = nn.LayerNorm(width, eps=1e-6)
    self.mlp = nn.Sequential()
    self.mlp.add_module('fc1', nn.Linear(width, hidden))
    self.mlp.add_module('act', nn.GELU())  # exact (erf) GELU, as upstream
    self.mlp.add_module('drop1', nn.Dropout(dropout))
    self.mlp.add_module('fc2', nn.Linear(hidden, width))
    self.mlp.add_module('drop2', nn.Dropout(dropout))
    self.drop = nn.Dropout(dropout)
    self.drop_path, self.pool = drop_path, pool
    if pool is not None:
      self.pos_embed = nn.Parameter(torch.zeros(1, pooled_tokens, width))
      nn.init.trunc_normal_(self.pos_embed, std=0.02)

  def _drop_path(self, y):
    """Stochastic depth: the whole residual branch dropped per example, survivors rescaled."""
    if not self.training or self.drop_path == 0:
      return y
    keep = 1.0 - self.drop_path
    mask = y.new_empty((y.shape[0], 1, 1)).bernoulli_(keep)
    return y * mask / keep

  def forward(self, x):
    x = x + self._drop_path(self.drop(self.attn(self.norm1(x))))
    x = x + self._drop_path(self.mlp(self.norm2(x)))
    if self.pool is not None:
      kernel, stride = self.pool
      x = F.max_pool1d(x.transpose(1, 2), kernel, stride).transpose(1, 2) + self.pos_embed
    return x


class PatchEmbed(nn.Module):

  def __init__(self, patch: int, width: int):
    super().__init__()
    self.proj = nn.Conv2d(3, width, patch, stride=patch)

  def forward(self, images):
    return self.proj(images).flatten(2).transpose(1, 2)  # (B, N, width), row-major patches


class TorchHVT(nn.Module):
  """`TorchHVT(**hvt_fields)`: NCHW float images -> (B, num_classes) logits."""

  def __init__(self, *, image_size=224, patch_size=16, num_heads=6, head_dim=64, depth=12,
               mlp_ratio=4.0, pool_every=0, pool_kernel=3, pool_stride=2, num_classes=1000,
               class_token=False, drop_path=0.0, dropout=0.0, attention_dropout=0.0, **_):
    super().__init__()
    width = num_heads * head_dim
    self.class_token = class_token
    self.patch_embed = PatchEmbed(patch_size, width)
    n = (image_size // patch_size) ** 2 + int(class_token)
    if class_token:
      self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
      nn.init.trunc_normal_(self.cls_token, std=0.02)
    self.pos_embed = nn.Parameter(torch.zeros(1, n, width))
    nn.init.trunc_normal_(self.pos_embed, std=0.02)
    self.pos_drop = nn.Dropout(dropout)
    rates = np.linspace(0.0, drop_path, depth)
    blocks = []
    for i in range(depth):
      pool = (pool_kernel, pool_stride) if _pools_at(i, pool_every) else None
      if pool is not None:
        n = (n - pool_kernel) // pool_stride + 1
      blocks.append(Block(width, num_heads, int(width * mlp_ratio), float(rates[i]), dropout,
                          attention_dropout, pool, n))
    self.blocks = nn.Sequential(*blocks)
    self.norm = nn.LayerNorm(width, eps=1e-6)
    self.head = nn.Linear(width, num_classes)
    for m in self.modules():
      if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)

  def forward(self, images):
    x = self.patch_embed(images)
    if self.class_token:
      x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
    x = self.blocks(self.pos_drop(x + self.pos_embed))
    x = self.norm(x)
    return self.head(x[:, 0] if self.class_token else x.mean(dim=1))


def state_dict_from_flax(params) -> dict[str, torch.Tensor]:
  """hvt_jax parameters -> the official state dict (the inverse of hvt_jax.interop.convert.to_flax)."""
  out = {}

  def put(name, array, transpose=None):
    a = np.asarray(array, np.float32)
    out[name] = torch.tensor(a if transpose is None else a.transpose(transpose))

  def linear(name, p):
    put(f'{name}.weight', p['kernel'], (1, 0))
    put(f'{name}.bias', p['bias'])

  def norm(name, p):
    put(f'{name}.weight', p['scale'])
    put(f'{name}.bias', p['bias'])

  put('patch_embed.proj.weight', params['patch_embed']['kernel'], (3, 2, 0, 1))  # HWIO -> OIHW
  put('patch_embed.proj.bias', params['patch_embed']['bias'])
  put('pos_embed', params['pos_embed'])
  if 'cls_token' in params:
    put('cls_token', params['cls_token'])
  i = 0
  while f'blocks_{i}' in params:
    p, b = params[f'blocks_{i}'], f'blocks.{i}'
    norm(f'{b}.norm1', p['norm1'])
    norm(f'{b}.norm2', p['norm2'])
    linear(f'{b}.attn.qkv', p['attn']['qkv'])
    linear(f'{b}.attn.proj', p['attn']['proj'])
    linear(f'{b}.mlp.fc1', p['mlp']['fc1'])
    linear(f'{b}.mlp.fc2', p['mlp']['fc2'])
    if 'pos_embed' in p:
      put(f'{b}.pos_embed', p['pos_embed'])
    i += 1
  norm('norm', params['norm'])
  linear('head', params['head'])
  return out


def make_train_step(model: TorchHVT, *, lr: float, weight_decay: float, ema_decay: float,
                    num_classes: int, dtype: torch.dtype, compile_model: bool = False):
  """step(images, labels) -> loss: mixup with the reversed batch, soft-target cross-entropy,
  AdamW (no decay on 1-D parameters and position embeddings, as the recipe), then an EMA.

  The work the JAX step does (hvt_jax.training.train_step), in PyTorch's usual form: bf16 autocast
  when `dtype` is bfloat16, fused AdamW and foreach EMA on CUDA.
  """
  cuda = next(model.parameters()).is_cuda
  named = list(model.named_parameters())
  no_decay = [p for n, p in named if p.ndim <= 1 or 'pos_embed' in n or 'cls_token' in n]
  decay = [p for n, p in named if not (p.ndim <= 1 or 'pos_embed' in n or 'cls_token' in n)]
  opt = torch.optim.AdamW([{'params': decay, 'weight_decay': weight_decay},
                           {'params': no_decay, 'weight_decay': 0.0}], lr=lr, fused=cuda or None)
  params = [p for _, p in named]
  ema = [p.detach().clone() for p in params]
  forward = torch.compile(model) if compile_model else model
  device = 'cuda' if cuda else 'cpu'
  autocast = dtype == torch.bfloat16

  def step(images, labels):
    lam = 0.7  # a fixed mixing weight: the cost is what matters here
    with torch.no_grad():
      targets = F.one_hot(labels, num_classes).float() * 0.9 + 0.1 / num_classes
      images = lam * images + (1 - lam) * images.flip(0)
      targets = lam * targets + (1 - lam) * targets.flip(0)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
      logits = forward(images)
    loss = torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - ema_decay)
    return loss.detach()

  def predict(images):
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
      return forward(images)

  return step, predict


def torch_dtype(name: str) -> torch.dtype:
  return {'float32': torch.float32, 'bfloat16': torch.bfloat16}[name]



class TorchSide:
  """The PyTorch baseline at one batch and dtype, eager or under torch.compile, as a side of
  `timing.rounds`. `on_gpu`: the JAX side runs on a GPU, so this one takes CUDA too."""

  def __init__(self, fields: dict, batch: int, dtype: str, compiled: bool, on_gpu: bool):
    self.device = 'cuda' if torch.cuda.is_available() and on_gpu else 'cpu'
    if self.device == 'cpu':
      torch.set_num_threads(os.cpu_count())
    else:
      torch.set_float32_matmul_precision('high')  # TF32, as XLA's default precision on GPU
    self.kind = 'compiled' if compiled else 'eager'
    self.net = TorchHVT(**fields).to(self.device)
    self.step, self.predict = make_train_step(
        self.net, lr=1e-3, weight_decay=0.025, ema_decay=0.99996,
        num_classes=fields['num_classes'], dtype=torch_dtype(dtype), compile_model=compiled)
    size = fields['image_size']
    gen = torch.Generator().manual_seed(0)
    self.images = torch.randn(batch, 3, size, size, generator=gen).to(self.device)
    self.labels = torch.randint(0, fields['num_classes'], (batch,), generator=gen).to(self.device)
    start = time.perf_counter()
    for _ in range(2):  # warm-up; under torch.compile this compiles forward and backward
      self.sync(self.step(self.images, self.labels))
      self.sync(self.predict(self.images))
    self.warmup_s = time.perf_counter() - start

  def run_forward(self):
    return self.predict(self.images)

  def run_train(self):
    return self.step(self.images, self.labels)

  def sync(self, _):
    if self.device == 'cuda':
      torch.cuda.synchronize()

  def free(self):
    del self.net, self.step, self.predict, self.images, self.labels
    free_memory()


def free_memory():
  """Hands what PyTorch's CUDA allocator keeps cached back to the device, for JAX to use."""
  gc.collect()
  if torch.cuda.is_available():
    torch.cuda.empty_cache()
