#!/usr/bin/env bash
# The whole GPU check in one call, for a machine with an NVIDIA GPU, nvcc and a CUDA build of torch
# (no internet needed): build the extension in place with CUDA, run the CUDA tests, the Triton tests
# compiled for the GPU (not interpreted) and the GPU benchmark. Everything lands in $OUT.
#
#   OUT=/some/dir bash benchmarks/gpu/run_gpu_checks.sh            # all steps
#   OUT=/some/dir bash benchmarks/gpu/run_gpu_checks.sh build cuda  # some steps, in this order
#
# Steps: build, nvcc (tests/nvcc_check.sh), cuda, triton, bench, and (named only) recording: record()'s overhead with
# the models on the GPU (benchmarks/recording.py --device cuda; not yet run on a GPU). Each is logged to $OUT/<step>.log and its exit status goes to
# $OUT/summary.txt; a failing step does not stop the later ones. A later call on the same machine
# can skip `build` (the in-place extension and the editable install stay). Environment: PY (python
# interpreter, default python3), BENCH_ARGS (extra arguments for bench_gpu.py, e.g. "--log2p 26"),
# PYTEST_XDIST (e.g. "-n 8": Triton's compiler is CPU-bound), LIMIT_<log name> (seconds, e.g. LIMIT_build=240).
# With a 10-minute limit per remote command, split it: `build nvcc cuda`, then `triton bench`.
set -u
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
PY=${PY:-python3}
OUT=${OUT:-$ROOT/benchmarks/results/gpu-$(date -u +%Y%m%d-%H%M)}
mkdir -p "$OUT"
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(build nvcc cuda triton bench)
unset TRITON_INTERPRET  # Triton tests must compile for the GPU here

log() { echo "[run_gpu_checks $(date -u +%H:%M:%S)] $*" | tee -a "$OUT/summary.txt"; }

# Runs one step with a time limit, output to $OUT/<name>.log (and the tail to stdout).
step() {
  local name=$1 limit=$2
  local override=LIMIT_$name
  limit=${!override:-$limit}  # e.g. LIMIT_build=240 to fit a device lease
  shift 2
  log "step $name: $*"
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  log "step $name: exit $rc after $((SECONDS - start)) s$([ $rc -eq 124 ] && echo " (timed out at $limit s)")"
  return $rc
}

environment() {
  {
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    command -v nvcc && nvcc --version | tail -2
    "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
    "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1
    git rev-parse HEAD 2>/dev/null || echo "(no git metadata)"
  } >"$OUT/environment.txt" 2>&1
  cat "$OUT/environment.txt"
}

build() {
  # The package itself without the extension (so pip does not build it), editable: that maps
  # unlearn_fast.kernels to kernels/. Then the extension in place, with CUDA.
  UNLEARN_FAST_SKIP_EXT=1 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .
  if ! "$PY" -c "import unlearn_fast.kernels" 2>/dev/null; then
    echo "unlearn_fast.kernels not importable after the editable install: linking kernels/ into the package"
    ln -sfn ../kernels unlearn_fast/kernels
  fi
  export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)")")}
  # A pip-installed CUDA torch keeps some CUDA headers (cusparse.h) under site-packages/nvidia/cu*/include.
  local extra
  extra=$("$PY" -c "import glob, os, torch; print(':'.join(glob.glob(os.path.join(os.path.dirname(torch.__file__), '..', 'nvidia', 'cu*', 'include'))))")
  [ -n "$extra" ] && export CPATH="$extra${CPATH:+:$CPATH}"
  local arch
  arch=$("$PY" -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')")
  echo "CUDA_HOME=$CUDA_HOME TORCH_CUDA_ARCH_LIST=$arch CPATH=${CPATH:-}"
  TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=${MAX_JOBS:-16} "$PY" setup.py build_ext --inplace || return 1
  PYTHONPATH=$ROOT "$PY" -c "
import unlearn_fast as uf, unlearn_fast._C as c, json
assert c.WITH_CUDA, 'extension built without CUDA'
print(json.dumps(uf.backends(), indent=1))"
}

export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export PY ROOT
export -f build  # `timeout` runs it through bash -c
environment
status=0
for s in "${STEPS[@]}"; do
  case $s in
    build) step build 540 bash -c build || status=1 ;;
    nvcc) step nvcc_check 120 bash tests/nvcc_check.sh || status=1 ;;
    cuda) step cuda_tests 420 "$PY" -m pytest tests/test_cuda_ops.py tests/test_hvp.py -k "cuda or CUDA" -q -rs ${PYTEST_XDIST:-} \
            -p no:cacheprovider --junitxml="$OUT/cuda_tests.xml" || status=1 ;;
    triton) step triton_tests 420 "$PY" -m pytest tests/triton -q -rs ${PYTEST_XDIST:-} -p no:cacheprovider \
              --junitxml="$OUT/triton_tests.xml" || status=1 ;;
    bench) step bench 480 "$PY" benchmarks/gpu/bench_gpu.py --out "$OUT" ${BENCH_ARGS:-} || status=1
           step bench_hvp 300 "$PY" benchmarks/bench_hvp.py --device cuda --out "$OUT/hvp_gpu" || status=1 ;;
    recording) step recording 420 "$PY" benchmarks/recording.py --device cuda --sizes 10,100 --rounds 3 --steps 3 --rss-steps 12 \
                 --out "$OUT/recording_gpu" || status=1 ;;
    *) log "unknown step '$s' (steps: build nvcc cuda triton bench recording)"; status=1 ;;
  esac
done
log "done: overall exit $status; results in $OUT"
exit $status
