// AVX2 table-lookup decode of packed 4-bit codes, shared by dequantize_4bit.cpp and lora_linear.cpp:
// fp32 outputs by two 8-entry permutes (lookup16), 16-bit outputs (bf16 / fp16 bits) by byte planes.
//
// Every element of an absmax block with nibble j decodes to the same value rnd(code[j] * absmax),
// so a kernel computes those 16 values once per block (in fp32, rounded exactly as the per-element
// path would) and then only looks them up: the 16 16-bit results are split into a low-byte and a
// high-byte 16-entry table, each broadcast to both 128-bit lanes, and vpshufb with the nibbles as
// indices gives the two bytes of 32 outputs per instruction pair; a byte interleave forms the
// 16-bit values. Bit-exact with the per-element math by construction (same product, same rounding).
//
// Layout facts: element 2k lives in the HIGH nibble of packed byte k, element 2k+1 in the low one.
#pragma once

#if defined(__x86_64__)
#include <immintrin.h>

#include <cstdint>

#ifndef FL_AVX2
#define FL_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

namespace fastlora::cpu {

// Entry idx (0..15, one per 32-bit lane) of the 16-entry fp32 table (table_lo = entries 0..7,
// table_hi = 8..15). permutevar uses the low three bits; bit 3 picks the upper half of the table.
FL_AVX2 inline __m256 lookup16(__m256 table_lo, __m256 table_hi, __m256i idx) {
  const __m256 lo = _mm256_permutevar8x32_ps(table_lo, idx);
  const __m256 hi = _mm256_permutevar8x32_ps(table_hi, idx);
  return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

// Decodes the first n - n % 32 elements of the packed bytes at p (the first element a high nibble)
// into out as entries of the fp32 table (value_lo, value_hi); returns how many it decoded.
FL_AVX2 inline int64_t decode_run_f32(const uint8_t* p, __m256 value_lo, __m256 value_hi, float* out, int64_t n) {
  const __m128i low_nibble = _mm_set1_epi8(0x0f);
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + (i >> 1)));
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low_nibble);
    const __m128i lo = _mm_and_si128(bytes, low_nibble);
    const __m128i first = _mm_unpacklo_epi8(hi, lo);   // codes of elements i .. i+15 in order
    const __m128i second = _mm_unpackhi_epi8(hi, lo);  // i+16 .. i+31
    _mm256_storeu_ps(out + i, lookup16(value_lo, value_hi, _mm256_cvtepu8_epi32(first)));
    _mm256_storeu_ps(out + i + 8, lookup16(value_lo, value_hi, _mm256_cvtepu8_epi32(_mm_srli_si128(first, 8))));
    _mm256_storeu_ps(out + i + 16, lookup16(value_lo, value_hi, _mm256_cvtepu8_epi32(second)));
    _mm256_storeu_ps(out + i + 24, lookup16(value_lo, value_hi, _mm256_cvtepu8_epi32(_mm_srli_si128(second, 8))));
  }
  return i;
}

// Byte-plane tables of 16 16-bit values, each plane (16 bytes, entry j = byte of value j) in both
// 128-bit lanes, as vpshufb wants them.
struct Planes16 {
  __m256i lo, hi;
};

// fp32 bits rounded to nearest even at bit 16, so that their high halves are the bf16 bits of v
// (quant4.h's float_to_bf16_bits); a NaN keeps its high half with the quiet bit set.
FL_AVX2 inline __m256i bf16_rne_high(__m256 v, bool may_be_nan) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
  if (!may_be_nan) return rounded;
  const __m256i quiet_nan = _mm256_or_si256(u, _mm256_set1_epi32(0x400000));
  return _mm256_blendv_epi8(rounded, quiet_nan, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
}

// The planes of the 16 values a (values 0..7) and b (8..15) rounded to bf16. A product of a code
// and a finite absmax is never NaN (it may overflow to inf, which the rounding handles), so only a
// non-finite absmax needs the NaN select.
FL_AVX2 inline Planes16 planes16_bf16(__m256 a, __m256 b, bool finite_scale) {
  const __m256i ra = bf16_rne_high(a, !finite_scale), rb = bf16_rne_high(b, !finite_scale);
  // Bytes 2 (low plane) and 3 (high plane) of each dword: a's to dwords 0, 1 of its lane, b's to
  // dwords 2, 3; lane 0 = lo(0-3), hi(0-3), lo(8-11), hi(8-11); lane 1 = the same of 4-7, 12-15.
  const __m256i pick_a = _mm256_setr_epi8(2, 6, 10, 14, 3, 7, 11, 15, -1, -1, -1, -1, -1, -1, -1, -1,  //
                                          2, 6, 10, 14, 3, 7, 11, 15, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m256i pick_b = _mm256_setr_epi8(-1, -1, -1, -1, -1, -1, -1, -1, 2, 6, 10, 14, 3, 7, 11, 15,  //
                                          -1, -1, -1, -1, -1, -1, -1, -1, 2, 6, 10, 14, 3, 7, 11, 15);
  const __m256i s = _mm256_or_si256(_mm256_shuffle_epi8(ra, pick_a), _mm256_shuffle_epi8(rb, pick_b));
  return {_mm256_permutevar8x32_epi32(s, _mm256_setr_epi32(0, 4, 2, 6, 0, 4, 2, 6)),
          _mm256_permutevar8x32_epi32(s, _mm256_setr_epi32(1, 5, 3, 7, 1, 5, 3, 7))};
}

// The planes of the 16 values a (values 0..7) and b (8..15) rounded to fp16.
FL_AVX2 inline Planes16 planes16_fp16(__m256 a, __m256 b) {
  const __m128i ha = _mm256_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m128i hb = _mm256_cvtps_ph(b, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // Lane 0 = values 0..7, lane 1 = 8..15; per lane their low bytes, then their high bytes: dwords
  // 0, 1 = lo(0-7), 2, 3 = hi(0-7), 4, 5 = lo(8-15), 6, 7 = hi(8-15).
  const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,  //
                                         0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  const __m256i s = _mm256_shuffle_epi8(_mm256_inserti128_si256(_mm256_castsi128_si256(ha), hb, 1), split);
  return {_mm256_permutevar8x32_epi32(s, _mm256_setr_epi32(0, 1, 4, 5, 0, 1, 4, 5)),
          _mm256_permutevar8x32_epi32(s, _mm256_setr_epi32(2, 3, 6, 7, 2, 3, 6, 7))};
}

// Decodes the 64 elements of the 32 packed bytes at p (the first one a high nibble) into out[0, 64).
FL_AVX2 inline void decode64_planes16(const uint8_t* p, const Planes16& t, uint16_t* out) {
  const __m256i nib = _mm256_set1_epi8(0x0f);
  // Dwords (4 packed bytes = 8 elements each) to lane 0 = d0 d2 d4 d6, lane 1 = d1 d3 d5 d7: after
  // the in-lane interleaves below, every 256-bit result holds 16 consecutive outputs in order.
  const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)),
                                                    _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7));
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), nib);
  const __m256i lo = _mm256_and_si256(bytes, nib);
  const __m256i ia = _mm256_unpacklo_epi8(hi, lo);  // lane 0: codes of 0..7, 16..23; lane 1: 8..15, 24..31
  const __m256i ib = _mm256_unpackhi_epi8(hi, lo);  // lane 0: 32..39, 48..55; lane 1: 40..47, 56..63
  const __m256i la = _mm256_shuffle_epi8(t.lo, ia), ha = _mm256_shuffle_epi8(t.hi, ia);
  const __m256i lb = _mm256_shuffle_epi8(t.lo, ib), hb = _mm256_shuffle_epi8(t.hi, ib);
  __m256i* o = reinterpret_cast<__m256i*>(out);
  _mm256_storeu_si256(o, _mm256_unpacklo_epi8(la, ha));
  _mm256_storeu_si256(o + 1, _mm256_unpackhi_epi8(la, ha));
  _mm256_storeu_si256(o + 2, _mm256_unpacklo_epi8(lb, hb));
  _mm256_storeu_si256(o + 3, _mm256_unpackhi_epi8(lb, hb));
}

// Decodes the 32 elements of the 16 packed bytes at p (the first one a high nibble) into out[0, 32).
FL_AVX2 inline void decode32_planes16(const uint8_t* p, const Planes16& t, uint16_t* out) {
  const __m128i nib = _mm_set1_epi8(0x0f);
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), nib);
  const __m128i lo = _mm_and_si128(bytes, nib);
  const __m128i ia = _mm_unpacklo_epi8(hi, lo);  // codes of 0..15
  const __m128i ib = _mm_unpackhi_epi8(hi, lo);  // 16..31
  const __m128i tlo = _mm256_castsi256_si128(t.lo), thi = _mm256_castsi256_si128(t.hi);
  const __m128i la = _mm_shuffle_epi8(tlo, ia), ha = _mm_shuffle_epi8(thi, ia);
  const __m128i lb = _mm_shuffle_epi8(tlo, ib), hb = _mm_shuffle_epi8(thi, ib);
  __m128i* o = reinterpret_cast<__m128i*>(out);
  _mm_storeu_si128(o, _mm_unpacklo_epi8(la, ha));
  _mm_storeu_si128(o + 1, _mm_unpackhi_epi8(la, ha));
  _mm_storeu_si128(o + 2, _mm_unpacklo_epi8(lb, hb));
  _mm_storeu_si128(o + 3, _mm_unpackhi_epi8(lb, hb));
}

// Decodes the first n - n % 32 elements of the packed bytes at p (the first element a high nibble)
// into out through the planes t, 64 at a time; returns how many it decoded.
FL_AVX2 inline int64_t decode_run_planes16(const uint8_t* p, const Planes16& t, uint16_t* out, int64_t n) {
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) decode64_planes16(p + (i >> 1), t, out + i);
  if (i + 32 <= n) {
    decode32_planes16(p + (i >> 1), t, out + i);
    i += 32;
  }
  return i;
}

}  // namespace fastlora::cpu
#endif  // __x86_64__
