// Per-element math of the bitsandbytes 4-bit format, shared by the C++ CPU kernels and the CUDA
// kernels so that the CPU tests exercise exactly the arithmetic the GPU runs.
//
// Facts (see shared/DESIGN.md §2):
//  * element i of the row-major weight lives in byte i/2; even i in the HIGH nibble.
//  * w[i] = round(TABLE[nibble] * absmax[i / blocksize]) with one round-to-nearest-even cast.
//  * double quant: absmax[b] = fp32(fp32(code8[q[b]] * absmax2[b / 256]) + offset), two separate
//    roundings. The helpers below use mul_rn / add_rn so that no compiler contracts them into an
//    FMA (the CPU build also passes -ffp-contract=off).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FL_HD __host__ __device__ __forceinline__
#else
#define FL_HD inline
#endif

namespace fastlora {

enum QuantType : int { kNF4 = 0, kFP4 = 1 };

// Values of the NF4 code book, index -> value (bitsandbytes' get_4bit_type("nf4")).
// A select tree instead of an array: on the GPU a dynamically indexed local array would live in
// local memory; the tree is a handful of register selects.
FL_HD float nf4_value(uint32_t q) {
  const float lo = (q & 8)
      ? ((q & 4) ? ((q & 2) ? ((q & 1) ? 1.0f : 0.7229568362236023f)
                            : ((q & 1) ? 0.5626170039176941f : 0.44070982933044434f))
                 : ((q & 2) ? ((q & 1) ? 0.33791524171829224f : 0.24611230194568634f)
                            : ((q & 1) ? 0.16093020141124725f : 0.07958029955625534f)))
      : ((q & 4) ? ((q & 2) ? ((q & 1) ? 0.0f : -0.09105003625154495f)
                            : ((q & 1) ? -0.18477343022823334f : -0.28444138169288635f))
                 : ((q & 2) ? ((q & 1) ? -0.39491748809814453f : -0.5250730514526367f)
                            : ((q & 1) ? -0.6961928009986877f : -1.0f)));
  return lo;
}

// FP4 (e2m1, bitsandbytes variant): bit 3 is the sign, the magnitudes are
// {0, 0.0625, 8, 12, 4, 6, 2, 3} / 12 for the low three bits.
FL_HD float fp4_value(uint32_t q) {
  const uint32_t m = q & 7u;
  const float mag = (m & 4) ? ((m & 2) ? ((m & 1) ? 3.0f : 2.0f) : ((m & 1) ? 6.0f : 4.0f))
                            : ((m & 2) ? ((m & 1) ? 12.0f : 8.0f) : ((m & 1) ? 0.0625f : 0.0f));
  // Division by 12 happens once here, in fp32, as bitsandbytes builds its table: value/12.
  const float v = mag / 12.0f;
  // Code 8 decodes to -0, as bitsandbytes' native CPU and CUDA kernels do (its torch fallback
  // table holds +0 there; the two compare equal).
  return (q & 8) ? -v : v;
}

FL_HD float code_value(int quant_type, uint32_t q) {
  return quant_type == kNF4 ? nf4_value(q) : fp4_value(q);
}

// The code of the k-th smallest FP4 value. bitsandbytes quantizes by bucketizing against the
// midpoints of the sorted table and mapping back through torch.argsort's order, which puts +0
// (code 0) before -0 (code 8): small negative inputs get code 0, small positive ones code 8.
FL_HD uint32_t fp4_sorted_code(uint32_t k) {
  constexpr uint32_t kOrderLo = 0x09efcdabu;  // k = 0..7 -> 11, 10, 13, 12, 15, 14, 9, 0
  constexpr uint32_t kOrderHi = 0x32547618u;  // k = 8..15 -> 8, 1, 6, 7, 4, 5, 2, 3
  return ((k < 8 ? kOrderLo : kOrderHi) >> (4 * (k & 7))) & 0xfu;
}

// The code of the k-th smallest value of the table (NF4's table is already sorted).
FL_HD uint32_t sorted_code(int quant_type, uint32_t k) {
  return quant_type == kNF4 ? k : fp4_sorted_code(k);
}

FL_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

FL_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// Nested (double-quant) statistics: the 8-bit code of block b's absmax, scaled by its
// second-level absmax, then shifted by the mean that was subtracted before quantizing.
FL_HD float nested_absmax(float code8_value, float absmax2, float offset) {
  return add_rn(mul_rn(code8_value, absmax2), offset);
}

FL_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

// fp32 -> bf16 bits, round to nearest even; NaN stays a (quiet) NaN.
FL_HD uint16_t float_to_bf16_bits(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// fp32 -> IEEE half bits, round to nearest even, with subnormals, overflow to inf, NaN kept.
FL_HD uint16_t float_to_fp16_bits(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (abs < 0x38800000u) {
    // Result is subnormal (or zero) in half: value / 2^-24 rounded to an integer, RNE.
    if (abs < 0x33000000u) return static_cast<uint16_t>(sign);  // < 2^-25: rounds to zero
    const uint32_t exp = abs >> 23;
    const uint32_t mant = (abs & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - exp;  // 14..24 for exp in [102, 112]
    uint32_t h = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (h & 1u))) h += 1u;
    return static_cast<uint16_t>(sign | h);
  }
  // Normal: rebias exponent (127 -> 15) and round the 23-bit mantissa to 10 bits, RNE.
  uint32_t h = abs - 0x38000000u;
  h += 0xfffu + ((h >> 13) & 1u);
  return static_cast<uint16_t>(sign | (h >> 13));
}

}  // namespace fastlora
