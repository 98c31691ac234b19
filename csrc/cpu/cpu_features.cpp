#include "cpu_features.h"

#include <cstdlib>

namespace fastlora::cpu {

bool has_avx2_fma_f16c() {
  // FASTLORA_DISABLE_AVX2=1 forces the portable path (used by the tests to cover both).
  const char* off = std::getenv("FASTLORA_DISABLE_AVX2");
  if (off != nullptr && off[0] != '\0' && off[0] != '0') return false;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
#else
  return false;
#endif
}

bool has_native_bf16() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool ok = __builtin_cpu_supports("avx512bf16") != 0 || __builtin_cpu_supports("amx-bf16") != 0;
  return ok;
#else
  return false;
#endif
}

bool use_bf16_gemm() {
  const char* env = std::getenv("FASTLORA_CPU_BF16_GEMM");
  if (env != nullptr && env[0] != '\0') return env[0] != '0';
  return has_native_bf16();
}

std::vector<std::string> cpu_features() {
  std::vector<std::string> out;
  if (has_avx2_fma_f16c()) {
    out.emplace_back("avx2");
    out.emplace_back("fma");
    out.emplace_back("f16c");
  } else {
    out.emplace_back("portable");
  }
  if (has_native_bf16()) out.emplace_back("native-bf16");
  if (use_bf16_gemm()) out.emplace_back("bf16-gemm");
#ifdef _OPENMP
  out.emplace_back("openmp");
#endif
  return out;
}

}  // namespace fastlora::cpu
