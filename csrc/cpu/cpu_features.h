// Run-time CPU feature detection: the AVX2 kernels are compiled with target attributes and chosen
// only when the processor has them, so one build runs on any x86-64 (and non-x86) machine.
#pragma once

#include <string>
#include <vector>

namespace fastlora::cpu {

bool has_avx2_fma_f16c();
std::vector<std::string> cpu_features();

}  // namespace fastlora::cpu
