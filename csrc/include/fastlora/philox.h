// Counter-based randomness shared by the C++ CPU and CUDA kernels (the Triton kernels and the torch
// reference implement the same function; the tests compare all of them bit for bit).
//
// Philox4x32-10 (Salmon et al., SC'11):
//   key     = (lo32(seed), hi32(seed))
//   counter = (lo32(n), hi32(n), stream, 0)
//   10 rounds of  (hi0, lo0) = 0xD2511F53 * c0,  (hi1, lo1) = 0xCD9E8D57 * c2   (32x32 -> 64 bit)
//                 (c0, c1, c2, c3) = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)
//                 k0 += 0x9E3779B9, k1 += 0xBB67AE85
//   -> four 32-bit words.
//
// Element i of a random tensor (row-major linear index) uses word (i & 3) of the block n = i >> 2,
// so one Philox evaluation serves four consecutive elements; a stream read in 16-bit halves (NEFTune noise,
// philox_half below) serves eight: element i is half i & 1 of word (i >> 1) & 3 of block i >> 3.
//
// LoRA dropout (stream 0): element i is kept iff (word >> 8) >= threshold, with
//   threshold = ceil(p * 2^24)                     (P(keep) = 1 - threshold / 2^24)
//   kept value = round_to(dtype, x * scale),  scale = (float)(1.0 / (1.0 - p))   (both in double)
// dropout_threshold / dropout_scale below are the one definition; fastlora/reference.py mirrors it.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FL_PHILOX_HD __host__ __device__ __forceinline__
#else
#define FL_PHILOX_HD inline
#endif

namespace fastlora {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;

// Random streams: independent sequences for the same seed.
constexpr uint32_t kStreamLoraDropout = 0;
constexpr uint32_t kStreamNeftune = 1;

struct Philox4 {
  uint32_t w[4];
};

FL_PHILOX_HD Philox4 philox4x32_10(uint64_t seed, uint64_t n, uint32_t stream) {
  uint32_t c0 = static_cast<uint32_t>(n), c1 = static_cast<uint32_t>(n >> 32), c2 = stream, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// The 32-bit random word of element i.
FL_PHILOX_HD uint32_t philox_word(uint64_t seed, uint64_t i, uint32_t stream) {
  return philox4x32_10(seed, i >> 2, stream).w[i & 3];
}

// The 16 random bits of element i of a stream read in halves (NEFTune): half i & 1 (low first) of word
// (i >> 1) & 3 of block i >> 3, so one Philox evaluation serves eight elements. half_of_words: half h of
// consecutive words (h counted from the low half of words[0]); half_of: element e (0..7) of one block.
FL_PHILOX_HD uint32_t half_of_words(const uint32_t* words, int64_t h) {
  return (words[h >> 1] >> (16 * (h & 1))) & 0xffffu;
}
FL_PHILOX_HD uint32_t half_of(const Philox4& r, int e) { return half_of_words(r.w, e & 7); }
FL_PHILOX_HD uint32_t philox_half(uint64_t seed, uint64_t i, uint32_t stream) {
  return half_of(philox4x32_10(seed, i >> 3, stream), static_cast<int>(i & 7));
}

// Host-side constants of LoRA dropout with probability p in [0, 1).
inline uint32_t dropout_threshold(double p) { return static_cast<uint32_t>(std::ceil(p * 16777216.0)); }
inline float dropout_scale(double p) { return static_cast<float>(1.0 / (1.0 - p)); }

FL_PHILOX_HD bool dropout_keep(uint32_t word, uint32_t threshold) { return (word >> 8) >= threshold; }

}  // namespace fastlora
