#!/usr/bin/env bash
# One-shot GPU verification for a short lease on a CUDA machine (CI has no GPU): build the CUDA
# extension against the machine's torch, then for each part asked for (default: both) time the ops
# against their peers and run the GPU tests. Logs go to ${OUT:-gpu_check_out}. bitsandbytes may be
# unpacked into .devpkgs/ (no package index on the GPU machine).
# Usage: bash bench/gpu_check.sh [lora] [neftune] [suite]   (suite: the kernels suite on the GPU, its crossover)
set -u -o pipefail
OUT=${OUT:-gpu_check_out}
PARTS=${*:-lora neftune suite}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$PWD/.devpkgs" FASTLORA_TRITON_AUTOTUNE=${FASTLORA_TRITON_AUTOTUNE:-0}
ln -sfn ../kernels fastlora/kernels  # what setup.py's package_dir does for an installed wheel
start=$(date +%s)
stamp() { echo "== $1 at $(( $(date +%s) - start )) s"; }
FASTLORA_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=16 \
  timeout 150 python3 setup.py build_ext --inplace >"$OUT/build.log" 2>&1 || tail -30 "$OUT/build.log"
stamp build
case " $PARTS " in *" lora "*)
  timeout 120 python3 bench/bench_lora_gpu.py --quick 2>&1 | tee "$OUT/bench_lora.log" | tail -16
  stamp "lora bench"
  timeout 60 python3 tests/gpu_repro_bad_rows.py 2>&1 | tail -5 \
    || timeout 90 cuda-gdb -q -batch -ex run -ex bt --args python3 tests/gpu_repro_bad_rows.py 2>&1 | tail -25
  stamp "lora repro"
  timeout 150 python3 -m pytest -q -p no:cacheprovider -n 8 -rf tests/test_gpu.py tests/test_cuda_lora.py \
    -k "not emulated and not compiles" 2>&1 | tee "$OUT/tests.log" | tail -12
  stamp "lora tests"
esac
case " $PARTS " in *" neftune "*)
  timeout 120 python3 -m pytest -q -p no:cacheprovider -rfs tests/test_cuda_neftune.py tests/test_triton_neftune.py \
    -k "not emulated and not nvcc" 2>&1 | tee "$OUT/tests_neftune.log" | tail -15
  stamp "neftune tests"
  timeout 90 python3 bench/bench_neftune_gpu.py --iters 20 2>&1 | tee "$OUT/bench_neftune.log" | tail -20
  stamp "neftune bench"
esac
case " $PARTS " in *" suite "*)
  timeout 150 python3 -m fastlora bench --suite kernels --device cuda --dtype bf16 --no-reference --seconds 0.2 \
    --results "$OUT/results" 2>&1 | tee "$OUT/suite_kernels.log" | tail -24
  FASTLORA_TUNED_DIR="$OUT/tuned" timeout 120 python3 -m fastlora bench --suite kernels --device cuda --crossover \
    --save-tuned --seconds 0.1 --results "$OUT/results" 2>&1 | tee "$OUT/suite_crossover.log" | tail -8
  stamp "kernels suite + crossover"
esac
