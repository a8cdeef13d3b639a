#!/usr/bin/env bash
# One command for a GPU box (within an 8-minute budget): JAX against the PyTorch baseline for
# HVT-S-1 and HVT-S-0 in bfloat16, at batch 256 and at the largest batch that fits, then one table.
#
#   bash benchmarks/gpu_check.sh                # on the GPU machine, from anywhere
#   HVT_SMOKE=1 bash benchmarks/gpu_check.sh    # any machine: tiny model, batch 4, 1 step
#
# Needs only jax, flax, optax, orbax and torch: no TensorFlow, TFDS, clu or network. The default
# training config needs ml_collections (pure Python); if it is missing, the wheel carried in
# benchmarks/wheels/ is unpacked to a temporary directory on PYTHONPATH (nothing is installed).
# HVT_GPU_CHECK_SECONDS (default 480) bounds the whole run; what finished is always printed.
# The phases run in order of importance, so the largest-batch rows get what is left; the slowest,
# HVT-S-0's, comes last.
# With HVT_GPU_CHECK_OUT=DIR the log, the JSON rows, a profiler trace of 3 HVT-S-1 train steps and
# that step's optimized HLO (train_step.hlo.txt: what each fusion in the trace holds) are kept
# there, and the summary ends with that trace's time per kind of kernel and the step's eight
# largest fusions.
#
# Phases, in order of importance, each skipped when the time left is too short:
#   1. cuDNN attention: checked against float32 at even token counts (where 'auto' uses it) and,
#      padded by one masked token, at odd ones (attention=cudnn); if it fails, the rest runs with
#      attention=xla and says so.
#   2. batch 256, both models in one process, JAX and PyTorch (eager and torch.compile) interleaved.
#   3. the device's side of the real training loop, which needs no TensorFlow: HVT-S-1's step with
#      the paper recipe's augmentation and the crop's resize from 512x512 canvases, fed from host
#      memory by the loop's own feed (augment_cost.py --transfer), against the step without them and
#      on a batch kept on the device. With the host's CPU-ms per image (input_speed.py, on any
#      machine) it bounds the end-to-end rate.
#   4. JAX-only variants of HVT-S-1 at batch 256: cuDNN in every block (attention=cudnn) and XLA
#      attention everywhere: what 'auto' buys and what it could become. (Scanned blocks, slower
#      than unrolled on a GPU (docs/performance.md), are left out; `--model_kw=scan_blocks=true`
#      times them.)
#   5. the largest batch, one process per model (PyTorch first, then JAX, each with the whole
#      device); the memory slope comes from phase 2's compiled step, so only one compile is added.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-$(command -v python || command -v python3)}
WORK=$(mktemp -d)
KEEP=${HVT_GPU_CHECK_OUT:-}
trap '[[ -n "$KEEP" ]] && cp "$WORK"/rows.jsonl "$KEEP"/ 2>/dev/null; rm -rf "$WORK"' EXIT
if [[ -n "$KEEP" ]]; then
  mkdir -p "$KEEP"
  rm -f "$KEEP"/{perfetto_trace.json.gz,train_step.hlo.txt}  # never a trace of an earlier run
  exec > >(tee "$KEEP/gpu_check.log") 2>&1
fi

if ! "$PY" -c 'import ml_collections' 2>/dev/null; then
  "$PY" -m zipfile -e benchmarks/wheels/ml_collections-*.whl "$WORK/site"
  export PYTHONPATH="$PYTHONPATH:$WORK/site"
  echo "ml_collections: using benchmarks/wheels (unpacked to $WORK/site)"
fi

if [[ -n "${HVT_SMOKE:-}" ]]; then
  END=$((SECONDS + ${HVT_GPU_CHECK_SECONDS:-1200}))  # a slow shared CPU compiles slowly
  TINY=depth=2,image_size=32,patch_size=16
  COMMON=(--dtype=bfloat16 --steps=1 --repeats=1)
  BATCH=4; MAX=(--memory_gb=0.2); CANVAS=64
else
  END=$((SECONDS + ${HVT_GPU_CHECK_SECONDS:-480}))
  TINY=
  COMMON=(--dtype=bfloat16 --steps=10 --repeats=3)
  BATCH=256; MAX=(); CANVAS=512
fi
ROWS="$WORK/rows.jsonl"
touch "$ROWS"
have() {  # have NEED WHAT...: whether NEED seconds of the budget are left; if not, says WHAT skips
  local left=$((END - SECONDS))
  (( left >= $1 )) && return 0
  echo "skipped ($left s of the time budget left): ${*:2}"
  return 1
}
run() {  # run NEED ARGS...: one model_speed.py process if NEED seconds of the budget are left
  have "$@" || return 0
  shift
  local left=$((END - SECONDS))
  timeout "$left" "$PY" benchmarks/model_speed.py "${COMMON[@]}" --time_budget="$left" \
    --json="$ROWS" "$@" || echo "model_speed.py $* stopped (exit $?); rows so far are kept"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
"$PY" -c 'import jax, torch; print("jax", jax.__version__, jax.devices(), "| torch", torch.__version__)'

# 1. cuDNN's fused attention, forward and gradient, against float32 at HVT's token counts:
# even ones as 'auto' runs them, odd ones padded by one masked token as attention=cudnn runs them.
read -r ATTENTION PADDED < <("$PY" - <<'EOF' || echo xla no
import jax, jax.numpy as jnp, sys
from hvt_jax.model import attention, settings
if settings.attention_implementation('auto', jnp.bfloat16, 196) != 'cudnn':
  print('xla no'); sys.exit()
ok = {}
for n in (196, 48, 97, 23):  # the token counts of HVT stages at 224 px
  q, k, v = jax.random.normal(jax.random.key(n), (3, 8, n, 6, 64), jnp.bfloat16)
  def loss(q, k, v, impl):
    out = attention.attend(q, k, v, 0.125, impl)
    return jnp.sum(out.astype(jnp.float32) * jnp.cos(jnp.arange(64)))
  grad = jax.jit(jax.grad(loss, (0, 1, 2)), static_argnums=3)
  ref = grad(*(t.astype(jnp.float32) for t in (q, k, v)), 'xla')
  kernel = 'cudnn' if n % 2 == 0 else 'cudnn-padded'
  try:
    err = {impl: max(float(jnp.linalg.norm(a.astype(jnp.float32) - r) / jnp.linalg.norm(r))
                     for a, r in zip(grad(q, k, v, impl), ref)) for impl in (kernel, 'xla')}
  except Exception as e:  # refused by JAX or cuDNN: say so, and keep that kernel out
    print(f'{n} tokens, {kernel}: {type(e).__name__}: {str(e).splitlines()[0][:150]}', file=sys.stderr)
    ok[n % 2] = False
    continue
  print(f'{n} tokens, bf16 attention gradients against float32: {kernel} {err[kernel]:.1e}, '
        f'XLA {err["xla"]:.1e}', file=sys.stderr)
  ok[n % 2] = ok.get(n % 2, True) and err[kernel] < max(2 * err['xla'], 1e-2)
print('auto' if ok[0] else 'xla', 'yes' if ok[0] and ok[1] else 'no')
EOF
)
echo "attention for the model: $ATTENTION; cuDNN padded to even token counts usable: $PADDED"
KW=${TINY}${TINY:+,}attention=$ATTENTION

# 2. Batch 256: both models in one process, JAX and PyTorch interleaved.
TRACE=()
[[ -n "$KEEP" ]] && TRACE=(--trace="$WORK/trace")
run 45 --torch --models=hvt-s-1,hvt-s-0 --batch="$BATCH" --model_kw="$KW" "${TRACE[@]}"
if [[ -n "$KEEP" && -d "$WORK/trace" ]]; then
  find "$WORK/trace" -name 'perfetto_trace.json.gz' -exec cp {} "$KEEP/" \; -quit
  cp "$WORK/trace/train_step.hlo.txt" "$KEEP/" 2>/dev/null || true  # the traced step's fusions
fi
# 3. The device's side of the training loop: augmentation, resize and the copy from host memory.
if have 90 augment_cost.py; then
  timeout $((END - SECONDS)) "$PY" benchmarks/augment_cost.py --batch="$BATCH" --canvas="$CANVAS" \
    --transfer --noeval --model_kw="$KW" "${COMMON[@]}" \
    2>&1 | grep -v -E '^[IWE][0-9]{4} ' | tee "$WORK/augment_cost.txt" || echo "augment_cost.py stopped"
fi
# 4. What the GPU defaults buy, and what could become one: JAX only, one process.
VARIANTS=()
[[ $PADDED == yes ]] && VARIANTS+=(--model_kw="${TINY}${TINY:+,}attention=cudnn")
[[ $ATTENTION == auto ]] && VARIANTS+=(--model_kw="${TINY}${TINY:+,}attention=xla")
[[ -n "$TINY" ]] && VARIANTS+=(--model_kw="$KW,scan_blocks=true")  # smoke: the path still runs
(( ${#VARIANTS[@]} )) && run 60 --models=hvt-s-1 --batch="$BATCH" "${VARIANTS[@]}"
# 5. Largest batch: one process per model, so neither framework keeps memory from the other;
# PyTorch runs first and frees the device, then JAX.
for model in hvt-s-1 hvt-s-0; do
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 run 60 --torch --models="$model" --batch=max \
    --probe_from="$ROWS" --model_kw="$KW" "${MAX[@]}"
done

echo
echo "=== gpu_check summary ($((SECONDS)) s) ==="
"$PY" benchmarks/model_speed.py --table_from="$ROWS"
if [[ -s "$WORK/augment_cost.txt" ]]; then
  echo "The device's side of the training loop (augment_cost.py, HVT-S-1, batch $BATCH):"
  grep -E '^(hvt|train step FLOPs|augmentation alone|step wall time|  fed from host)' \
    "$WORK/augment_cost.txt" | head -5
  echo "End to end, the loop runs at the lower of that fed rate and what the host's $(nproc) cores" \
    "feed: $(nproc) x 1000 / (input_speed.py's CPU-ms per image) img/s."
fi
if [[ -n "$KEEP" && -f "$KEEP/perfetto_trace.json.gz" ]]; then
  echo "Where a batch-$BATCH HVT-S-1 train step's time goes (the trace kept in $KEEP):"
  HLO=()  # the largest fusions: does XLA:GPU re-fuse the backward's residual sum as XLA:CPU does?
  [[ -f "$KEEP/train_step.hlo.txt" ]] && HLO=(--hlo="$KEEP/train_step.hlo.txt" --largest=8)
  "$PY" benchmarks/trace_breakdown.py "$KEEP/perfetto_trace.json.gz" --steps=3 --top=15 "${HLO[@]}" \
    || true
fi
