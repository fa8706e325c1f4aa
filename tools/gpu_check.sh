#!/usr/bin/env bash
# One-command GPU check for a GPU host with torch already installed (`make gpu-check WHEELS=dir`):
# installs DALI and its dependencies from a local wheel folder when one is given, runs the GPU
# tests and `mveb bench all --device cuda`, and writes everything to one folder.
#   usage: tools/gpu_check.sh [WHEEL_DIR] ; results in $GPU_CHECK_OUT (default gpu-check/)
#   GPU_CHECK_TESTS=0 skips the tests; GPU_CHECK_PARTS=kernels,loader (or step) runs only those
#   benchmark parts, merged into the results.json already in the folder (a split over calls).
#   GPU_CHECK_COMPILE=1 adds the compiled step variants: compiling ResNet-50 at two batch sizes
#   takes minutes, so the plain check leaves them out to stay within about 5 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${GPU_CHECK_OUT:-gpu-check}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
if [ -n "${1:-}" ]; then
  SITE="${TMPDIR:-/tmp}/mveb-gpu-site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "$1"/*.whl \
    || { echo "error: could not install the wheels in $1"; exit 1; }
  export PYTHONPATH="$SITE:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'error: no CUDA device visible to torch')" || exit 1
status=0
if [ "${GPU_CHECK_TESTS:-1}" != 0 ]; then
  "$PY" -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors --durations=10 tests 2>&1 \
    | tee "$OUT/gpu-tests.log" || status=1
fi
compile=(--no-compile); [ "${GPU_CHECK_COMPILE:-0}" = 1 ] && compile=()
"$PY" -m mveb bench all --device cuda --out "$OUT" --parts "${GPU_CHECK_PARTS:-loader,kernels,step}" "${compile[@]}" 2>&1 \
  | tee -a "$OUT/bench.log" || status=1
echo "results in $OUT/ (summary.md, results.json, chart.png, gpu-tests.log, bench.log)"
exit $status
