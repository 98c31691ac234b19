// Launcher of the CUDA NEFTune embedding kernel (fastlora::neftune_embedding on CUDA tensors). Plain C++
// over raw device pointers, like dequantize_4bit.h: the torch glue (checks, allocation, stream) lives in
// ops_cuda.cpp.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "dequantize_4bit.h"  // OutDtype

namespace fastlora::gpu {

// out[t, j] = dtype(float(weight[ids[t], j]) + fp32(u(i) * mag[t])), i = t * d + j (row-major), with
//   u(i) = float((int32)bits(i) - 2^15) * 2^-15 in [-1, 1), bits(i) = philox_half(seed, i, kStreamNeftune),
// one rounded fp32 product, one fp32 add, one RNE rounding (no FMA); rows with mag[t] == 0 are exactly
// weight[ids[t]]. ids: int64[T] (the caller checks 0 <= id < V; an out-of-range id is never dereferenced, its
// row is written as NaN); weight: (V, d) contiguous of `dtype`; mag: fp32[T]; out: (T, d) of `dtype`.
// seed: device pointer to int64[1], the Philox key (lo32, hi32) of its value; the kernels load it when they run
// (never read on the host), so a captured CUDA graph uses the buffer's value at each replay. Required unless
// T == 0 or d == 0. Any alignment is accepted (16-byte aligned rows take the vectorized kernel). Enqueued on
// `stream`; returns the launch status.
cudaError_t neftune_embedding(const int64_t* ids, const void* weight, const float* mag, void* out, int64_t T,
                              int64_t V, int64_t d, const int64_t* seed, OutDtype dtype, cudaStream_t stream);

}  // namespace fastlora::gpu
