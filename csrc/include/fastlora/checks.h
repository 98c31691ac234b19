// Argument checks shared by the CPU and CUDA launchers (host code only). They raise ValueError /
// TypeError in Python (FASTLORA_CHECK_VALUE / FASTLORA_CHECK_TYPE, message.h) and name the offending argument; the
// Python API checks first with friendlier messages, these guard direct torch.ops calls.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "fastlora/message.h"

namespace fastlora {

inline int check_quant_type(c10::string_view quant_type) {
  if (quant_type == "nf4") return 0;
  if (quant_type == "fp4") return 1;
  FASTLORA_CHECK_VALUE(false, "quant_type must be 'nf4' or 'fp4', got '", std::string(quant_type), "'");
  return -1;
}

inline void check_blocksize(int64_t blocksize, const char* name) {
  FASTLORA_CHECK_VALUE(blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0, name,
                       " must be a power of two in [32, 4096], got ", blocksize);
}

inline void check_device(const at::Tensor& t, const char* name, c10::DeviceType device) {
  FASTLORA_CHECK_VALUE(t.device().type() == device, name, " must be on ", c10::DeviceTypeName(device),
                       " for this kernel, got ", t.device());
}

inline void check_dequantize_args(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                                  int64_t numel, at::ScalarType dtype, c10::DeviceType device) {
  check_blocksize(blocksize, "blocksize");
  FASTLORA_CHECK_VALUE(numel >= 0, "numel must be >= 0, got ", numel);
  FASTLORA_CHECK_TYPE(packed.scalar_type() == at::kByte,
                      "packed must be uint8 (view other quant_storage as uint8), got ", packed.scalar_type());
  FASTLORA_CHECK_TYPE(absmax.scalar_type() == at::kFloat, "absmax must be float32, got ", absmax.scalar_type());
  FASTLORA_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                      "dtype must be float32, bfloat16 or float16, got ", dtype);
  FASTLORA_CHECK_VALUE(packed.numel() == (numel + 1) / 2, "packed must hold ceil(numel/2) = ", (numel + 1) / 2,
                       " bytes for numel=", numel, ", got ", packed.numel());
  FASTLORA_CHECK_VALUE(absmax.numel() == (numel + blocksize - 1) / blocksize,
                       "absmax must hold ceil(numel/blocksize) = ", (numel + blocksize - 1) / blocksize,
                       " values for numel=", numel, ", blocksize=", blocksize, ", got ", absmax.numel());
  check_device(packed, "packed", device);
  check_device(absmax, "absmax", device);
}

inline void check_dequantize_absmax_args(const at::Tensor& qabsmax, const at::Tensor& code, const at::Tensor& absmax2,
                                         const at::Tensor& offset, int64_t blocksize, c10::DeviceType device) {
  FASTLORA_CHECK_VALUE(blocksize > 0, "blocksize (nested) must be positive, got ", blocksize);
  FASTLORA_CHECK_TYPE(qabsmax.scalar_type() == at::kByte, "qabsmax must be uint8, got ", qabsmax.scalar_type());
  FASTLORA_CHECK_TYPE(code.scalar_type() == at::kFloat, "code must be float32, got ", code.scalar_type());
  FASTLORA_CHECK_TYPE(absmax2.scalar_type() == at::kFloat, "absmax2 must be float32, got ", absmax2.scalar_type());
  FASTLORA_CHECK_TYPE(offset.scalar_type() == at::kFloat, "offset must be float32, got ", offset.scalar_type());
  FASTLORA_CHECK_VALUE(code.numel() == 256, "code must have 256 entries, got ", code.numel());
  FASTLORA_CHECK_VALUE(offset.numel() == 1, "offset must be a single value, got ", offset.numel());
  FASTLORA_CHECK_VALUE(absmax2.numel() == (qabsmax.numel() + blocksize - 1) / blocksize,
                       "absmax2 must hold ceil(len(qabsmax)/blocksize) = ",
                       (qabsmax.numel() + blocksize - 1) / blocksize, " values, got ", absmax2.numel());
  check_device(qabsmax, "qabsmax", device);
  check_device(code, "code", device);
  check_device(absmax2, "absmax2", device);
  // offset is a scalar: it may live on the CPU while the rest is on the GPU.
}

// The dropout / NEFTune seed travels as a tensor (int64, one element) so that torch.compile traces the
// ops without turning it into a Python int, and GPU kernels can read it at run time from device memory.
inline void check_seed_tensor(const at::Tensor& seed) {
  FASTLORA_CHECK_TYPE(seed.scalar_type() == at::kLong, "seed must be an int64 tensor with one element, got dtype ",
                      seed.scalar_type());
  FASTLORA_CHECK_VALUE(seed.numel() == 1, "seed must be an int64 tensor with one element, got shape ", seed.sizes());
}

// A CPU seed read on the host (free: no device sync), checked to lie in [0, 2^63).
inline uint64_t read_cpu_seed(const at::Tensor& seed) {
  check_seed_tensor(seed);
  check_device(seed, "seed", c10::DeviceType::CPU);
  const int64_t value = seed.item<int64_t>();
  FASTLORA_CHECK_VALUE(value >= 0, "seed must be in [0, 2^63), got ", value);
  return static_cast<uint64_t>(value);
}

}  // namespace fastlora
