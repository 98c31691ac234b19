// C++ CPU kernels of fastlora::quantize_4bit and fastlora::quantize_absmax, bit-exact with
// bitsandbytes' CPU quantization:
//  * 4-bit: absmax per block; full blocks scale by x * (1 / absmax), a trailing partial block by
//    x / absmax (bitsandbytes does exactly this); clamp to [-1, 1]; the code is the bucket of the
//    sorted table's midpoints with ties going to the lower bucket.
//  * 8-bit (the nested statistics): bitsandbytes' CPU quantizer (0.50) does not search the code per
//    value; it rounds x * (1 / absmax) to a uniform 65536-point grid over [-1, 1] and reads the code
//    entry of that grid point from a table (see AbsmaxGrid). fastlora does the same arithmetic so that
//    the stored bytes are identical; the result is the nearest entry except within half a grid step
//    (~1.5e-5) of a midpoint between two entries.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <memory>

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
  FASTLORA_CHECK_TYPE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
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

// The code entry of each point of bitsandbytes' 65536-point grid over [-1, 1] (kept identical to
// fastlora/reference.py absmax_code_lut; compatibility, not accuracy, is the goal). Grid point k is
// fp32(2k / 65535) - 1; its entry is the first j whose fp32 midpoint (code[j] + code[j+1]) * 0.5 is
// not below it (255 if none), the code taken as given. A scan that only moves forward gives that
// because the grid increases. All fp32 operations are single, correctly rounded ones (the build
// disables contraction), so the table is the same on every machine.
struct AbsmaxGrid {
  static constexpr int kPoints = 65536;
  uint8_t entry[kPoints];
  explicit AbsmaxGrid(const float* code) {
    float mid[255];
    for (int j = 0; j < 255; ++j) mid[j] = (code[j] + code[j + 1]) * 0.5f;
    int j = 0;
    for (int k = 0; k < kPoints; ++k) {
      const float g = static_cast<float>(k + k) / static_cast<float>(kPoints - 1) - 1.0f;
      while (j < 255 && mid[j] < g) ++j;
      entry[k] = static_cast<uint8_t>(j);
    }
  }
  // Grid point of a normalised value: clamp to [-1, 1], t = (v + 1) * 0.5 in fp32, then
  // trunc(t * 65535 + 0.5) with the multiply-add rounded once, as bitsandbytes' build fuses it.
  // In fp64 t * 65535 is exact and so is + 0.5 wherever the truncation can reach 1, so one fp64
  // multiply-add plus the cast to fp32 is that fused operation, without needing FMA hardware.
  // NaN (0 * inf under a subnormal absmax) goes to point 0, where bitsandbytes' conversion sends it.
  static inline int point(float v) {
    if (std::isnan(v)) return 0;
    v = v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v);
    const float t = (v + 1.0f) * 0.5f;
    const float p = static_cast<float>(static_cast<double>(t) * (kPoints - 1.0) + 0.5);
    return static_cast<int>(p);
  }
};

std::tuple<at::Tensor, at::Tensor> quantize_absmax_cpu(const at::Tensor& values, const at::Tensor& code,
                                                       int64_t blocksize) {
  FASTLORA_CHECK_VALUE(blocksize > 0, "blocksize must be positive, got ", blocksize);
  FASTLORA_CHECK_TYPE(values.scalar_type() == at::kFloat, "values must be float32, got ", values.scalar_type());
  FASTLORA_CHECK_TYPE(code.scalar_type() == at::kFloat, "code must be float32, got ", code.scalar_type());
  FASTLORA_CHECK_VALUE(code.numel() == 256, "code must have 256 entries, got ", code.numel());
  check_device(values, "values", at::kCPU);
  check_device(code, "code", at::kCPU);
  const at::Tensor v = values.contiguous();
  const int64_t n = v.numel();
  const int64_t blocks = (n + blocksize - 1) / blocksize;
  at::Tensor q = at::empty({n}, v.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({blocks}, v.options().dtype(at::kFloat));
  if (n == 0) return {q, absmax};
  const auto grid = std::make_unique<AbsmaxGrid>(code.contiguous().data_ptr<float>());
  const float* vp = v.data_ptr<float>();
  uint8_t* qp = q.data_ptr<uint8_t>();
  float* ap = absmax.data_ptr<float>();
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t begin = b * blocksize;
      const int64_t end = std::min(n, begin + blocksize);
      float amax = 0.0f;
      for (int64_t i = begin; i < end; ++i) amax = std::fmax(amax, std::fabs(vp[i]));
      ap[b] = amax;
      if (amax == 0.0f) {  // an all-zero block: bitsandbytes stores code 0
        std::fill(qp + begin, qp + end, uint8_t{0});
        continue;
      }
      const float inv = 1.0f / amax;  // bitsandbytes multiplies by the reciprocal, in every block
      for (int64_t i = begin; i < end; ++i) qp[i] = grid->entry[AbsmaxGrid::point(vp[i] * inv)];
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
