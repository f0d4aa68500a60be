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
echo "nvcc-check: $n CUDA files compiled with $("$NVCC" --version | tail -1)"

# The torch glue (*_glue.cpp) is built only where torch has CUDA; here it gets a syntax and type
# check against the CPU wheel's headers, which lack one generated CUDA header: an empty stand-in.
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$out/stub/c10/cuda/impl"
echo "// stand-in for the header CUDA builds of torch generate" >"$out/stub/c10/cuda/impl/cuda_cmake_macros.h"
includes=$("$PY" -c "import sysconfig, torch.utils.cpp_extension as c; print(' '.join('-isystem' + p for p in c.include_paths() + [sysconfig.get_paths()['include']]))")
# nvcc may be a wrapper script: ask it where its headers are.
cuda_include=$(cd "$out" && : >probe.cu && "$NVCC" --dryrun -c probe.cu 2>&1 | sed -n 's/.*INCLUDES="-I\([^"]*\)".*/\1/p' | head -1)
n=0
for glue in csrc/cuda/*_glue.cpp; do
  [ -e "$glue" ] || continue
  g++ -fsyntax-only -std=c++17 -Wall -isystem"$out/stub" $includes -isystem"$cuda_include" -Icsrc/cuda "$glue"
  echo "nvcc-check: ok $glue (syntax and types against torch's headers)"
  n=$((n + 1))
done
rm -rf "$out"
echo "nvcc-check: $n CUDA glue files checked"
