"""benchmarks/trace_breakdown.py: a traced step's time by kind of kernel or XLA:CPU operation, and
the optimized HLO's fusions."""
import gzip
import json

from tests.bench_helpers import load_benchmark, run_trace_breakdown


def _trace_breakdown(tmp_path, events, *args):
  """`trace_breakdown.py` on a Perfetto trace of `events`, gzipped as jax.profiler writes it."""
  trace = tmp_path / 'perfetto_trace.json.gz'
  with gzip.open(trace, 'wt') as f:
    json.dump({'traceEvents': events}, f)
  return run_trace_breakdown(trace, *args)


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
  tb = load_benchmark('trace_breakdown')
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


def test_trace_breakdown_says_how_to_trace_a_cpu_step(tmp_path):
  out = _trace_breakdown(tmp_path, [dict(ph='X', pid=1, tid=1, ts=0, dur=5, name='$api.py:1 f')])
  assert out.returncode == 1 and out.stdout == ''
  assert out.stderr.strip().endswith('trace with XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true.')
  assert len(out.stderr.strip().splitlines()) == 1
