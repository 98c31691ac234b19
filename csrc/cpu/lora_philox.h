// LoRA dropout masks (and raw Philox words, for NEFTune) on the CPU: Philox4x32-10 (include/fastlora/philox.h) evaluated for a run of
// consecutive elements, eight Philox blocks (32 elements) per AVX2 step, one block at a time on the
// portable path. Both produce the same bits as philox.h's scalar definition.
#pragma once

#include <cstdint>

namespace fastlora::cpu {

// mask[i] = 0xffffffff if LoRA dropout with this threshold keeps element e0 + i (row-major index
// into the tensor being dropped out, stream kStreamLoraDropout), else 0; for i in [0, len).
// avx2 selects the vectorised path (the caller has checked has_avx2_fma_f16c()).
void dropout_mask(uint64_t seed, uint32_t threshold, int64_t e0, int64_t len, uint32_t* mask, bool avx2);

// words[i] = the Philox4x32-10 word of element e0 + i on `stream` (philox.h: word (e & 3) of block
// e >> 2), for i in [0, len). Used by NEFTune (stream kStreamNeftune).
void philox_words(uint64_t seed, uint32_t stream, int64_t e0, int64_t len, uint32_t* words, bool avx2);

// Elements per chunk the kernels generate a mask for at a time (a stack buffer).
constexpr int64_t kMaskChunk = 512;

}  // namespace fastlora::cpu
