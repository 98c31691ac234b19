// C++ CPU kernel of fastlora::neftune_embedding: the embedding lookup and the NEFTune noise in one
// pass, no noise tensor. For token t and column j (element i = t*d + j):
//   u   = float((int32)philox_half(seed, i, kStreamNeftune) - 2^15) * 2^-15   (exact, [-1, 1))
//   out = round_to(W, float(weight[ids[t], j]) + rnd_f32(u * mag[t]))        (no FMA)
// and rows with mag[t] == 0 are a plain copy; bit for bit fastlora/reference_neftune.py.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "cpu_features.h"
#include "fastlora/checks.h"
#include "fastlora/philox.h"
#include "lora_cpu.h"
#include "lora_philox.h"
#include "lora_simd.h"

namespace fastlora::cpu {
namespace {

constexpr float kTwoPowMinus15 = 1.0f / 32768.0f;

template <DT W>
void noisy_row_scalar(const void* wrow, void* orow, const uint32_t* words, int64_t odd, float mag, int64_t j,
                      int64_t n) {
  for (; j < n; ++j) {
    // element j of a chunk whose first element has parity `odd`: half odd + j of the words generated for it
    const float u = static_cast<float>(static_cast<int32_t>(half_of_words(words, odd + j)) - 32768) * kTwoPowMinus15;
    const float noise = u * mag;
    store1<W>(orow, j, load1<W>(wrow, j) + noise);
  }
}

#if defined(__x86_64__)
template <DT W>
FL_AVX2 void noisy_row_avx2(const void* wrow, void* orow, const uint32_t* words, int64_t odd, float mag,
                            int64_t n) {
  // x86 is little-endian: the low half of a word, the even element, comes first in memory.
  const uint16_t* halves = reinterpret_cast<const uint16_t*>(words) + odd;
  const __m256i offset = _mm256_set1_epi32(32768);
  const __m256 scale = _mm256_set1_ps(kTwoPowMinus15);
  const __m256 magv = _mm256_set1_ps(mag);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(halves + j));
    const __m256i k = _mm256_sub_epi32(_mm256_cvtepu16_epi32(h), offset);
    const __m256 u = _mm256_mul_ps(_mm256_cvtepi32_ps(k), scale);  // exact: |k| <= 2^15
    const __m256 noise = _mm256_mul_ps(u, magv);                     // rounded
    store8<W>(orow, j, _mm256_add_ps(load8<W>(wrow, j), noise));    // rounded, then RNE to W
  }
  noisy_row_scalar<W>(wrow, orow, words, odd, mag, j, n);
}
#endif

template <DT W>
void neftune_kernel(const int64_t* ids, const char* weight, const float* mag, char* out, int64_t tokens, int64_t d,
                    uint64_t seed) {
  constexpr int64_t elem = W == DT::F32 ? 4 : 2;
  const bool avx2 = has_avx2_fma_f16c();
  const int64_t row_bytes = d * elem;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(d, 1));
  at::parallel_for(0, tokens, grain, [&](int64_t t0, int64_t t1) {
    alignas(32) uint32_t words[kMaskChunk];
    for (int64_t t = t0; t < t1; ++t) {
      const char* wrow = weight + ids[t] * row_bytes;
      char* orow = out + t * row_bytes;
      const float m = mag[t];
      if (m == 0.0f) {
        std::memcpy(orow, wrow, static_cast<size_t>(row_bytes));
        continue;
      }
      for (int64_t j0 = 0; j0 < d; j0 += kMaskChunk) {
        const int64_t n = std::min(kMaskChunk, d - j0);
        // the words holding the 16-bit halves of elements i0 .. i0 + n - 1 (word w: elements 2w, 2w + 1)
        const int64_t i0 = t * d + j0, odd = i0 & 1;
        philox_words(seed, kStreamNeftune, i0 >> 1, (odd + n + 1) >> 1, words, avx2);
        const char* src = wrow + j0 * elem;
        char* dst = orow + j0 * elem;
#if defined(__x86_64__)
        if (avx2) {
          noisy_row_avx2<W>(src, dst, words, odd, m, n);
          continue;
        }
#endif
        noisy_row_scalar<W>(src, dst, words, odd, m, 0, n);
      }
    }
  });
}

at::Tensor neftune_embedding_cpu(const at::Tensor& ids, const at::Tensor& weight, const at::Tensor& mag,
                                 const at::Tensor& seed) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  FASTLORA_CHECK_TYPE(ids.scalar_type() == at::kLong, "ids must be int64, got ", ids.scalar_type());
  FASTLORA_CHECK_VALUE(ids.dim() == 1, "ids must be 1-D (T,) flat token ids, got shape ", ids.sizes());
  check_float_tensor(weight, "weight");
  FASTLORA_CHECK_VALUE(weight.dim() == 2, "weight must be 2-D (V, d), got shape ", weight.sizes());
  FASTLORA_CHECK_TYPE(mag.scalar_type() == at::kFloat, "mag must be float32, got ", mag.scalar_type());
  FASTLORA_CHECK_VALUE(mag.dim() == 1 && mag.size(0) == ids.size(0), "mag must be (T,) = (", ids.size(0),
                       ",), got shape ", mag.sizes());
  const uint64_t s = read_cpu_seed(seed);
  check_device(ids, "ids", at::kCPU);
  check_device(weight, "weight", at::kCPU);
  check_device(mag, "mag", at::kCPU);
  const at::Tensor idc = ids.contiguous();
  const at::Tensor wc = weight.detach().contiguous();
  const at::Tensor mc = mag.contiguous();
  const int64_t tokens = idc.size(0), vocab = wc.size(0), d = wc.size(1);
  const int64_t* id = idc.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) {
    FASTLORA_CHECK_VALUE(id[t] >= 0 && id[t] < vocab, "input_ids must be in [0, ", vocab,
                         ") (the rows of weight), got ", id[t], " at position ", t);
  }
  at::Tensor out = at::empty({tokens, d}, wc.options().memory_format(at::MemoryFormat::Contiguous));
  if (tokens == 0 || d == 0) return out;
  const char* w = static_cast<const char*>(wc.data_ptr());
  char* o = static_cast<char*>(out.data_ptr());
  const float* m = mc.data_ptr<float>();
  switch (float_dt(wc.scalar_type())) {
    case DT::F32: neftune_kernel<DT::F32>(id, w, m, o, tokens, d, s); break;
    case DT::BF16: neftune_kernel<DT::BF16>(id, w, m, o, tokens, d, s); break;
    case DT::F16: neftune_kernel<DT::F16>(id, w, m, o, tokens, d, s); break;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlora, CPU, m) {
  m.impl("neftune_embedding", &neftune_embedding_cpu);
}

}  // namespace fastlora::cpu
