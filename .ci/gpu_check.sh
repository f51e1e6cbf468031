#!/usr/bin/env bash
# GPU check, run on a machine with a CUDA GPU and a CUDA build of torch already installed:
# builds the extension for sm_90a (Hopper), runs the CUDA tests and the kernel benchmarks.
# Everything it writes goes under $1 (default ./gpu-out): build.log, tests.log, bench.log,
# bench-<device>.json. Exit status: non-zero when the build or the tests fail.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-$PWD/gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
} 2>&1 | tee "$OUT/env.log"

echo "== build (sm_90a)"
if ! PYCOMPRESS_CUDA=1 "$PY" setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1; then
  tail -50 "$OUT/build.log"
  echo "gpu-check: BUILD FAILED"
  exit 1
fi
tail -3 "$OUT/build.log"

echo "== CUDA tests"
PYTHONPATH=$PWD timeout 600 "$PY" -m pytest -q -x -m cuda -p no:cacheprovider tests 2>&1 | tee "$OUT/tests.log"
tests_rc=${PIPESTATUS[0]}

echo "== benchmarks"
# one kernel family at a time, each with its own time limit, so that results of the
# finished families survive a slow one (run.py merges them into one JSON file)
for k in quant int8 sparse semi24 kd; do
  PYTHONPATH=$PWD timeout "${BENCH_TIMEOUT:-150}" "$PY" bench/run.py --kernels $k --device cuda \
    --json "$OUT/bench-cuda.json" 2>&1 | tee -a "$OUT/bench.log"
done
mkdir -p bench/results && cp "$OUT/bench-cuda.json" bench/results/ 2>/dev/null || true
exit $tests_rc
