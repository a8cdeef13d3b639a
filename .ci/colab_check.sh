#!/usr/bin/env bash
# CI: the Colab notebooks' own install cell on a rebuilt Colab GPU runtime, then the notebooks.
#
# Colab's runtime is rebuilt from the registry in a virtualenv: its Python (3.13) and the exact
# versions of the packages hvt_jax touches (Colab's published package list, August 2026), with
# the notebook runner on top. Then, in a throw-away copy of it, each notebook's install cell runs
# as Colab would run it (its `!` lines, the GitHub URL replaced by this checkout), and the check
# fails with one line unless
#   - the runtime's TensorFlow is the one it had and still imports (a second TensorFlow
#     distribution unpacked over it breaks `import tensorflow`),
#   - jax, jaxlib and the CUDA plugin are at one version (jax cannot load a plugin of another
#     version, and then silently runs on the CPU),
#   - the notebooks import the installed hvt_jax, not this checkout,
# and then runs the notebooks top to bottom in their small mode, printing what each printed.
#
# The built runtime is kept under $HVT_COLAB_CACHE (default ~/.cache/hvt_jax_ci), keyed by the
# Python and the version list, and reused while `pip freeze` still matches what was built; the
# install cell only ever runs in a copy (hard links where the file system allows: pip replaces
# files rather than writing into them). This machine has no GPU: HVT_COLAB_EXPECT_CPU=1 tells
# the notebooks' accelerator check that a CPU runtime is expected, so it prints its line and
# passes.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
say() { echo "colab check: $*" >&2; }
fail() { say "$*"; exit 1; }

# Colab's GPU runtime. jax[cuda12] is jax-cuda12-plugin[with-cuda], jax-cuda12-pjrt and pip's
# CUDA 12 libraries, as Colab has them. The TPU runtime (no TensorFlow, libtpu) is not rebuilt.
COLAB=(
  tensorflow==2.20.0 tensorflow-datasets==4.9.10
  'jax[cuda12]==0.7.2' jaxlib==0.7.2 jax-cuda12-plugin==0.7.2 jax-cuda12-pjrt==0.7.2
  flax==0.11.2 optax==0.2.8 orbax-checkpoint==0.12.4 grain==0.2.18
)
# What runs the notebooks (Colab has its own Jupyter kernel), at requirements-test.txt's pins.
RUNNER=(ipykernel==7.4.0 nbclient==0.11.0 nbformat==5.11.1 pytest==9.2.0)
NOTEBOOKS=(quickstart load_in_jax train_cifar100)
URL=https://github.com/hvt-jax/hvt_jax  # the project's published URL, as the notebooks give it

find_python313() {
  if [[ -n "${HVT_COLAB_PYTHON:-}" ]]; then echo "$HVT_COLAB_PYTHON"; return; fi
  local p
  for p in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.13.*/bin/python3.13 \
           "$(command -v python3.13 || true)"; do
    [[ -x "$p" ]] && { echo "$p"; return; }
  done
  fail 'no Python 3.13 (Colab'"'"'s): install one (pyenv install 3.13) or set HVT_COLAB_PYTHON'
}
py313="$(find_python313)"
key="$(printf '%s\n' "$("$py313" -VV)" "${COLAB[@]}" "${RUNNER[@]}" | sha256sum | cut -c1-16)"
cache="${HVT_COLAB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hvt_jax_ci}"
base="$cache/colab-$key"
mkdir -p "$cache"

# One build at a time per key; a second CI run waits for the first and then reuses its runtime.
exec 9>"$base.lock"
flock 9
if [[ -f "$base/.complete" ]] \
   && "$base/bin/python" -m pip freeze 2>/dev/null | cmp -s - "$base/.freeze"; then
  say "reusing the Colab-like runtime $base"
else
  say "building the Colab-like runtime $base ($("$py313" -V); ${COLAB[*]})"
  rm -rf "$base"
  "$py313" -m venv "$base"
  "$base/bin/python" -m pip install -q "${COLAB[@]}" "${RUNNER[@]}" 2>&1 \
    | { grep -v 'is ignored: it is neither a file nor a directory' || true; } >&2
  "$base/bin/python" -m pip freeze >"$base/.freeze"
  touch "$base/.complete"
fi
flock -u 9
[[ "${HVT_COLAB_BUILD_ONLY:-}" == 1 ]] && exit 0

# The install cells change the runtime, so they run in a copy; hard links cost no space or time.
run="$(mktemp -d "$cache/run.XXXXXX")"
trap 'rm -rf "$run"' EXIT
cp -al "$base" "$run/venv" 2>/dev/null || { rm -rf "$run/venv"; cp -a "$base" "$run/venv"; }
# The copy's scripts (pip, ...) name the base's Python in their first line: point them at the
# copy's (sed -i writes a new file, so the base's linked file is left as it was).
{ find "$run/venv/bin" -maxdepth 1 -type f -exec grep -lI "^#!$base/bin/" {} + || true; } \
  | xargs -r sed -i "1s|^#!$base/bin/|#!$run/venv/bin/|"
export VIRTUAL_ENV="$run/venv" PATH="$run/venv/bin:$PATH" HVT_COLAB_EXPECT_CPU=1
unset PYTHONPATH PYTHONHOME
work="$run/work"
mkdir -p "$work"

installed() {  # name==version of what the checks are about, on one line (-I: not the checkout's)
  python -I - <<'PY'
import importlib.metadata as m
names = ['tensorflow', 'tensorflow-cpu', 'tf-nightly', 'tensorflow-datasets', 'jax', 'jaxlib',
         'jax-cuda12-plugin', 'jax-cuda12-pjrt', 'flax', 'optax', 'orbax-checkpoint', 'grain',
         'numpy', 'ml-dtypes', 'protobuf', 'hvt_jax']
have = {}
for name in names:
  try:
    have[name] = m.version(name)
  except m.PackageNotFoundError:
    pass
print(' '.join(f'{k}=={v}' for k, v in have.items()))
PY
}

check_runtime() {  # what the notebooks need of the runtime their install cells left
  local after tf where
  after="$(installed)"
  # Colab's TensorFlow: the one it had, alone, and it imports.
  [[ " $after " == *" tensorflow==2.20.0 "* && " $after " != *" tensorflow-cpu=="* \
     && " $after " != *" tf-nightly=="* ]] \
    || fail "the install cell replaced or doubled Colab's TensorFlow 2.20.0: $after"
  tf="$(cd "$work" && python -c 'import tensorflow as tf; print(tf.__version__)' 2>&1 | tail -1)" \
    || fail "tensorflow does not import after the install cell: $tf"
  say "import tensorflow: $tf"
  # jax, jaxlib and the CUDA plugin at one version, or jax cannot load the plugin.
  python -I - "$after" <<'PY' \
    || fail "jax, jaxlib and the CUDA plugin disagree after the install cell: $after"
import sys
have = dict(p.split('==') for p in sys.argv[1].split())
sys.exit(len({have.get(n) for n in ('jax', 'jaxlib', 'jax-cuda12-plugin', 'jax-cuda12-pjrt')}) != 1)
PY
  where="$(cd "$work" && python -c 'import hvt_jax; print(hvt_jax.__file__)')"
  [[ "$where" == "$VIRTUAL_ENV/"* ]] \
    || fail "the notebooks would import hvt_jax from $where, not the installed package"
}

say "before: $(installed)"
python -I -m pip freeze >"$run/before.txt"

# Each notebook's install cell, as Colab runs it: its `!` lines, one shell each, in the
# notebook's own working directory, with the project's URL pointing at this checkout (committed
# HEAD, as a fresh clone has it). The first cell does the work; the others are its reruns.
start=$SECONDS
for name in "${NOTEBOOKS[@]}"; do
  mkdir -p "$work/$name"
  mapfile -t lines < <(python -I - "colab/$name.ipynb" <<'PY'
import json, sys
cell = json.load(open(sys.argv[1]))['cells'][1]  # the install cell (tests/test_notebooks.py)
for line in ''.join(cell['source']).splitlines():
  if line.strip().startswith('!'):
    print(line.strip()[1:])
PY
  )
  [[ ${#lines[@]} -gt 0 ]] || fail "colab/$name.ipynb: no install lines in its second cell"
  for line in "${lines[@]}"; do
    cmd="${line//"$URL"/file://$repo}"
    [[ "$cmd" != *github.com* ]] \
      || fail "colab/$name.ipynb: an install line names another URL: $line"
    say "$name: !$cmd"
    status=0
    (cd "$work/$name" && sh -c "$cmd") >"$run/line.log" 2>&1 || status=$?
    # (This machine's pip configuration names local indexes that may be absent: not Colab's.)
    grep -v 'is ignored: it is neither a file nor a directory' "$run/line.log" >&2 || true
    [[ $status == 0 ]] || fail "colab/$name.ipynb: this install line failed ($status): !$line"
  done
done
say "after: $(installed)"
say "the install cells changed ($((SECONDS - start)) s): $(python -I -m pip freeze \
  | diff "$run/before.txt" - | sed -n 's/^> //p' | tr '\n' ' ')"
check_runtime

# The notebooks in their small mode, in the directories their install cells ran in.
start=$SECONDS
HVT_NOTEBOOK_SETUP_DIR="$work" HVT_NOTEBOOK_OUTPUTS="$run/executed" \
  python -m pytest -q -p no:cacheprovider -m slow tests/test_notebooks.py -k top_to_bottom
say "the notebooks ran in $((SECONDS - start)) s"
for name in "${NOTEBOOKS[@]}"; do
  say "$name.ipynb printed (first lines):"
  python -I - "$run/executed/$name.ipynb" <<'PY'
import json, sys
text = [t for cell in json.load(open(sys.argv[1]))['cells'] if cell['cell_type'] == 'code'
        for o in cell['outputs'] if o.get('name') == 'stdout' for t in [''.join(o['text'])]]
print('\n'.join(''.join(text).strip().splitlines()[:12]))
PY
done
say "passed in $SECONDS s"
