#include "lora_philox.h"

#include <algorithm>

#include "fastlora/philox.h"
#include "lora_simd.h"

namespace fastlora::cpu {
namespace {

inline uint32_t keep_bits(uint32_t word, uint32_t threshold) {
  return dropout_keep(word, threshold) ? 0xffffffffu : 0u;
}

// Elements [e0 + i, e0 + end), one Philox block at a time: out[i] = the raw word (kRaw) or the
// dropout keep mask.
template <bool kRaw>
inline int64_t scalar_blocks(uint64_t seed, uint32_t stream, uint32_t threshold, int64_t e0, int64_t i, int64_t end,
                             uint32_t* out) {
  while (i < end) {
    const uint64_t e = static_cast<uint64_t>(e0 + i);
    const Philox4 r = philox4x32_10(seed, e >> 2, stream);
    for (uint32_t w = static_cast<uint32_t>(e & 3); w < 4 && i < end; ++w, ++i) {
      out[i] = kRaw ? r.w[w] : keep_bits(r.w[w], threshold);
    }
  }
  return i;
}

#if defined(__x86_64__)
// Philox on AVX2 with one block per 64-bit lane, four blocks per register: the 32-bit state words
// live in the low half of each lane (the high half is don't-care: _mm256_mul_epu32 reads only the
// low halves, and XOR keeps the halves apart), so a round is 2 multiplies, 2 shifts and 4 XORs.
// G register groups (4G blocks) run interleaved to hide the multiply latency.
// kRaw: store the words themselves (any stream); else the dropout keep mask of stream 0.
template <int G, bool kRaw>
FL_AVX2 inline void philox_groups(uint64_t seed, uint32_t stream, uint64_t n, __m256i threshold_minus_1,
                                  uint32_t* mask) {
  __m256i c0[G], c1[G], c2[G], c3[G];
  const __m256i lane = _mm256_setr_epi64x(0, 1, 2, 3);
  for (int g = 0; g < G; ++g) {
    const __m256i ctr = _mm256_add_epi64(_mm256_set1_epi64x(static_cast<long long>(n + 4 * g)), lane);
    c0[g] = ctr;  // low half: lo32(n + j)
    c1[g] = _mm256_srli_epi64(ctr, 32);
    c2[g] = _mm256_set1_epi64x(stream);
    c3[g] = _mm256_setzero_si256();
  }
  const __m256i m0 = _mm256_set1_epi64x(kPhiloxM0);
  const __m256i m1 = _mm256_set1_epi64x(kPhiloxM1);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const __m256i key0 = _mm256_set1_epi64x(k0), key1 = _mm256_set1_epi64x(k1);
    for (int g = 0; g < G; ++g) {
      const __m256i p0 = _mm256_mul_epu32(c0[g], m0);  // (hi0, lo0)
      const __m256i p1 = _mm256_mul_epu32(c2[g], m1);  // (hi1, lo1)
      c0[g] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p1, 32), c1[g]), key0);
      c1[g] = p1;
      c2[g] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p0, 32), c3[g]), key1);
      c3[g] = p0;
    }
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  for (int g = 0; g < G; ++g) {
    // Lane j: words (w0, w1) and (w2, w3) of block n + 4g + j -> elements in row-major order.
    const __m256i w01 = _mm256_blend_epi32(c0[g], _mm256_slli_epi64(c1[g], 32), 0xaa);
    const __m256i w23 = _mm256_blend_epi32(c2[g], _mm256_slli_epi64(c3[g], 32), 0xaa);
    const __m256i lo = _mm256_unpacklo_epi64(w01, w23);  // block 0 | block 2
    const __m256i hi = _mm256_unpackhi_epi64(w01, w23);  // block 1 | block 3
    const __m256i words[2] = {_mm256_permute2x128_si256(lo, hi, 0x20), _mm256_permute2x128_si256(lo, hi, 0x31)};
    for (int h = 0; h < 2; ++h) {
      if constexpr (kRaw) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(mask + 16 * g + 8 * h), words[h]);
        continue;
      }
      // keep iff (word >> 8) >= threshold; both sides < 2^31, so a signed compare is exact.
      const __m256i keep = _mm256_cmpgt_epi32(_mm256_srli_epi32(words[h], 8), threshold_minus_1);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(mask + 16 * g + 8 * h), keep);
    }
  }
}

template <bool kRaw>
FL_AVX2 void philox_run_avx2(uint64_t seed, uint32_t stream, uint32_t threshold, int64_t e0, int64_t len,
                             uint32_t* out) {
  // Head up to the next Philox block boundary, then 128 and 16 elements at a time.
  int64_t i = scalar_blocks<kRaw>(seed, stream, threshold, e0, 0, std::min<int64_t>(len, (4 - (e0 & 3)) & 3), out);
  const __m256i tm1 = _mm256_set1_epi32(static_cast<int>(threshold) - 1);
  for (; i + 128 <= len; i += 128) {
    philox_groups<8, kRaw>(seed, stream, static_cast<uint64_t>(e0 + i) >> 2, tm1, out + i);
  }
  for (; i + 16 <= len; i += 16) philox_groups<1, kRaw>(seed, stream, static_cast<uint64_t>(e0 + i) >> 2, tm1, out + i);
  scalar_blocks<kRaw>(seed, stream, threshold, e0, i, len, out);
}
#endif

}  // namespace

void dropout_mask(uint64_t seed, uint32_t threshold, int64_t e0, int64_t len, uint32_t* mask, bool avx2) {
#if defined(__x86_64__)
  if (avx2) {
    philox_run_avx2<false>(seed, kStreamLoraDropout, threshold, e0, len, mask);
    return;
  }
#else
  (void)avx2;
#endif
  scalar_blocks<false>(seed, kStreamLoraDropout, threshold, e0, 0, len, mask);
}

void philox_words(uint64_t seed, uint32_t stream, int64_t e0, int64_t len, uint32_t* words, bool avx2) {
#if defined(__x86_64__)
  if (avx2) {
    philox_run_avx2<true>(seed, stream, 0, e0, len, words);
    return;
  }
#else
  (void)avx2;
#endif
  scalar_blocks<true>(seed, stream, 0, e0, 0, len, words);
}

}  // namespace fastlora::cpu
