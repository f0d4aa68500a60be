#!/usr/bin/env bash
# Compile-check every CUDA kernel with plain nvcc (the .cu files include no torch headers).
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
if [ ! -x "$NVCC" ]; then
  echo "nvcc-check: SKIPPED - nvcc not found on this machine; CUDA kernels were not compile-checked"
  exit 0
fi
out=$(mktemp -d)
n=0
for cu in csrc/cuda/*.cu; do
  [ -e "$cu" ] || continue
  "$NVCC" -c -std=c++17 -O3 -gencode arch=compute_90,code=sm_90 -gencode arch=compute_80,code=sm_80 \
    -Xcompiler -Wall -o "$out/$(basename "$cu").o" "$cu"
  echo "nvcc-check: ok $cu"
  n=$((n + 1))
done
rm -rf "$out"
echo "nvcc-check: $n CUDA files compiled with $("$NVCC" --version | tail -1)"
