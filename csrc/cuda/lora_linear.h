// Launcher of the CUDA small-M fused 4-bit LoRA linear forward (fastlora::lora_linear_fwd on CUDA
// tensors, M <= 16 rows). Plain C++ over raw device pointers, like dequantize_4bit.h: the torch glue
// (checks, allocation, stream) lives in ops_cuda.cpp.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "dequantize_4bit.h"  // OutDtype

namespace fastlora::gpu {

// The most rows of x the small-M kernels take (the decode regime); larger M runs on Triton.
constexpr int64_t kLoraMaxRows = 16;

// All pointers are device pointers to contiguous row-major tensors.
//   x        (M, K) of x_dtype                 lora_A (r, K), lora_B (N, r), S (M, r): of a_dtype
//   packed   uint8[ceil(N*K/2)]: the (N, K) weight's codes, first element in the high nibble
//   absmax   fp32[ceil(N*K/blocksize)] (resolved)      bias (N,) of x_dtype or nullptr
//   y        (M, N) of x_dtype (output)                S: output
//   xd       workspace of M*K elements of a_dtype, used (and required) only when dropout_p > 0
//   seed     int64[1], the dropout seed (Philox key = (lo32, hi32) of its value), used (and required) only
//            when dropout_p > 0; read by the dropout kernel when it runs, never on the host, so a captured
//            CUDA graph uses the buffer's value at each replay
// a_dtype is kFloat32 or x_dtype. Semantics: fastlora/reference_lora.py (y = rnd_X(rnd_X(x·Wᵀ +
// bias) + L), L = rnd_A(rnd_A(S·Bᵀ)·scaling), rounded to x_dtype first when round_lora_to_x).
struct LoraLinearFwdArgs {
  const void* x = nullptr;
  const uint8_t* packed = nullptr;
  const float* absmax = nullptr;
  const void* bias = nullptr;
  const void* lora_A = nullptr;
  const void* lora_B = nullptr;
  void* y = nullptr;
  void* S = nullptr;
  void* xd = nullptr;
  int64_t M = 0, N = 0, K = 0, r = 0;
  int64_t blocksize = 64;
  int quant_type = 0;  // fastlora::kNF4 / kFP4
  OutDtype x_dtype = OutDtype::kBFloat16;
  OutDtype a_dtype = OutDtype::kFloat32;
  float scaling = 1.0f;
  double dropout_p = 0.0;
  const int64_t* seed = nullptr;
  bool round_lora_to_x = false;  // rounding == "linear4bit"
};

// Enqueues the kernels on `stream` (dropout when p > 0, S = dropout(x)·Aᵀ, then the fused 4-bit
// GEMM with the LoRA epilogue); returns the launch status. cudaErrorInvalidValue for arguments the
// kernels do not take (M outside [0, 16], a bad blocksize / quant_type / dtype pair, no workspace).
cudaError_t lora_linear_fwd_small_m(const LoraLinearFwdArgs& args, cudaStream_t stream);

}  // namespace fastlora::gpu
