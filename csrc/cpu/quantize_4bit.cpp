// C++ CPU kernels of fastlora::quantize_4bit and fastlora::quantize_absmax, bit-exact with
// bitsandbytes' CPU quantization:
//  * 4-bit: absmax per block; full blocks scale by x * (1 / absmax), a trailing partial block by
//    x / absmax (bitsandbytes does exactly this); clamp to [-1, 1]; the code is the bucket of the
//    sorted table's midpoints with ties going to the lower bucket.
//  * 8-bit (the nested statistics): x / absmax, nearest entry of the 256-entry code with the
//    search treating code[0] as -1 and ties going left.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "fastlora/checks.h"
#include "fastlora/quant4.h"

namespace fastlora::cpu {
namespace {

template <typename T>
inline float load_float(const T* p, int64_t i) {
  return static_cast<float>(p[i]);
}

struct Midpoints {
  float value[15];
  uint8_t code[16];
  explicit Midpoints(int qt) {
    float sorted[16];
    for (uint32_t k = 0; k < 16; ++k) {
      code[k] = static_cast<uint8_t>(sorted_code(qt, k));
      sorted[k] = code_value(qt, code[k]);
    }
    for (int k = 0; k < 15; ++k) value[k] = (sorted[k] + sorted[k + 1]) / 2.0f;
  }
  inline uint8_t encode(float scaled) const {
    int bucket = 0;
    for (int k = 0; k < 15; ++k) bucket += value[k] < scaled;
    return code[bucket];
  }
};

template <typename T>
void quantize_4bit_kernel(const T* w, int64_t numel, int64_t blocksize, int qt, uint8_t* packed, float* absmax) {
  const Midpoints mid(qt);
  const int64_t blocks = (numel + blocksize - 1) / blocksize;
  const int64_t full_blocks = numel / blocksize;
  at::parallel_for(0, blocks, std::max<int64_t>(1, 16384 / blocksize), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t begin = b * blocksize;
      const int64_t end = std::min(numel, begin + blocksize);
      float amax = 0.0f;
      for (int64_t i = begin; i < end; ++i) amax = std::max(amax, std::fabs(load_float(w, i)));
      absmax[b] = amax;
      const float denom = std::max(amax, 1e-38f);
      const float recip = 1.0f / denom;
      const bool full = b < full_blocks;
      for (int64_t i = begin; i < end; i += 2) {
        const float x0 = load_float(w, i);
        const float s0 = std::min(1.0f, std::max(-1.0f, full ? x0 * recip : x0 / denom));
        uint8_t byte = static_cast<uint8_t>(mid.encode(s0) << 4);
        if (i + 1 < end) {
          const float x1 = load_float(w, i + 1);
          const float s1 = std::min(1.0f, std::max(-1.0f, full ? x1 * recip : x1 / denom));
          byte |= mid.encode(s1);
        } else {
          byte |= mid.encode(0.0f);  // odd element count: bitsandbytes pads with a zero
        }
        packed[i >> 1] = byte;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> quantize_4bit_cpu(const at::Tensor& weight, int64_t blocksize,
                                                     c10::string_view quant_type) {
  const int qt = check_quant_type(quant_type);
  check_blocksize(blocksize, "blocksize");
  check_device(weight, "weight", at::kCPU);
  const auto dt = weight.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
                   "weight must be float32, bfloat16 or float16, got ", dt);
  const at::Tensor w = weight.contiguous();
  const int64_t numel = w.numel();
  at::Tensor packed = at::empty({(numel + 1) / 2}, w.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({(numel + blocksize - 1) / blocksize}, w.options().dtype(at::kFloat));
  if (numel == 0) return {packed, absmax};
  uint8_t* pp = packed.data_ptr<uint8_t>();
  float* ap = absmax.data_ptr<float>();
  if (dt == at::kFloat) {
    quantize_4bit_kernel(w.data_ptr<float>(), numel, blocksize, qt, pp, ap);
  } else if (dt == at::kBFloat16) {
    quantize_4bit_kernel(w.data_ptr<at::BFloat16>(), numel, blocksize, qt, pp, ap);
  } else {
    quantize_4bit_kernel(w.data_ptr<at::Half>(), numel, blocksize, qt, pp, ap);
  }
  return {packed, absmax};
}

std::tuple<at::Tensor, at::Tensor> quantize_absmax_cpu(const at::Tensor& values, const at::Tensor& code,
                                                       int64_t blocksize) {
  TORCH_CHECK_VALUE(blocksize > 0, "blocksize must be positive, got ", blocksize);
  TORCH_CHECK_TYPE(values.scalar_type() == at::kFloat, "values must be float32, got ", values.scalar_type());
  TORCH_CHECK_TYPE(code.scalar_type() == at::kFloat, "code must be float32, got ", code.scalar_type());
  TORCH_CHECK_VALUE(code.numel() == 256, "code must have 256 entries, got ", code.numel());
  check_device(values, "values", at::kCPU);
  check_device(code, "code", at::kCPU);
  const at::Tensor v = values.contiguous();
  const int64_t n = v.numel();
  const int64_t blocks = (n + blocksize - 1) / blocksize;
  at::Tensor q = at::empty({n}, v.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({blocks}, v.options().dtype(at::kFloat));
  float table[256];
  std::copy_n(code.contiguous().data_ptr<float>(), 256, table);
  table[0] = -1.0f;  // the search range must cover [-1, 1]
  const float* vp = v.data_ptr<float>();
  uint8_t* qp = q.data_ptr<uint8_t>();
  float* ap = absmax.data_ptr<float>();
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t begin = b * blocksize;
      const int64_t end = std::min(n, begin + blocksize);
      float amax = -std::numeric_limits<float>::max();
      for (int64_t i = begin; i < end; ++i) amax = std::fmax(amax, std::fabs(vp[i]));
      ap[b] = amax;
      for (int64_t i = begin; i < end; ++i) {
        const float x = vp[i] / amax;
        if (std::isnan(x)) {  // 0 / 0 in an all-zero block: bitsandbytes' search yields code 0
          qp[i] = 0;
          continue;
        }
        // Largest k with table[k] <= x (0 if none), then step right only when strictly closer.
        int64_t k = std::upper_bound(table, table + 256, x) - table - 1;
        k = std::max<int64_t>(k, 0);
        if (k < 255 && std::fabs(x - table[k + 1]) < std::fabs(x - table[k])) ++k;
        qp[i] = static_cast<uint8_t>(k);
      }
    }
  });
  return {q, absmax};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlora, CPU, m) {
  m.impl("quantize_4bit", &quantize_4bit_cpu);
  m.impl("quantize_absmax", &quantize_absmax_cpu);
}

}  // namespace fastlora::cpu
