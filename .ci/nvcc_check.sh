#!/usr/bin/env bash
# Compiles every CUDA kernel file on its own with plain nvcc (no PyTorch headers),
# for sm_80 and sm_90a. Skips with a message where nvcc is not installed.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(command -v nvcc || true)}
if [ -z "$NVCC" ] && [ -x /usr/local/cuda/bin/nvcc ]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [ -z "$NVCC" ]; then
  echo "nvcc-check: SKIPPED (nvcc not found on PATH)"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mapfile -t files < <(find csrc -name '*.cu' | sort)
status=0
for f in "${files[@]}"; do
  # kernel files must not include torch / ATen / c10 headers
  if grep -nE '#include\s*[<"](torch|ATen|c10|pybind11)/' "$f"; then
    echo "nvcc-check: $f includes PyTorch headers (kernel files must be torch-free)"
    status=1
    continue
  fi
  if "$NVCC" -c -std=c++17 -O3 -Icsrc \
      -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90a,code=sm_90a \
      "$f" -o "$tmp/$(basename "$f").o"; then
    echo "nvcc-check: ok   $f"
  else
    echo "nvcc-check: FAIL $f"
    status=1
  fi
done
echo "nvcc-check: ${#files[@]} file(s) checked"
exit $status
