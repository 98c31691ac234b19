#!/usr/bin/env bash
# One-shot GPU verification of the NEFTune embedding kernels for a short lease on a CUDA machine (CI has no
# GPU): build the CUDA extension against the machine's torch, run the NEFTune CUDA + Triton tests compiled on
# the GPU (bitwise vs the contract), then the benchmark vs the plain lookup and the HF hook.
# Logs go to ${OUT:-gpu_check_out}. Usage: bash bench/gpu_check_neftune.sh   (about 5 minutes on an H100)
set -u -o pipefail
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$PWD/.devpkgs"
ln -sfn ../kernels fastlora/kernels  # what setup.py's package_dir does for an installed wheel
start=$(date +%s)
stamp() { echo "== $1 at $(( $(date +%s) - start )) s"; }
FASTLORA_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=16 \
  timeout 150 python3 setup.py build_ext --inplace >"$OUT/build.log" 2>&1 || tail -30 "$OUT/build.log"
stamp build
timeout 120 python3 -m pytest -q -p no:cacheprovider -rfs tests/test_cuda_neftune.py tests/test_triton_neftune.py \
  -k "not emulated and not nvcc" 2>&1 | tee "$OUT/tests_neftune.log" | tail -15
stamp tests
timeout 90 python3 bench/bench_neftune_gpu.py --iters 20 2>&1 | tee "$OUT/bench_neftune.log" | tail -20
stamp bench
