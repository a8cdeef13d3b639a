#!/usr/bin/env bash
# One command for a GPU box (at most ~8 minutes on one H100): JAX against the PyTorch baseline for
# HVT-S-1 and HVT-S-0 in bfloat16, at batch 256 and at the largest batch that fits, then one table.
#
#   bash benchmarks/gpu_check.sh                # on the GPU machine, from anywhere
#   HVT_SMOKE=1 bash benchmarks/gpu_check.sh    # any machine: tiny model, batch 4, 1 step
#
# Needs only jax, flax, optax, orbax and torch: no TensorFlow, TFDS, clu or network. The default
# training config needs ml_collections (pure Python); if it is missing, the wheel carried in
# benchmarks/wheels/ is unpacked to a temporary directory on PYTHONPATH (nothing is installed).
# HVT_GPU_CHECK_SECONDS (default 450) bounds the whole run; what finished is always printed.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

if ! "$PY" -c 'import ml_collections' 2>/dev/null; then
  "$PY" -m zipfile -e benchmarks/wheels/ml_collections-*.whl "$WORK/site"
  export PYTHONPATH="$PYTHONPATH:$WORK/site"
  echo "ml_collections: using benchmarks/wheels (unpacked to $WORK/site)"
fi

if [[ -n "${HVT_SMOKE:-}" ]]; then
  END=$((SECONDS + ${HVT_GPU_CHECK_SECONDS:-1200}))  # a slow shared CPU compiles slowly
  COMMON=(--dtype=bfloat16 --steps=1 --repeats=1 --model_kw=depth=2,image_size=32,patch_size=16)
  BATCH=4; MAX=(--probe_batch=4 --memory_gb=0.1)
else
  END=$((SECONDS + ${HVT_GPU_CHECK_SECONDS:-450}))
  COMMON=(--dtype=bfloat16 --steps=10 --repeats=3)
  BATCH=256; MAX=(--probe_batch=256)
fi
ROWS="$WORK/rows.jsonl"
touch "$ROWS"
run() {  # run ARGS...: one model_speed.py process within what is left of the budget
  local left=$((END - SECONDS))
  if (( left < 45 )); then echo "skipped (time budget spent): $*"; return 0; fi
  timeout "$left" "$PY" benchmarks/model_speed.py --torch "${COMMON[@]}" --time_budget="$left" \
    --json="$ROWS" "$@" || echo "model_speed.py $* stopped (exit $?); rows so far are kept"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
"$PY" -c 'import jax, torch; print("jax", jax.__version__, jax.devices(), "| torch", torch.__version__)'

# Batch 256: both models in one process, JAX and PyTorch interleaved.
run --models=hvt-s-1,hvt-s-0 --batch="$BATCH"
# Largest batch: one process per model, so neither framework keeps memory from the other;
# PyTorch runs first and frees the device, then JAX.
for model in hvt-s-1 hvt-s-0; do
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 run --models="$model" --batch=max "${MAX[@]}"
done

echo
echo "=== gpu_check summary ($((SECONDS)) s) ==="
"$PY" benchmarks/model_speed.py --table_from="$ROWS"
