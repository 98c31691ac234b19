// Launchers of the CUDA 4-bit dequantization kernels. Plain C++ over raw device pointers so that
// dequantize_4bit.cu builds without torch headers; the torch glue lives in ops_cuda.cpp.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace fastlora::gpu {

enum class OutDtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// out[i] = dtype(TABLE[nibble i of packed] * absmax[i / blocksize]) for i < numel, one RNE rounding.
// packed: ceil(numel/2) bytes, first element in the high nibble; absmax: ceil(numel/blocksize) fp32;
// blocksize: a power of two in [32, 4096]; quant_type: fastlora::kNF4 or kFP4; out: numel elements.
// Any alignment is accepted (misaligned pointers take a slower scalar kernel). Enqueued on `stream`;
// returns the launch status.
cudaError_t dequantize_4bit(const uint8_t* packed, const float* absmax, void* out, int64_t numel,
                            int64_t blocksize, int quant_type, OutDtype dtype, cudaStream_t stream);

// out[i] = fp32(fp32(code[qabsmax[i]] * absmax2[i / blocksize]) + offset) for i < n, two roundings
// (no FMA). The offset is read from `offset_device` when it is non-null (a device pointer, so no
// host sync is needed), otherwise `offset_host` is used.
cudaError_t dequantize_absmax(const uint8_t* qabsmax, const float* code, const float* absmax2,
                              const float* offset_device, float offset_host, float* out, int64_t n,
                              int64_t blocksize, cudaStream_t stream);

}  // namespace fastlora::gpu
