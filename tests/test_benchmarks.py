"""The speed benchmark's pieces: what a bare GPU box can import, and the PyTorch baseline's parity."""
import gzip
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
          'hvt_jax.sharding', 'hvt_jax.data.mixup', 'hvt_jax.training.checkpoint']
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


def _load_benchmark(name: str):
  """benchmarks/`name`.py as a module, to call its functions."""
  spec = importlib.util.spec_from_file_location(name, REPO / 'benchmarks' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _model_speed(*args, **env) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS='cpu', **env)
  return subprocess.run([sys.executable, str(REPO / 'benchmarks' / 'model_speed.py'), *args],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


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
  side ran pays for the memory that side left behind (README, Against PyTorch)."""
  model_speed = _load_benchmark('model_speed')
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

  times = model_speed._rounds([Side('jax'), Side('torch')], steps=3, repeats=2)
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


def _trace_breakdown(tmp_path, events, *args):
  """`trace_breakdown.py` on a Perfetto trace of `events`, gzipped as jax.profiler writes it."""
  trace = tmp_path / 'perfetto_trace.json.gz'
  with gzip.open(trace, 'wt') as f:
    json.dump({'traceEvents': events}, f)
  return _run_trace_breakdown(trace, *args)


def _run_trace_breakdown(trace, *args, timeout=60):
  return subprocess.run([sys.executable, str(REPO / 'benchmarks' / 'trace_breakdown.py'), str(trace),
                         *args], capture_output=True, text=True, timeout=timeout)


def test_trace_breakdown_groups_a_devices_kernels_per_step(tmp_path):
  """A Perfetto trace as jax.profiler writes it: metadata names the device and host rows."""
  kernel = lambda name, dur, pid=1: dict(ph='X', pid=pid, tid=7, ts=0, dur=dur, name=name)
  events = [dict(ph='M', pid=1, name='process_name', args={'name': '/device:GPU:0'}),
            dict(ph='M', pid=2, name='process_name', args={'name': '/host:CPU'}),
            kernel('nvjet_sm90_tst_192x128_NNT', 3000), kernel('gemm_fusion_dot_4', 1000),
            kernel('input_transpose_fusion_78', 1500), kernel('memcpy128', 500),
            kernel('cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma', 400),
            kernel('loop_convert_multiply_fusion', 600),
            kernel('PjitFunction(train_step)', 999999, pid=2)]  # host: not counted
  out = _trace_breakdown(tmp_path, events, '--steps=2')
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert lines[0] == '3.50 ms of kernels per step, 3 kernels per step'
  kinds = {l[:50].strip(): l.split()[-3] for l in lines[1:]}
  assert kinds['GEMMs (cuBLAS, Triton, CUTLASS)'] == '2.00'
  assert kinds['transposes'] == '0.75' and kinds['copies (memcpy, memset)'] == '0.25'
  assert kinds['cuDNN attention'] == '0.20' and kinds['other elementwise fusions'] == '0.30'


def _block_speed(*flags):
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, str(REPO / 'benchmarks' / 'block_speed.py'), '--batch=2',
                         '--tokens=8', '--repeats=1', *flags], env=env, capture_output=True,
                        text=True, timeout=300)


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


def test_trace_breakdown_groups_xla_cpu_operations_when_there_is_no_device(tmp_path):
  """On CPU the trace's host rows hold XLA:CPU's operations, named for their HLO instructions,
  beside Python frames and the executor's own events, which are not counted."""
  op = lambda name, dur: dict(ph='X', pid=1, tid=3, ts=0, dur=dur, name=name)
  events = [dict(ph='M', pid=1, name='process_name', args={'name': '/host:CPU'}),
            op('ynn_fusion.11', 3000), op('dot.24', 1000), op('wrapped_broadcast.16', 800),
            op('bitcast_dynamic-update-slice_fusion.6', 400), op('dynamic-slice_bitcast_fusion', 200),
            op('stack.295', 100), op('copy_bitcast_fusion.1', 300), op('negate_exponential_fusion', 200),
            op('$api.py:2479 block_until_ready', 99999), op('ThunkExecutor::Execute', 99999),
            op('PjitFunction(train_step)', 99999)]
  out = _trace_breakdown(tmp_path, events, '--steps=2')
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert lines[0] == '3.00 ms of XLA:CPU operations per step, 4 XLA:CPU operations per step'
  kinds = {l[:50].strip(): l.split()[-3] for l in lines[1:]}
  assert kinds == {'GEMMs (YNNPACK fusions, Eigen dots)': '2.00',
                   'zero-filling loop buffers (broadcast)': '0.40',
                   'stacking per block (dynamic-slice etc., stack)': '0.35',
                   'copies and transposes': '0.15', 'other elementwise fusions': '0.10'}


# The shape of XLA:CPU's optimized HLO text (`--xla_dump_to`): YNNPACK fusions, one holding a
# matrix product and one a LayerNorm's sum, beside an ordinary loop fusion.
_HLO = """HloModule jit_train_step, entry_computation_layout={(f32[3136,384]{1,0})->f32[3136,1152]{1,0}}

%fused_computation.7 (param_0.9: f32[3136,384], param_1.19: f32[384,1152]) -> f32[3136,1152] {
  %param_0.9 = f32[3136,384]{1,0} parameter(0)
  %param_1.19 = f32[384,1152]{1,0} parameter(1)
  ROOT %dot_general.130 = f32[3136,1152]{1,0} dot(%param_0.9, %param_1.19), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_computation.9 (param_0.12: f32[16,196,384], param_1.22: f32[]) -> f32[16,196] {
  %param_0.12 = f32[16,196,384]{2,1,0} parameter(0)
  %param_1.22 = f32[] parameter(1)
  ROOT %reduce_sum.382 = f32[16,196]{1,0} reduce(%param_0.12, %param_1.22), dimensions={2}, to_apply=%region_27.85
}

%fused_computation.12 (param_0.3: f32[3136,1152]) -> f32[3136,1152] {
  %param_0.3 = f32[3136,1152]{1,0} parameter(0)
  ROOT %negate.1 = f32[3136,1152]{1,0} negate(%param_0.3)
}

ENTRY %main.1 (x.1: f32[16,196,384], w.1: f32[384,1152]) -> f32[3136,1152] {
  %ynn_fusion.9 = f32[16,196]{1,0} fusion(%x.1, %constant.2745), kind=kCustom, calls=%fused_computation.9, metadata={op_name="jit(train_step)/norm1/reduce_sum"}, backend_config={"outer_dimension_partitions":[],"fusion_config":{"kind":"__ynn_fusion"}}
  %ynn_fusion.7 = f32[3136,1152]{1,0} fusion(%bitcast.1, %w.1), kind=kCustom, calls=%fused_computation.7, backend_config={"outer_dimension_partitions":[],"fusion_config":{"kind":"__ynn_fusion"}}
  ROOT %negate_fusion = f32[3136,1152]{1,0} fusion(%ynn_fusion.7), kind=kLoop, calls=%fused_computation.12, backend_config={"outer_dimension_partitions":["2"]}
}
"""


def test_trace_breakdown_counts_library_fusions_without_a_product_apart_given_the_hlo(tmp_path):
  op = lambda name, dur: dict(ph='X', pid=1, tid=3, ts=0, dur=dur, name=name)
  events = [dict(ph='M', pid=1, name='process_name', args={'name': '/host:CPU'}),
            op('ynn_fusion.7', 3000), op('ynn_fusion.9', 600), op('dot.24', 1000),
            op('negate_fusion', 400)]
  hlo = tmp_path / 'module_0006.jit_train_step.cpu_after_optimizations.txt'
  hlo.write_text(_HLO)
  rows = lambda out: {l[:50].strip(): l.split()[-3] for l in out.stdout.splitlines()[1:]}
  out = _trace_breakdown(tmp_path, events, '--steps=2', f'--hlo={hlo}')
  assert out.returncode == 0, out.stderr
  assert rows(out) == {'GEMMs (YNNPACK fusions, Eigen dots)': '2.00',
                       'library fusions without a product (reductions)': '0.30',
                       'other elementwise fusions': '0.20'}, out.stdout
  # A pattern the shell left unexpanded (`--hlo=DIR/*jit_train_step...`) names the same file.
  pattern = f'--hlo={tmp_path}/*jit_train_step.cpu_after_optimizations.txt'
  out = _trace_breakdown(tmp_path, events, '--steps=2', pattern)
  assert out.returncode == 0 and rows(out)[
      'library fusions without a product (reductions)'] == '0.30', out.stdout + out.stderr
  second = tmp_path / 'module_0009.jit_train_step.cpu_after_optimizations.txt'
  second.write_text(_HLO)
  out = _trace_breakdown(tmp_path, events, pattern)
  assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].endswith(
      f'matches 2 files ({hlo}, {second}); pass one.'), out.stderr
  out = _trace_breakdown(tmp_path, events, '--steps=2')  # without the HLO: all of YNNPACK's
  assert rows(out) == {'GEMMs (YNNPACK fusions, Eigen dots)': '2.30',
                       'other elementwise fusions': '0.20'}, out.stdout
  out = _trace_breakdown(tmp_path, events, f'--hlo={tmp_path / "missing.txt"}')
  assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].startswith(
      'trace_breakdown.py: error: --hlo: cannot read '), out.stderr


# Shapes of real XLA text: a multi-output fusion (tuple result, `/*index=5*/` among its operands)
# holding a nested fusion, and a library fusion without a product just before an ENTRY that
# holds a product of its own.
_HLO_SHAPES = """HloModule jit_train_step

%fused_computation.1 (param_0.1: f32[8]) -> f32[8] {
  %param_0.1 = f32[8]{0} parameter(0)
  ROOT %negate.1 = f32[8]{0} negate(%param_0.1)
}

%fused_computation.2 (param_0.2: f32[8]) -> f32[8] {
  %param_0.2 = f32[8]{0} parameter(0)
  %exp.1 = f32[8]{0} exponential(%param_0.2)
  %exp.2 = f32[8]{0} exponential(%exp.1)
  %exp.3 = f32[8]{0} exponential(%exp.2)
  %exp.4 = f32[8]{0} exponential(%exp.3)
  %exp.5 = f32[8]{0} exponential(%exp.4)
  %exp.6 = f32[8]{0} exponential(%exp.5)
  ROOT %exp.7 = f32[8]{0} exponential(%exp.6)
}

%fused_computation.3 (p0: f32[8], p1: f32[8], p2: f32[8], p3: f32[8], p4: f32[8], p5: f32[8]) -> (f32[8], f32[8]) {
  %p0 = f32[8]{0} parameter(0)
  %p1 = f32[8]{0} parameter(1)
  %p2 = f32[8]{0} parameter(2)
  %p3 = f32[8]{0} parameter(3)
  %p4 = f32[8]{0} parameter(4)
  %p5 = f32[8]{0} parameter(5)
  %inner = f32[8]{0} fusion(%p5), kind=kLoop, calls=%fused_computation.2
  %add.1 = f32[8]{0} add(%p0, %inner)
  ROOT %tuple.1 = (f32[8]{0}, f32[8]{0}) tuple(%add.1, %p1)
}

%fused_computation.4 (param_0.4: f32[8,8], param_1.4: f32[]) -> f32[8] {
  %param_0.4 = f32[8,8]{1,0} parameter(0)
  %param_1.4 = f32[] parameter(1)
  ROOT %reduce.1 = f32[8]{0} reduce(%param_0.4, %param_1.4), dimensions={1}, to_apply=%region_0.1
}

ENTRY %main.1 (x.1: f32[8,8]) -> f32[8,8] {
  %x.1 = f32[8,8]{1,0} parameter(0)
  %negate_fusion = f32[8]{0} fusion(%x.1), kind=kLoop, calls=%fused_computation.1
  %multi_fusion = (f32[8]{0}, f32[8]{0}) fusion(%a, %b, %c, %d, %e, /*index=5*/%negate_fusion), kind=kLoop, calls=%fused_computation.3
  %ynn_fusion.1 = f32[8]{0} fusion(%x.1, %zero), kind=kCustom, calls=%fused_computation.4, backend_config={"fusion_config":{"kind":"__ynn_fusion"}}
  ROOT %dot.1 = f32[8,8]{1,0} dot(%x.1, %x.1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}
"""


def test_trace_breakdown_reads_the_fusions_of_real_hlo_text():
  tb = _load_benchmark('trace_breakdown')
  found = {f.name: (f.result, f.operands, len(f.body)) for f in tb.fusions(_HLO_SHAPES)}
  # Instructions of the fused computation (parameters included) and the fusion's operands; the
  # fusion nested in another is not a kernel of its own.
  assert found == {'negate_fusion': ('f32[8]{0}', 1, 2),
                   'multi_fusion': ('(f32[8]{0}, f32[8]{0})', 6, 9),
                   'ynn_fusion.1': ('f32[8]{0}', 2, 3)}
  # Its computation ends at its `}`: ENTRY's product is not the library fusion's.
  assert tb.library_fusions_without_product(tb.fusions(_HLO_SHAPES)) == {'ynn_fusion.1'}


def test_trace_breakdown_lists_the_largest_fusions_of_the_hlo(tmp_path):
  events = [dict(ph='M', pid=1, name='process_name', args={'name': '/host:CPU'}),
            dict(ph='X', pid=1, tid=3, ts=0, dur=100, name='negate_fusion')]
  hlo = tmp_path / 'train_step.hlo.txt'
  hlo.write_text(_HLO_SHAPES)
  out = _trace_breakdown(tmp_path, events, f'--hlo={hlo}', '--largest=2')
  assert out.returncode == 0, out.stderr
  listed = out.stdout.split('The 2 largest fusions of the HLO: instructions, operands, result, '
                            'name\n')[1].splitlines()
  assert [line.split() for line in listed] == [
      ['9', '6', '(f32[8]{0},', 'f32[8]{0})', 'multi_fusion'], ['3', '2', 'f32[8]{0}', 'ynn_fusion.1']]
  out = _trace_breakdown(tmp_path, events, '--largest=2')
  assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].endswith(
      '--largest lists fusions of the HLO: pass --hlo too.'), out.stderr


def test_model_speed_keeps_the_traced_steps_hlo_and_trace_breakdown_reads_both(tmp_path):
  trace = tmp_path / 'trace'
  out = _model_speed('--models=hvt-s-1', '--batch=2', '--steps=1', '--repeats=1', f'--trace={trace}',
                     '--model_kw=depth=2,image_size=32,patch_size=16',
                     XLA_FLAGS='--xla_cpu_enable_xprof_traceme=true')
  assert out.returncode == 0, out.stderr[-3000:]
  assert f'{trace} (optimized HLO: train_step.hlo.txt)' in out.stdout
  perfetto, = trace.glob('plugins/profile/*/perfetto_trace.json.gz')
  out = _run_trace_breakdown(perfetto, '--steps=3', f'--hlo={trace / "train_step.hlo.txt"}',
                             timeout=120)
  assert out.returncode == 0, out.stderr
  # The reductions YNNPACK runs are told apart only when the HLO's fusion names are the trace's.
  rows = {line[:50].strip(): float(line.split()[-3]) for line in out.stdout.splitlines()[1:]}
  assert rows['library fusions without a product (reductions)'] > 0, out.stdout


def test_trace_breakdown_says_how_to_trace_a_cpu_step(tmp_path):
  out = _trace_breakdown(tmp_path, [dict(ph='X', pid=1, tid=1, ts=0, dur=5, name='$api.py:1 f')])
  assert out.returncode == 1 and out.stdout == ''
  assert out.stderr.strip().endswith('trace with XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true.')
  assert len(out.stderr.strip().splitlines()) == 1
