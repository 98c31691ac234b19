#!/usr/bin/env bash
# One-shot GPU verification for a short lease on a CUDA machine (CI has no GPU): build the CUDA
# extension against the machine's torch, then for each part asked for (default: all) run the GPU tests or
# time the ops against their peers. Logs (at most 8 files) go to ${OUT:-gpu_check_out}. bitsandbytes may be
# unpacked into .devpkgs/ (no package index on the GPU machine).
# Usage: bash bench/gpu_check.sh [tests] [lora] [neftune] [train] [demo] [suite] [probe]
#   tests: every GPU test file in one pytest run; lora: bench_lora_gpu.py with the per-kernel breakdown of the
#   auto path; train: bench_train_gpu.py without and with checkpointing; demo: `fastlora demo --device cuda`
#   (medium preset, bf16, 40 steps); suite: the kernels suite (training sizes on a GPU), its crossover;
#   probe (not in the default): which reciprocal bitsandbytes' CUDA quantizer uses.
# One device call: 376 s on an H100 on 2026-11-27 (before the demo part), 352 s on an H200 (tests lora neftune train
# demo, without suite); each part is capped by its timeout.
set -u -o pipefail
OUT=${OUT:-gpu_check_out}
PARTS=${*:-tests lora neftune train demo suite}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1 PYTHONPATH="$PWD:$PWD/.devpkgs" FASTLORA_TRITON_AUTOTUNE=${FASTLORA_TRITON_AUTOTUNE:-0}
ln -sfn ../kernels fastlora/kernels  # what setup.py's package_dir does for an installed wheel
start=$(date +%s)
stamp() { echo "== $1 at $(( $(date +%s) - start )) s"; }
build() {  # $1: the log; CC / CXX from the environment pick the compilers (torch passes CC to nvcc as -ccbin)
  FASTLORA_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=16 \
    timeout 150 python3 setup.py build_ext --inplace >"$1" 2>&1 || tail -30 "$1"
}
build "$OUT/build.log"
stamp build
grep -m1 -o "^[^ ]*g++" "$OUT/build.log" | head -1 | xargs -r -I{} sh -c '{} --version | head -1'
python3 -c "import torch; print(torch.__config__.show().splitlines()[1].strip())"
python3 -m fastlora info 2>&1
# Bad input must raise, not kill the process (SIGSEGV seen on 2026-11-26/27 with the image's /opt/gcc build). If the
# repro still fails, rebuild with the system compiler and try again (the rest of the run then uses that build).
if timeout 30 python3 tests/gpu_repro_bad_rows.py >/tmp/repro.log 2>&1; then
  echo "bad-input repro: $(tail -1 /tmp/repro.log)"
else
  echo "bad-input repro FAILED (exit $?):"; tail -6 /tmp/repro.log
  if [ -x /usr/bin/g++ ] && [ -x /usr/bin/gcc ]; then
    echo "rebuilding with $(/usr/bin/g++ --version | head -1)"
    rm -rf build fastlora/_C*.so
    CC=/usr/bin/gcc CXX=/usr/bin/g++ build /tmp/build_system_gcc.log
    timeout 30 python3 tests/gpu_repro_bad_rows.py 2>&1 | tail -3
  fi
fi
stamp "bad-input repro"
case " $PARTS " in *" probe "*)
  timeout 60 python3 bench/gpu_probe_reciprocal.py 2>&1 | tee "$OUT/probe_reciprocal.log" | tail -16
  stamp "reciprocal probe"
esac
case " $PARTS " in *" tests "*)
  # the float32 NF4 bytes that still differ from bitsandbytes' CUDA quantizer, element by element (a few seconds)
  timeout 40 python3 bench/gpu_probe_reciprocal.py --diagnose --trials 2 2>&1 | tail -14
  timeout 260 python3 -m pytest -q -p no:cacheprovider -n 8 -rfE tests/test_gpu.py tests/test_gpu_patch.py \
    tests/test_cuda_lora.py tests/test_cuda_dequantize.py tests/test_cuda_neftune.py tests/test_triton_neftune.py \
    tests/test_triton_lora.py tests/test_adapter_gemms.py \
    -k "not emulated and not compiles and not nvcc" 2>&1 | tee "$OUT/tests.log" | tail -25
  stamp tests
esac
case " $PARTS " in *" lora "*)
  timeout 90 python3 bench/bench_lora_gpu.py --quick --profile fastlora-auto 2>&1 | tee "$OUT/bench_lora.log" | tail -16
  # A/B of the adapter GEMMs at training sizes: fp32 GEMMs on fp32 copies (the path before 2026-11-27's second
  # lease) against the default bf16 pieces (kernels/adapter_gemms.py)
  echo "== FASTLORA_ADAPTER_GEMMS=fp32" | tee -a "$OUT/bench_lora.log"
  FASTLORA_ADAPTER_GEMMS=fp32 timeout 40 python3 bench/bench_lora_gpu.py --quick --rows 4096 \
    --impls fastlora-auto,cublas,peft-bnb 2>&1 | tee -a "$OUT/bench_lora.log" | tail -6
  stamp "lora bench"
esac
case " $PARTS " in *" neftune "*)
  timeout 40 python3 bench/bench_neftune_gpu.py --iters 20 --profile fastlora-op,fastlora-cuda-checked,lookup 2>&1 \
    | tee "$OUT/bench_neftune.log" | tail -45
  stamp "neftune bench"
esac
case " $PARTS " in *" train "*)
  timeout 60 python3 bench/bench_train_gpu.py 2>&1 | tee "$OUT/bench_train.log" | tail -8
  timeout 60 python3 bench/bench_train_gpu.py --checkpointing 2>&1 | tee -a "$OUT/bench_train.log" | tail -6
  stamp "train bench"
esac
case " $PARTS " in *" demo "*)
  timeout 120 python3 -m fastlora demo --device cuda --preset medium --dtype bf16 --steps 40 --output /tmp/demo_gpu \
    2>&1 | tee "$OUT/demo.log" | tail -14
  stamp demo
esac
case " $PARTS " in *" suite "*)
  timeout 90 python3 -m fastlora bench --suite kernels --device cuda --dtype bf16 --no-reference --seconds 0.05 \
    --results /tmp/gpu_check_results 2>&1 | tee "$OUT/suite_kernels.log" | tail -24
  FASTLORA_TUNED_DIR="$OUT/tuned" timeout 30 python3 -m fastlora bench --suite kernels --device cuda --crossover \
    --save-tuned --seconds 0.05 --results /tmp/gpu_check_results 2>&1 | tail -12
  stamp "kernels suite + crossover"
esac
