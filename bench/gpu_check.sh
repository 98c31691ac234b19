#!/usr/bin/env bash
# One-shot GPU verification for a short lease on a CUDA machine (the project's CI has no GPU):
# build the CUDA extension against the machine's torch, then run every GPU test and the GPU
# benchmarks, writing logs to ${OUT:-gpu_check_out}. Usage: bash bench/gpu_check.sh [--no-bench]
set -u -o pipefail
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# bitsandbytes may be unpacked into .devpkgs/ (no package index on the GPU machine).
[ -d .devpkgs ] && export PYTHONPATH="$PWD/.devpkgs${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
start=$(date +%s)
FASTLORA_BUILD_CUDA=1 MAX_JOBS=16 python3 setup.py build_ext --inplace >"$OUT/build.log" 2>&1
echo "build rc=$? in $(( $(date +%s) - start )) s"; tail -3 "$OUT/build.log"
python3 -m fastlora info 2>&1 | tee "$OUT/info.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_cuda_dequantize.py tests/test_cuda_lora.py \
  -x --timeout 300 2>&1 | tee "$OUT/tests.log" | tail -25
if [ "${1:-}" != "--no-bench" ]; then
  python3 bench/bench_lora_gpu.py --quick 2>&1 | tee "$OUT/bench_lora_gpu.txt" | tail -40
fi
echo "total $(( $(date +%s) - start )) s"
