// Run-time CPU feature detection: the AVX2 kernels are compiled with target attributes and chosen
// only when the processor has them, so one build runs on any x86-64 (and non-x86) machine.
#pragma once

#include <string>
#include <vector>

namespace fastlora::cpu {

bool has_avx2_fma_f16c();

// Whether the CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16), so that torch's bf16 GEMM
// (oneDNN) is several times faster than its fp32 GEMM.
bool has_native_bf16();

// Whether the LoRA kernels run their big GEMMs in bf16 for bf16 x: has_native_bf16(), unless
// FASTLORA_CPU_BF16_GEMM=0 / 1 forces it off / on (read on every call; the tests cover both modes).
bool use_bf16_gemm();
std::vector<std::string> cpu_features();

}  // namespace fastlora::cpu
