// CUDA kernels of fastlora::neftune_embedding: embedding lookup + NEFTune noise in one pass.
//
//   out[t, j] = dtype(float(weight[ids[t], j]) + fp32(u(i) * mag[t])),   i = t * d + j
//   u(i) = float((int32)bits - 2^15) * 2^-15,   bits = philox_half(seed, i, kStreamNeftune)  (philox.h)
//
// The seed comes as a device pointer and each thread loads it once when the kernel runs (never read on the
// host), so a captured CUDA graph uses the seed buffer's value at each replay.
//
// __fmul_rn / __fadd_rn keep the product and the sum two roundings (no FMA, whatever --fmad says); the 16-bit
// outputs are one RNE rounding of the fp32 sum. Rows with mag[t] == 0 are copied bit for bit.
//
// Two kernels:
//  * neftune_vec_kernel: rows of 16-byte vectors (d a multiple of 16 / sizeof(T), 16-byte aligned weight and
//    out). One thread per two vectors of a row (8 fp32 or 16 bf16 / fp16 elements): 16-byte loads and stores,
//    one Philox evaluation per eight elements (a 16-bit vector is one Philox block; two fp32 vectors share
//    one where the pair starts at a multiple of 8).
//  * neftune_scalar_kernel: anything else. One thread per Philox block (eight consecutive elements of the
//    flattened output, possibly in two rows), scalar loads and stores.
// An id outside [0, V) is never dereferenced; its row is written as NaN (ops_cuda.cpp refuses such ids first).
//
// Pure CUDA (no torch headers): builds standalone with
//   nvcc -c -std=c++17 -O3 --fmad=false -arch=sm_80 -I csrc/include csrc/cuda/neftune_embedding.cu
// and, for the CPU tests of the kernel logic, as plain C++ against tests/cuda_emu (-DFASTLORA_CUDA_EMU).
#include <cstdint>
#include <cstring>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "fastlora/philox.h"
#include "neftune_embedding.h"

namespace fastlora::gpu {
namespace {

constexpr int kThreads = 256;
constexpr int kVecsPerThread = 2;
constexpr int64_t kMaxBlocks = int64_t{1} << 20;  // grid-stride loops beyond this

// Element types by their bits: fp32 as uint32_t, bf16 / fp16 as uint16_t.
template <typename T>
struct Elem;
template <>
struct Elem<float> {
  using Bits = uint32_t;
  static constexpr uint32_t kNaN = 0x7fc00000u;
  __device__ __forceinline__ static float to_float(uint32_t b) { return __uint_as_float(b); }
  __device__ __forceinline__ static uint32_t from_float(float v) { return __float_as_uint(v); }
};
template <>
struct Elem<__nv_bfloat16> {
  using Bits = uint16_t;
  static constexpr uint32_t kNaN = 0x7fc0u;
  __device__ __forceinline__ static float to_float(uint32_t b) { return __uint_as_float((b & 0xffffu) << 16); }
  __device__ __forceinline__ static uint32_t from_float(float v) {
    const __nv_bfloat16 h = __float2bfloat16_rn(v);
    uint16_t bits;
    memcpy(&bits, &h, sizeof(bits));
    return bits;
  }
};
template <>
struct Elem<__half> {
  using Bits = uint16_t;
  static constexpr uint32_t kNaN = 0x7e00u;
  __device__ __forceinline__ static float to_float(uint32_t b) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(b & 0xffffu)));
  }
  __device__ __forceinline__ static uint32_t from_float(float v) {
    const __half h = __float2half_rn(v);
    uint16_t bits;
    memcpy(&bits, &h, sizeof(bits));
    return bits;
  }
};

// u in [-1, 1) from 16 random bits: both steps exact (an integer below 2^15 in magnitude, times a power of two).
__device__ __forceinline__ float uniform(uint32_t bits) {
  return __fmul_rn(static_cast<float>(static_cast<int32_t>(bits) - 32768), 3.0517578125e-05f);
}

// i / d for 0 <= i < 2^53 and d > 0, inv_d = 1.0 / d computed on the host: a double estimate corrected by at
// most one step. (A 64-bit integer division is a called subroutine on the GPU; on sm_90 its call spills.)
__device__ __forceinline__ int64_t div_rows(int64_t i, int64_t d, double inv_d) {
  int64_t q = static_cast<int64_t>(static_cast<double>(i) * inv_d);
  if (q * d > i) --q;
  if ((q + 1) * d <= i) ++q;
  return q;
}

// One output element from the bits of the weight element and 16 random bits: the same bits when m == 0.
template <typename T>
__device__ __forceinline__ uint32_t noisy(uint32_t bits, uint32_t random16, float m) {
  if (m == 0.0f) return bits;
  return Elem<T>::from_float(__fadd_rn(Elem<T>::to_float(bits), __fmul_rn(uniform(random16), m)));
}

// 16 bytes starting at element e of the Philox block r: 4 fp32 elements (e = 0 or 4: half a block) or 8 16-bit
// elements (e = 0: the whole block; the low 16 bits of each 32-bit lane first).
template <typename T>
__device__ __forceinline__ uint4 noisy_vec(uint4 q, const Philox4& r, int e, float m);
template <>
__device__ __forceinline__ uint4 noisy_vec<float>(uint4 q, const Philox4& r, int e, float m) {
  return make_uint4(noisy<float>(q.x, half_of(r, e), m), noisy<float>(q.y, half_of(r, e + 1), m),
                    noisy<float>(q.z, half_of(r, e + 2), m), noisy<float>(q.w, half_of(r, e + 3), m));
}
template <typename T>
__device__ __forceinline__ uint32_t noisy_pair(uint32_t bits2, uint32_t word, float m) {
  return noisy<T>(bits2 & 0xffffu, word & 0xffffu, m) | (noisy<T>(bits2 >> 16, word >> 16, m) << 16);
}
template <typename T>
__device__ __forceinline__ uint4 noisy_vec(uint4 q, const Philox4& r, int, float m) {
  return make_uint4(noisy_pair<T>(q.x, r.w[0], m), noisy_pair<T>(q.y, r.w[1], m), noisy_pair<T>(q.z, r.w[2], m),
                    noisy_pair<T>(q.w, r.w[3], m));
}

template <typename T>
__device__ __forceinline__ uint4 nan_vec() {
  const uint32_t w = sizeof(T) == 4 ? Elem<T>::kNaN : (Elem<T>::kNaN | (Elem<T>::kNaN << 16));
  return make_uint4(w, w, w, w);
}

// d % kElems == 0; weight and out 16-byte aligned. Work item g = (row t, chunk c of kVecsPerThread vectors).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    neftune_vec_kernel(const int64_t* __restrict__ ids, const T* __restrict__ weight, const float* __restrict__ mag,
                       T* __restrict__ out, int64_t T_, int64_t V, int64_t d, int64_t chunks_per_row,
                       double inv_chunks, const int64_t* __restrict__ seed_ptr) {
  constexpr int kElems = 16 / static_cast<int>(sizeof(T));
  const uint64_t seed = static_cast<uint64_t>(__ldg(seed_ptr));
  const int64_t vecs_per_row = d / kElems;
  const int64_t work = T_ * chunks_per_row;
  for (int64_t g = int64_t{blockIdx.x} * kThreads + threadIdx.x; g < work; g += int64_t{gridDim.x} * kThreads) {
    const int64_t t = div_rows(g, chunks_per_row, inv_chunks);
    const int64_t c = g - t * chunks_per_row;
    const int64_t id = __ldg(ids + t);
    const float m = __ldg(mag + t);
    const bool id_ok = id >= 0 && id < V;
    const uint4* src = reinterpret_cast<const uint4*>(weight + id * d);
    uint4* dst = reinterpret_cast<uint4*>(out + t * d);
    uint4 q[kVecsPerThread] = {};
#pragma unroll
    for (int k = 0; k < kVecsPerThread; ++k) {  // both loads first
      const int64_t v = c * kVecsPerThread + k;
      if (id_ok && v < vecs_per_row) q[k] = __ldg(src + v);
    }
    Philox4 r{};
    uint64_t block = ~uint64_t{0};  // the block r holds: two fp32 vectors starting at a multiple of 8 share one
#pragma unroll
    for (int k = 0; k < kVecsPerThread; ++k) {
      const int64_t v = c * kVecsPerThread + k;
      if (v < vecs_per_row) {
        const uint64_t i = static_cast<uint64_t>(t * d + v * kElems);
        if ((i >> 3) != block) {
          block = i >> 3;
          r = philox4x32_10(seed, block, kStreamNeftune);
        }
        dst[v] = id_ok ? noisy_vec<T>(q[k], r, static_cast<int>(i & 7), m) : nan_vec<T>();
      }
    }
  }
}

// Any d and alignment. One thread per Philox block n: elements 8n .. 8n + 7 of the flattened (T, d) output.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    neftune_scalar_kernel(const int64_t* __restrict__ ids, const T* __restrict__ weight,
                          const float* __restrict__ mag, T* __restrict__ out, int64_t numel, int64_t V, int64_t d,
                          double inv_d, const int64_t* __restrict__ seed_ptr) {
  using Bits = typename Elem<T>::Bits;
  const uint64_t seed = static_cast<uint64_t>(__ldg(seed_ptr));
  const Bits* w = reinterpret_cast<const Bits*>(weight);
  Bits* o = reinterpret_cast<Bits*>(out);
  const int64_t blocks = (numel + 7) >> 3;
  for (int64_t n = int64_t{blockIdx.x} * kThreads + threadIdx.x; n < blocks; n += int64_t{gridDim.x} * kThreads) {
    const Philox4 r = philox4x32_10(seed, static_cast<uint64_t>(n), kStreamNeftune);
    int64_t t = div_rows(n * 8, d, inv_d);
    int64_t j = n * 8 - t * d;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int64_t i = n * 8 + e;
      if (i < numel) {
        while (j >= d) {  // d < 8: a block can span several rows
          j -= d;
          ++t;
        }
        const int64_t id = __ldg(ids + t);
        const bool id_ok = id >= 0 && id < V;
        o[i] = static_cast<Bits>(id_ok ? noisy<T>(w[id * d + j], half_of(r, e), __ldg(mag + t)) : Elem<T>::kNaN);
        ++j;
      }
    }
  }
}

template <typename Kernel, typename... Args>
cudaError_t launch(Kernel kernel, int64_t work, cudaStream_t stream, Args... args) {
  int64_t blocks = (work + kThreads - 1) / kThreads;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  const unsigned grid = static_cast<unsigned>(blocks);
#if defined(FASTLORA_CUDA_EMU)
  (void)stream;
  // by value: the emulation may queue the launch and run it later (fastlora_cuda_emu.h, deferred launches)
  fastlora_emu::launch(grid, kThreads, [=] { kernel(args...); });
#else
  kernel<<<grid, kThreads, 0, stream>>>(args...);
#endif
  return cudaGetLastError();
}

template <typename T>
cudaError_t run(const int64_t* ids, const void* weight, const float* mag, void* out, int64_t T_, int64_t V, int64_t d,
                const int64_t* seed, cudaStream_t stream) {
  constexpr int kElems = 16 / static_cast<int>(sizeof(T));
  const T* w = static_cast<const T*>(weight);
  T* o = static_cast<T*>(out);
  const bool aligned = reinterpret_cast<uintptr_t>(weight) % 16 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0;
  if (aligned && d % kElems == 0) {
    const int64_t chunks_per_row = (d / kElems + kVecsPerThread - 1) / kVecsPerThread;
    return launch(neftune_vec_kernel<T>, T_ * chunks_per_row, stream, ids, w, mag, o, T_, V, d, chunks_per_row,
                  1.0 / static_cast<double>(chunks_per_row), seed);
  }
  const int64_t numel = T_ * d;
  return launch(neftune_scalar_kernel<T>, (numel + 7) / 8, stream, ids, w, mag, o, numel, V, d,
                1.0 / static_cast<double>(d), seed);
}

}  // namespace

cudaError_t neftune_embedding(const int64_t* ids, const void* weight, const float* mag, void* out, int64_t T,
                              int64_t V, int64_t d, const int64_t* seed, OutDtype dtype, cudaStream_t stream) {
  if (T < 0 || V < 0 || d < 0) return cudaErrorInvalidValue;
  if (T == 0 || d == 0) return cudaSuccess;
  if (seed == nullptr) return cudaErrorInvalidValue;
  switch (dtype) {
    case OutDtype::kFloat32: return run<float>(ids, weight, mag, out, T, V, d, seed, stream);
    case OutDtype::kBFloat16: return run<__nv_bfloat16>(ids, weight, mag, out, T, V, d, seed, stream);
    case OutDtype::kFloat16: return run<__half>(ids, weight, mag, out, T, V, d, seed, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastlora::gpu
