// C++ CPU kernel of fastlora::lora_dropout: x * scale where Philox keeps the element, else 0,
// rounded to x's dtype; bit for bit the rule in include/fastlora/philox.h.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "cpu_features.h"
#include "fastlora/checks.h"
#include "fastlora/philox.h"
#include "lora_cpu.h"
#include "lora_elementwise.h"
#include "lora_philox.h"

namespace fastlora::cpu {

DT float_dt(at::ScalarType t) {
  return t == at::kFloat ? DT::F32 : (t == at::kBFloat16 ? DT::BF16 : DT::F16);
}

void check_dropout_p(double p, const char* name) {
  FASTLORA_CHECK_VALUE(p >= 0.0 && p < 1.0, name, " must be in [0, 1), got ", p);
}

namespace {

template <DT X>
void dropout_kernel(const void* in, void* out, int64_t numel, double p, uint64_t seed) {
  const uint32_t threshold = dropout_threshold(p);
  const float scale = dropout_scale(p);
  const bool avx2 = has_avx2_fma_f16c();
  constexpr int64_t elem = X == DT::F32 ? 4 : 2;
  const int64_t chunks = (numel + kMaskChunk - 1) / kMaskChunk;
  at::parallel_for(0, chunks, 64, [&](int64_t c0, int64_t c1) {
    alignas(32) uint32_t mask[kMaskChunk];
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t e0 = c * kMaskChunk;
      const int64_t n = std::min(kMaskChunk, numel - e0);
      dropout_mask(seed, threshold, e0, n, mask, avx2);
      dropout_apply<X, X, X>(static_cast<const char*>(in) + e0 * elem, static_cast<char*>(out) + e0 * elem, mask,
                             scale, n, avx2);
    }
  });
}

at::Tensor lora_dropout_cpu(const at::Tensor& x, double p, const at::Tensor& seed) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_float_tensor(x, "x");
  check_dropout_p(p, "p");
  check_device(x, "x", at::kCPU);
  const uint64_t s = read_cpu_seed(seed);
  if (p == 0.0) return x.clone();
  const at::Tensor xc = x.detach().contiguous();
  at::Tensor out = at::empty_like(xc, at::MemoryFormat::Contiguous);
  const int64_t numel = xc.numel();
  if (numel == 0) return out;
  switch (float_dt(xc.scalar_type())) {
    case DT::F32: dropout_kernel<DT::F32>(xc.data_ptr(), out.data_ptr(), numel, p, s); break;
    case DT::BF16: dropout_kernel<DT::BF16>(xc.data_ptr(), out.data_ptr(), numel, p, s); break;
    case DT::F16: dropout_kernel<DT::F16>(xc.data_ptr(), out.data_ptr(), numel, p, s); break;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlora, CPU, m) {
  m.impl("lora_dropout", &lora_dropout_cpu);
}

}  // namespace fastlora::cpu
