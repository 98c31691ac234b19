#!/usr/bin/env bash
# One-shot GPU verification for a short lease on a CUDA machine (CI has no GPU): build the CUDA
# extension against the machine's torch, time the LoRA op against its peers, then run the GPU
# tests. Logs go to ${OUT:-gpu_check_out}. bitsandbytes may be unpacked into .devpkgs/ (no package
# index on the GPU machine). Usage: bash bench/gpu_check.sh
set -u -o pipefail
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$PWD/.devpkgs" FASTLORA_TRITON_AUTOTUNE=${FASTLORA_TRITON_AUTOTUNE:-0}
ln -sfn ../kernels fastlora/kernels  # what setup.py's package_dir does for an installed wheel
start=$(date +%s)
stamp() { echo "== $1 at $(( $(date +%s) - start )) s"; }
FASTLORA_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=16 \
  timeout 150 python3 setup.py build_ext --inplace >"$OUT/build.log" 2>&1 || tail -30 "$OUT/build.log"
stamp build
timeout 120 python3 bench/bench_lora_gpu.py --quick 2>&1 | tee "$OUT/bench_lora.log" | tail -16
stamp bench
timeout 60 python3 tests/gpu_repro_bad_rows.py 2>&1 | tail -5 \
  || timeout 90 cuda-gdb -q -batch -ex run -ex bt --args python3 tests/gpu_repro_bad_rows.py 2>&1 | tail -25
stamp repro
timeout 150 python3 -m pytest -q -p no:cacheprovider -n 8 -rf tests/test_gpu.py tests/test_cuda_lora.py \
  -k "not emulated and not compiles" 2>&1 | tee "$OUT/tests.log" | tail -12
stamp tests
