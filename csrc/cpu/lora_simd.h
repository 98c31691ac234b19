// Element helpers of the LoRA CPU kernels: load / store / round of fp32, bf16 and fp16 values, one
// element at a time (portable) and eight at a time (AVX2, compiled with a target attribute and only
// called after the run-time check in cpu_features.h). Both give the same bits for every non-NaN
// value: round to nearest even, exactly as torch's .to(dtype) and quant4.h's conversions.
#pragma once

#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#include "fastlora/quant4.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace fastlora::cpu {

// A floating dtype as the kernels see it (templates are instantiated per dtype).
enum class DT : int { F32 = 0, BF16 = 1, F16 = 2 };

// ---- portable, one element ----------------------------------------------------------------------

inline float float_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

template <DT d>
inline float load1(const void* p, int64_t i) {
  if constexpr (d == DT::F32) {
    return static_cast<const float*>(p)[i];
  } else if constexpr (d == DT::BF16) {
    return float_from_bits(static_cast<uint32_t>(static_cast<const uint16_t*>(p)[i]) << 16);
  } else {
    return c10::detail::fp16_ieee_to_fp32_value(static_cast<const uint16_t*>(p)[i]);
  }
}

template <DT d>
inline void store1(void* p, int64_t i, float v) {
  if constexpr (d == DT::F32) {
    static_cast<float*>(p)[i] = v;
  } else if constexpr (d == DT::BF16) {
    static_cast<uint16_t*>(p)[i] = float_to_bf16_bits(v);
  } else {
    static_cast<uint16_t*>(p)[i] = float_to_fp16_bits(v);
  }
}

// v rounded to dtype d (round to nearest even) and widened back to fp32 (exact).
template <DT d>
inline float round1(float v) {
  if constexpr (d == DT::F32) {
    return v;
  } else if constexpr (d == DT::BF16) {
    return float_from_bits(static_cast<uint32_t>(float_to_bf16_bits(v)) << 16);
  } else {
    return c10::detail::fp16_ieee_to_fp32_value(float_to_fp16_bits(v));
  }
}

// ---- AVX2, eight elements -----------------------------------------------------------------------

#if defined(__x86_64__)
#ifndef FL_AVX2
#define FL_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

// fp32 -> bf16 bits (in the low half of each 32-bit lane), round to nearest even; NaN stays NaN.
FL_AVX2 inline __m256i bf16_rne_bits8(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded =
      _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  const __m256i quiet_nan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(rounded, quiet_nan, is_nan);
}

template <DT d>
FL_AVX2 inline __m256 load8(const void* p, int64_t i) {
  if constexpr (d == DT::F32) {
    return _mm256_loadu_ps(static_cast<const float*>(p) + i);
  } else if constexpr (d == DT::BF16) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
    return _mm256_cvtph_ps(h);
  }
}

template <DT d>
FL_AVX2 inline void store8(void* p, int64_t i, __m256 v) {
  if constexpr (d == DT::F32) {
    _mm256_storeu_ps(static_cast<float*>(p) + i, v);
  } else if constexpr (d == DT::BF16) {
    const __m256i bits = bf16_rne_bits8(v);
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(p) + i), packed);
  } else {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(p) + i),
                     _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
}

template <DT d>
FL_AVX2 inline __m256 round8(__m256 v) {
  if constexpr (d == DT::F32) {
    return v;
  } else if constexpr (d == DT::BF16) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_rne_bits8(v), 16));
  } else {
    return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
}
#endif  // __x86_64__

}  // namespace fastlora::cpu
