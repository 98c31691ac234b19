// Shared declarations of the LoRA CPU kernels (lora_dropout.cpp, lora_linear.cpp).
#pragma once

#include <ATen/ATen.h>

#include "fastlora/checks.h"
#include "lora_simd.h"

namespace fastlora::cpu {

DT float_dt(at::ScalarType t);

// TypeError unless t is float32 / bfloat16 / float16 (float64 runs on the reference backend).
inline void check_float_tensor(const at::Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  FASTLORA_CHECK_TYPE(s == at::kFloat || s == at::kBFloat16 || s == at::kHalf, name,
                      " must be float32, bfloat16 or float16 for the cpp backend (float64 runs on the reference "
                      "backend), got ", s);
}

// ValueError unless 0 <= p < 1 (NaN included).
void check_dropout_p(double p, const char* name);

}  // namespace fastlora::cpu
