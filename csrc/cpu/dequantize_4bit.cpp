// C++ CPU kernels of fastlora::dequantize_4bit and fastlora::dequantize_absmax.
//
// The weight is decoded block by block (one absmax per block); threads take contiguous runs of
// blocks. The AVX2 path computes each block's 16 possible outputs once (code * absmax, rounded to
// the output dtype) and then only looks them up: fp32 with two in-register 8-entry table permutes
// per 8 elements, bf16 / fp16 with vpshufb on byte planes of the 16-bit results, 64 elements per
// step (quant4_avx2.h); the portable path is the shared per-element math in quant4.h, which is
// also what the AVX2 path must equal bit for bit (the tests compare both with bitsandbytes).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cmath>

#include "cpu_features.h"
#include "fastlora/quant4.h"
#include "fastlora/checks.h"
#include "quant4_avx2.h"

namespace fastlora::cpu {
namespace {

enum class Out { F32, BF16, F16 };

template <Out kind>
inline void store_scalar(void* out, int64_t i, float v) {
  if constexpr (kind == Out::F32) {
    static_cast<float*>(out)[i] = v;
  } else if constexpr (kind == Out::BF16) {
    static_cast<uint16_t*>(out)[i] = float_to_bf16_bits(v);
  } else {
    static_cast<uint16_t*>(out)[i] = float_to_fp16_bits(v);
  }
}

template <Out kind>
void dequant_blocks_portable(const uint8_t* packed, const float* absmax, int64_t blocksize, int qt,
                             int64_t numel, int64_t block_begin, int64_t block_end, void* out) {
  for (int64_t b = block_begin; b < block_end; ++b) {
    const float scale = absmax[b];
    const int64_t end = std::min(numel, (b + 1) * blocksize);
    for (int64_t i = b * blocksize; i < end; ++i) {
      const uint32_t byte = packed[i >> 1];
      const uint32_t q = (i & 1) ? (byte & 0xfu) : (byte >> 4);
      store_scalar<kind>(out, i, code_value(qt, q) * scale);
    }
  }
}

#if defined(__x86_64__)
// FL_AVX2 (the target attribute), lookup16 and the decode runs come from quant4_avx2.h.
template <Out kind>
FL_AVX2 void dequant_blocks_avx2(const uint8_t* packed, const float* absmax, int64_t blocksize, int qt,
                                 int64_t numel, int64_t block_begin, int64_t block_end, void* out) {
  alignas(32) float table[16];
  for (uint32_t q = 0; q < 16; ++q) table[q] = code_value(qt, q);
  const __m256 table_lo = _mm256_load_ps(table);
  const __m256 table_hi = _mm256_load_ps(table + 8);
  for (int64_t b = block_begin; b < block_end; ++b) {
    // The block's 16 possible outputs, code * absmax in fp32 (rounded below for 16-bit outputs):
    // every element with nibble j gets exactly entry j, so the loops only look values up.
    const __m256 scale = _mm256_set1_ps(absmax[b]);
    const __m256 value_lo = _mm256_mul_ps(table_lo, scale);
    const __m256 value_hi = _mm256_mul_ps(table_hi, scale);
    const int64_t begin = b * blocksize;
    const int64_t end = std::min(numel, begin + blocksize);
    int64_t i = begin;  // even: blocksize is a power of two >= 32
    if constexpr (kind == Out::F32) {
      i += decode_run_f32(packed + (i >> 1), value_lo, value_hi, static_cast<float*>(out) + i, end - i);
    } else {
      // bf16 / fp16: vpshufb lookups in byte planes of the 16 rounded 16-bit values (quant4_avx2.h).
      const Planes16 planes = kind == Out::BF16 ? planes16_bf16(value_lo, value_hi, std::isfinite(absmax[b]))
                                                : planes16_fp16(value_lo, value_hi);
      i += decode_run_planes16(packed + (i >> 1), planes, static_cast<uint16_t*>(out) + i, end - i);
    }
    const float s = absmax[b];
    for (; i < end; ++i) {
      const uint32_t byte = packed[i >> 1];
      const uint32_t q = (i & 1) ? (byte & 0xfu) : (byte >> 4);
      store_scalar<kind>(out, i, table[q] * s);
    }
  }
}
#endif  // __x86_64__

template <Out kind>
void dequant_dispatch(const uint8_t* packed, const float* absmax, int64_t blocksize, int qt, int64_t numel,
                      void* out) {
  const int64_t blocks = (numel + blocksize - 1) / blocksize;
  // ~64K elements per task: enough work to amortise the fork, small enough to balance 2+ cores.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / blocksize);
#if defined(__x86_64__)
  const bool avx2 = has_avx2_fma_f16c();
#else
  const bool avx2 = false;
#endif
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
#if defined(__x86_64__)
    if (avx2) {
      dequant_blocks_avx2<kind>(packed, absmax, blocksize, qt, numel, b0, b1, out);
      return;
    }
#endif
    dequant_blocks_portable<kind>(packed, absmax, blocksize, qt, numel, b0, b1, out);
  });
}

// Decodes into `out` (contiguous, checked by the caller): its numel and dtype say what to produce.
void dequantize_into(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize, int qt, at::Tensor& out) {
  const int64_t numel = out.numel();
  if (numel == 0) return;
  const at::Tensor p = packed.contiguous();
  const at::Tensor a = absmax.contiguous();
  const uint8_t* pp = p.data_ptr<uint8_t>();
  const float* ap = a.data_ptr<float>();
  switch (out.scalar_type()) {
    case at::kFloat: dequant_dispatch<Out::F32>(pp, ap, blocksize, qt, numel, out.data_ptr()); break;
    case at::kBFloat16: dequant_dispatch<Out::BF16>(pp, ap, blocksize, qt, numel, out.data_ptr()); break;
    default: dequant_dispatch<Out::F16>(pp, ap, blocksize, qt, numel, out.data_ptr()); break;
  }
}

at::Tensor dequantize_4bit_cpu(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                               c10::string_view quant_type, int64_t numel, at::ScalarType dtype) {
  const int qt = check_quant_type(quant_type);
  check_dequantize_args(packed, absmax, blocksize, numel, dtype, at::kCPU);
  at::Tensor out = at::empty({numel}, packed.options().dtype(dtype));
  dequantize_into(packed, absmax, blocksize, qt, out);
  return out;
}

void dequantize_4bit_into_cpu(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                              c10::string_view quant_type, at::Tensor out) {
  const int qt = check_quant_type(quant_type);
  FASTLORA_CHECK_VALUE(out.is_contiguous(), "out must be contiguous");
  check_dequantize_args(packed, absmax, blocksize, out.numel(), out.scalar_type(), at::kCPU);
  check_device(out, "out", at::kCPU);
  dequantize_into(packed, absmax, blocksize, qt, out);
}

at::Tensor dequantize_absmax_cpu(const at::Tensor& qabsmax, const at::Tensor& code, const at::Tensor& absmax2,
                                 const at::Tensor& offset, int64_t blocksize) {
  check_dequantize_absmax_args(qabsmax, code, absmax2, offset, blocksize, at::kCPU);
  const int64_t n = qabsmax.numel();
  at::Tensor out = at::empty({n}, qabsmax.options().dtype(at::kFloat));
  const at::Tensor q = qabsmax.contiguous();
  const at::Tensor c = code.contiguous();
  const at::Tensor a2 = absmax2.contiguous();
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const float* cp = c.data_ptr<float>();
  const float* a2p = a2.data_ptr<float>();
  const float off = offset.item<float>();
  float* op = out.data_ptr<float>();
  const int64_t blocks = (n + blocksize - 1) / blocksize;
  // ~20 ns per 256-element block: a 14336x4096 weight's 917504 statistics take ~80 us on one thread, so
  // only much larger inputs are worth waking the pool (a fork/join on a busy machine costs more).
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 20) / blocksize);
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float a2 = a2p[b];
      const int64_t end = std::min(n, (b + 1) * blocksize);
      for (int64_t i = b * blocksize; i < end; ++i) op[i] = nested_absmax(cp[qp[i]], a2, off);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlora, CPU, m) {
  m.impl("dequantize_4bit", &dequantize_4bit_cpu);
  m.impl("dequantize_4bit_into", &dequantize_4bit_into_cpu);
  m.impl("dequantize_absmax", &dequantize_absmax_cpu);
}

}  // namespace fastlora::cpu
