"""The speed benchmark's pieces: what a bare GPU box can import, and the PyTorch baseline's parity."""
import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from hvt_jax import model as model_lib
from hvt_jax.interop import convert
from tests import torch_layout
from tests.bench_helpers import load_benchmark, run_benchmark, run_trace_breakdown
from tests.helpers import REPO, TINY_MODEL

# What a GPU machine with only jax/flax/optax/orbax/torch lacks (benchmarks/gpu_check.sh).
_ABSENT = ['tensorflow', 'tensorflow_datasets', 'ml_collections', 'clu']
_BLOCK = f'import sys; sys.modules.update(dict.fromkeys({_ABSENT!r}, None)); '


def _run_blocked(code: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-c', _BLOCK + code], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def test_model_and_train_step_import_without_tensorflow_or_ml_collections():
  mods = ['hvt_jax', 'hvt_jax.model', 'hvt_jax.training.train_step', 'hvt_jax.training.optim',
          'hvt_jax.sharding', 'hvt_jax.data.mixup', 'hvt_jax.training.checkpoint',
          'hvt_jax.loading', 'hvt_jax.model_dir', 'hvt_jax.data.feeding']
  code = ''.join(f'import {m}; ' for m in mods)
  code += f'bad = sorted(m for m in {_ABSENT!r} if sys.modules.get(m) is not None); print(bad)'
  out = _run_blocked(code)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == '[]'


def test_blocking_really_blocks():
  # The check above is only worth something if a blocked import fails.
  out = _run_blocked('import ml_collections')
  assert out.returncode != 0 and 'ml_collections' in out.stderr


try:
  import torch
  sys.path.insert(0, str(REPO / 'benchmarks'))
  import torch_hvt
except ImportError:
  torch = None
needs_torch = pytest.mark.skipif(
    torch is None, reason='the PyTorch baseline needs torch (pip install -r '
    'benchmarks/requirements.txt); CI does not install it')


@needs_torch
@pytest.mark.parametrize('fields', [
    dict(TINY_MODEL),
    dict(TINY_MODEL, pool_every=0, class_token=True, depth=2),
], ids=['hvt', 'deit'])
def test_torch_baseline_matches_jax_model_on_official_weights(fields):
  model = model_lib.create('hvt-s-1', **fields)
  counts = model.tokens_per_block()
  pooling = [i for i in range(model.depth) if model_lib.pools_at(i, model.pool_every)]
  sd = torch_layout.random_state_dict(
      np.random.default_rng(0), width=model.num_heads * model.head_dim, depth=model.depth,
      patch=model.patch_size, image=model.image_size, classes=model.num_classes,
      pooling_blocks=pooling, pooled_tokens=[counts[i + 1] for i in pooling],
      class_token=model.class_token)
  images = np.random.default_rng(1).normal(size=(3, model.image_size, model.image_size, 3))
  images = images.astype(np.float32)

  net = torch_hvt.TorchHVT(**model.config()).eval()
  net.load_state_dict({k: torch.tensor(v) for k, v in sd.items()}, strict=True)
  with torch.no_grad():
    got = net(torch.tensor(images.transpose(0, 3, 1, 2))).numpy()
  params = convert.to_flax(sd, model.config())
  want = np.asarray(model.apply({'params': params}, images))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

  # And back: hvt_jax parameters give the official state dict.
  back = torch_hvt.state_dict_from_flax(jax.tree.map(np.asarray, params))
  assert sorted(back) == sorted(sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(back[k].numpy(), v, err_msg=k)


@needs_torch
def test_torch_train_step_learns():
  model = model_lib.create('hvt-s-1', **TINY_MODEL)
  net = torch_hvt.TorchHVT(**model.config())
  step, predict = torch_hvt.make_train_step(net, lr=1e-3, weight_decay=0.05, ema_decay=0.9,
                                            num_classes=model.num_classes, dtype=torch.float32)
  images = torch.randn(4, 3, model.image_size, model.image_size)
  labels = torch.tensor([0, 1, 2, 3])
  first = float(step(images, labels))
  for _ in range(5):
    last = float(step(images, labels))
  assert last < first
  assert predict(images).shape == (4, model.num_classes)


# Makes the installed copies of these modules unimportable, as on a GPU box that lacks them; a copy
# elsewhere (gpu_check.sh's unpacked ml_collections wheel) still imports.
_SITECUSTOMIZE = f'''
import importlib.machinery, sys
class _PathFinderWithout(importlib.machinery.PathFinder):
  @classmethod
  def find_spec(cls, name, path=None, target=None):
    spec = super().find_spec(name, path, target)
    if (spec is not None and name.split('.')[0] in {_ABSENT!r}
        and 'site-packages' in (spec.origin or '')):
      return None  # not found, as where it is not installed (importlib.util.find_spec too)
    return spec
sys.meta_path[:] = [_PathFinderWithout if f is importlib.machinery.PathFinder else f
                    for f in sys.meta_path]
'''


@needs_torch
@pytest.mark.slow
def test_gpu_check_smoke_runs_without_tensorflow_tfds_clu_or_installed_ml_collections(tmp_path):
  (tmp_path / 'sitecustomize.py').write_text(_SITECUSTOMIZE)
  kept = tmp_path / 'kept'
  env = dict(os.environ, HVT_SMOKE='1', PYTHONPATH=str(tmp_path), JAX_PLATFORMS='cpu',
             PYTHON=sys.executable, HVT_GPU_CHECK_OUT=str(kept),
             XLA_FLAGS='--xla_cpu_enable_xprof_traceme=true')
  out = subprocess.run(['bash', str(REPO / 'benchmarks' / 'gpu_check.sh')], env=env,
                       capture_output=True, text=True, timeout=1500)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'using benchmarks/wheels' in out.stdout
  summary = out.stdout.split('=== gpu_check summary')[-1]
  for model in ('hvt-s-1', 'hvt-s-0'):
    rows = [line for line in summary.splitlines() if line.startswith(f'| {model} |')]
    assert len(rows) == 2, summary  # batch 4 and the largest batch
    assert all('n/a' not in row for row in rows), summary  # both sides measured
  # HVT_GPU_CHECK_OUT keeps the trace and the traced step's HLO, and the summary reads both.
  assert {'gpu_check.log', 'rows.jsonl', 'perfetto_trace.json.gz', 'train_step.hlo.txt'} <= {
      p.name for p in kept.iterdir()}
  assert 'The 8 largest fusions of the HLO: instructions, operands, result, name' in summary, summary
  # The device's side of the training loop, fed from host memory without TensorFlow.
  device_side = summary.split("The device's side of the training loop")[-1]
  assert '  fed from host memory (' in device_side and 'img/s' in device_side, summary


def test_augment_cost_times_the_step_fed_through_the_training_loops_feed():
  kw = ','.join(f'{k}={v}' for k, v in TINY_MODEL.items())
  out = run_benchmark('augment_cost.py', f'--model_kw={kw}', '--batch=2', '--canvas=48',
                      '--transfer', '--steps=1', '--repeats=1')
  assert out.returncode == 0, out.stderr[-3000:]
  # A 48 x 48 x 3 uint8 canvas, its label, example id and window size (int32): 6,936 bytes.
  fed = [line for line in out.stdout.splitlines()
         if line.startswith('  fed from host memory (7 KiB per image, data.feeding, 2 batches')]
  assert len(fed) == 2, out.stdout  # wall time, then CPU time
  assert fed[0].endswith('img/s') and 'img/s' not in fed[1], out.stdout
  assert 'rounds (wall ms): with ' in out.stdout and '; fed ' in out.stdout, out.stdout


def _model_speed(*args, **env) -> subprocess.CompletedProcess:
  return run_benchmark('model_speed.py', *args, **env)


def test_model_speed_rejects_an_unknown_model_field_in_one_line():
  out = _model_speed('--models=hvt-s-1', '--model_kw=no_such_field=1')
  assert out.returncode != 0
  assert 'no_such_field' in out.stderr and 'Traceback' not in out.stderr


def test_model_speed_refuses_to_trace_into_an_existing_directory(tmp_path):
  out = _model_speed('--models=hvt-s-1', f'--trace={tmp_path}')
  assert out.returncode != 0 and 'Traceback' not in out.stderr
  assert f'--trace: {tmp_path} exists; pass a new directory.' in out.stderr, out.stderr


def test_model_speed_refuses_variants_at_the_largest_batch():
  out = _model_speed('--models=hvt-s-1', '--batch=max', '--model_kw=', '--model_kw=remat=true')
  assert out.returncode != 0
  assert '--batch=max takes one --model_kw' in out.stderr and 'Traceback' not in out.stderr


def test_model_speed_times_steady_calls_one_untimed_call_after_the_other_side():
  """Sides alternate; each timing starts with one untimed call, as the first call after the other
  side ran pays for the memory that side left behind (docs/performance.md, "Against PyTorch")."""
  timing = load_benchmark('timing')
  log = []

  class Side:
    def __init__(self, name):
      self.name = name
    def run_forward(self):
      log.append((self.name, 'forward'))
    def run_train(self):
      log.append((self.name, 'train'))
    def sync(self, _):
      pass

  times = timing.rounds([Side('jax'), Side('torch')], steps=3, repeats=2)
  assert sorted(times) == [0, 1] and all(set(t) == {'forward', 'train'} for t in times.values())
  # Two warm-up rounds per side, then per round and side: 1 untimed + 3 timed calls per kind.
  timed = log[8:]
  assert timed[:8] == [('jax', 'forward')] * 4 + [('jax', 'train')] * 4
  assert timed[8:16] == [('torch', 'forward')] * 4 + [('torch', 'train')] * 4
  assert len(timed) == 2 * 2 * 2 * 4


def test_model_speed_table_has_ratios_memory_and_mfu(tmp_path):
  row = dict(model='hvt-s-1', batch=8, dtype='bfloat16', gmacs=2.4, compile_s=3.0,
             train_flops=8 * 15e9, peak_bytes=3 * 2**30, device='cpu', forward_ips=40.0,
             train_ips=10.0, forward_flops=8 * 5e9, torch_forward_ips=50.0,
             torch_forward_kind='eager', torch_train_ips=8.0, torch_train_kind='compiled',
             torch_warmup_s={'eager': 1.0, 'compiled': 30.0})
  rows = tmp_path / 'rows.jsonl'
  rows.write_text(json.dumps(row) + '\n')
  out = _model_speed(f'--table_from={rows}', '--peak_tflops=1')
  assert out.returncode == 0, out.stderr[-2000:]
  assert '| hvt-s-1 | 8 | 10.0 | 8.0 (compiled/eager) | 1.25x | 40.0 | 50.0 | 0.80x |' in out.stdout
  line = next(l for l in out.stdout.splitlines() if l.startswith('hvt-s-1') and '15.00' in l)
  # fwd GFLOP/img, peak GiB, MFU: 6 x 2.4 GMACs x 10 img/s of a 1 TFLOP/s peak
  assert line.split()[-3:] == ['5.00', '3.00', '14.4%']


def test_model_speed_table_names_the_fields_its_variants_differ_in(tmp_path):
  base = dict(model='hvt-s-1', batch=8, dtype='bfloat16', gmacs=2.4, compile_s=3.0,
              train_flops=None, peak_bytes=None, device='cpu', forward_ips=40.0, train_ips=10.0,
              torch_train_ips=8.0, torch_forward_ips=50.0, torch_train_kind='compiled',
              torch_forward_kind='compiled')
  rows = [dict(base, model_kw={'attention': 'auto'}),
          dict(base, model_kw={'attention': 'auto', 'scan_blocks': True}, train_ips=5.0)]
  path = tmp_path / 'rows.jsonl'
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  out = _model_speed(f'--table_from={path}')
  assert out.returncode == 0, out.stderr[-2000:]
  assert '| hvt-s-1 | 8 | 10.0 | 8.0 (compiled) | 1.25x |' in out.stdout
  assert '| hvt-s-1 scan_blocks=True | 8 | 5.0 | 8.0 (compiled) | 0.62x |' in out.stdout


def _block_speed(*flags):
  return run_benchmark('block_speed.py', '--batch=2', '--tokens=8', '--repeats=1', *flags)


def test_block_speed_times_every_part_on_both_sides():
  out = _block_speed()
  assert out.returncode == 0, out.stderr[-2000:]
  rows = {line.split()[0]: line for line in out.stdout.splitlines()[1:]}
  assert set(rows) == {'attention', 'mlp', 'layernorm', 'x', 'dy', 'x.T', 'q', 'p'}, out.stdout
  torch_present = importlib.util.find_spec('torch') is not None
  assert all(('torch' in row) == torch_present for row in rows.values()), out.stdout


def test_block_speed_times_only_the_parts_asked_for():
  out = _block_speed('--parts=mlp,products')
  assert out.returncode == 0, out.stderr[-2000:]
  assert [line.split()[0] for line in out.stdout.splitlines()[1:]] == [
      'mlp', 'x', 'dy', 'x.T', 'q', 'p'], out.stdout
  out = _block_speed('--parts=mlp,gemm')
  assert out.returncode == 2 and out.stderr.strip().splitlines()[-1] == (
      'block_speed.py: error: --parts: unknown gemm; choose from attention, mlp, layernorm, '
      'products.'), out.stderr


def test_model_speed_keeps_the_traced_steps_hlo_and_trace_breakdown_reads_both(tmp_path):
  trace = tmp_path / 'trace'
  out = _model_speed('--models=hvt-s-1', '--batch=2', '--steps=1', '--repeats=1', f'--trace={trace}',
                     '--model_kw=depth=2,image_size=32,patch_size=16',
                     XLA_FLAGS='--xla_cpu_enable_xprof_traceme=true')
  assert out.returncode == 0, out.stderr[-3000:]
  assert f'{trace} (optimized HLO: train_step.hlo.txt)' in out.stdout
  perfetto, = trace.glob('plugins/profile/*/perfetto_trace.json.gz')
  out = run_trace_breakdown(perfetto, '--steps=3', f'--hlo={trace / "train_step.hlo.txt"}',
                             timeout=120)
  assert out.returncode == 0, out.stderr
  # The reductions YNNPACK runs are told apart only when the HLO's fusion names are the trace's.
  rows = {line[:50].strip(): float(line.split()[-3]) for line in out.stdout.splitlines()[1:]}
  assert rows['library fusions without a product (reductions)'] > 0, out.stdout




@pytest.mark.parametrize('where, shape', [('device', '512x512 canvases'), ('host', '32x32')])
def test_input_speed_times_the_pipeline_with_the_resize_where_asked(where, shape):
  out = run_benchmark('input_speed.py', '--synthetic', '--image_size=32', '--batch=8',
                      '--batches=2', '--warmup=1', '--threads=1', f'--resize_on={where}')
  assert out.returncode == 0, out.stderr[-2000:]
  assert f'output uint8 {shape}, batch 8' in out.stdout, out.stdout
  lines = [l for l in out.stdout.splitlines() if l.startswith(('train', 'eval'))]
  assert [l.split()[0] for l in lines] == ['train:', 'eval'], out.stdout
  assert all(float(l.split('per thread;')[1].split()[0]) > 0 for l in lines), out.stdout


@pytest.mark.parametrize('where, what', [('device', 'into 512x512 canvases'),
                                         ('host', 'of 32x32 images')])
def test_input_speed_breakdown_ends_with_the_rate_of_batching_alone(where, what):
  out = run_benchmark('input_speed.py', '--synthetic', '--image_size=32', '--batch=8',
                      '--batches=2', '--warmup=1', '--breakdown', f'--resize_on={where}')
  assert out.returncode == 0, out.stderr[-2000:]
  line = next((l for l in out.stdout.splitlines() if 'batching alone' in l), '')
  assert what in line and float(line.split('stage:')[1].split()[0]) > 0, out.stdout
