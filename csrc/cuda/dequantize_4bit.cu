// CUDA kernels of fastlora::dequantize_4bit and fastlora::dequantize_absmax.
//
// Pure CUDA (no torch headers): builds standalone with
//   nvcc -c -std=c++17 -O3 -arch=sm_80 -I csrc/include csrc/cuda/dequantize_4bit.cu
// The per-element math comes from fastlora/quant4.h, the same code the CPU kernels run.
//
// dequantize_4bit is memory-bound: 0.5 byte read and 2 (bf16/fp16) or 4 (fp32) bytes written per
// element, so the kernel is organised around the stores. A "unit" is the run of elements that
// fills one 16-byte store: 8 elements (4 packed bytes) for bf16/fp16, 4 elements (2 bytes) for
// fp32. Consecutive threads own consecutive units, so every warp-wide load and store instruction
// touches one contiguous span (512 B of output; 128 B of codes for 16-bit outputs, 64 B for fp32)
// with no partial sectors. Each thread keeps kUnroll units in flight (all loads issued before any
// decode) to cover DRAM latency. Because blocksize is a power of two >= 32 and a unit holds at
// most 8 elements, a unit never straddles two quantization blocks: its absmax is one load, which
// adjacent threads share through L1.
#include <cstdint>
#include <cstring>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "dequantize_4bit.h"
#include "fastlora/quant4.h"

namespace fastlora::gpu {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;

// Output conversion. Both intrinsics round to nearest even, with subnormals and overflow to inf, so
// for every non-NaN value they give the bits of float_to_bf16_bits / float_to_fp16_bits (the CPU
// kernels' rounding) in one hardware instruction per pair. A NaN stays a NaN, but its payload is
// not carried over: it cannot be anyway, since the GPU's fp32 multiply already returns the
// canonical NaN where x86 propagates the input's payload.
template <typename OutT>
__device__ __forceinline__ OutT to_out(float v);
template <>
__device__ __forceinline__ float to_out<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 to_out<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half to_out<__half>(float v) { return __float2half_rn(v); }

// Two consecutive 16-bit outputs as one word, the first element in the low half (little endian).
template <typename OutT>
__device__ __forceinline__ uint32_t pack_pair(float first, float second);
template <>
__device__ __forceinline__ uint32_t pack_pair<__nv_bfloat16>(float first, float second) {
  const __nv_bfloat162 p = __floats2bfloat162_rn(first, second);  // cvt.rn.bf16x2.f32
  uint32_t w;
  memcpy(&w, &p, sizeof(w));
  return w;
}
template <>
__device__ __forceinline__ uint32_t pack_pair<__half>(float first, float second) {
  const __half2 p = __floats2half2_rn(first, second);  // cvt.rn.f16x2.f32
  uint32_t w;
  memcpy(&w, &p, sizeof(w));
  return w;
}

template <typename OutT>
struct Unit {
  static_assert(sizeof(OutT) == 2, "16-bit outputs");
  static constexpr int kLog2Elems = 3;  // 8 elements
  using Codes = uint32_t;              // in 4 packed bytes
};
template <>
struct Unit<float> {
  static constexpr int kLog2Elems = 2;  // 4 elements
  using Codes = uint16_t;              // in 2 packed bytes
};

// Code lookup: both code books go through a 16-float __shared__ table filled from nf4_value /
// fp4_value, so the values are exactly the CPU's (fp4_value divides by 12: IEEE-exact as long as
// this file is not built with --use_fast_math / -prec-div=false). Why a shared table: the select
// tree of quant4.h costs ~15 selects plus bit tests per element, about the whole ALU budget of a
// memory-bound kernel at H100 bandwidth (~20 instructions per element); __constant__ memory
// serialises a warp whose lanes read different entries; the 16 shared entries sit in 16 distinct
// banks, so any pattern of 32 lanes is one conflict-free wavefront (equal entries broadcast): one
// LDS per element, the nibble-to-address math folds into a shift and a mask.
__device__ __forceinline__ void fill_table(float* table, int quant_type) {
  if (threadIdx.x < 16) table[threadIdx.x] = code_value(quant_type, threadIdx.x);
  __syncthreads();
}

// The table value of element `e` of a unit, scaled: one fp32 rounding, as on the CPU.
template <int e>
__device__ __forceinline__ float decode(const float* table, uint32_t codes, float scale) {
  // Byte e/2 of the unit (little-endian load), its high nibble holding the even element.
  constexpr int kShift = 8 * (e >> 1) + ((e & 1) ? 0 : 4);
  return table[(codes >> kShift) & 0xfu] * scale;
}

template <typename OutT>
__device__ __forceinline__ uint4 decode_unit(const float* table, uint32_t codes, float scale);

template <>
__device__ __forceinline__ uint4 decode_unit<float>(const float* table, uint32_t codes, float scale) {
  return make_uint4(__float_as_uint(decode<0>(table, codes, scale)), __float_as_uint(decode<1>(table, codes, scale)),
                    __float_as_uint(decode<2>(table, codes, scale)), __float_as_uint(decode<3>(table, codes, scale)));
}

template <typename OutT>
__device__ __forceinline__ uint4 decode_unit(const float* table, uint32_t codes, float scale) {
  return make_uint4(pack_pair<OutT>(decode<0>(table, codes, scale), decode<1>(table, codes, scale)),
                    pack_pair<OutT>(decode<2>(table, codes, scale), decode<3>(table, codes, scale)),
                    pack_pair<OutT>(decode<4>(table, codes, scale), decode<5>(table, codes, scale)),
                    pack_pair<OutT>(decode<6>(table, codes, scale), decode<7>(table, codes, scale)));
}

// Element i on its own: the tail of the vector kernel and the whole of the scalar kernel.
template <typename OutT>
__device__ __forceinline__ void dequant_element(const uint8_t* __restrict__ packed, const float* __restrict__ absmax,
                                                OutT* __restrict__ out, const float* table, int64_t i,
                                                int log2_blocksize) {
  const uint32_t byte = __ldg(packed + (i >> 1));
  const uint32_t q = (i & 1) ? (byte & 0xfu) : (byte >> 4);
  out[i] = to_out<OutT>(table[q] * __ldg(absmax + (i >> log2_blocksize)));
}

// Requires packed aligned to sizeof(Unit::Codes) and out to 16 bytes. Units are processed in tiles
// of kUnroll * kThreads per CTA, grid-stride; the first CTA also does the few elements after the
// last whole unit.
template <typename OutT>
__global__ void __launch_bounds__(kThreads)
    dequantize_4bit_vec_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ absmax,
                               OutT* __restrict__ out, int64_t numel, int log2_blocksize, int quant_type) {
  using U = Unit<OutT>;
  using Codes = typename U::Codes;
  __shared__ float table[16];
  fill_table(table, quant_type);

  const Codes* __restrict__ codes_in = reinterpret_cast<const Codes*>(packed);
  uint4* __restrict__ out16 = reinterpret_cast<uint4*>(out);
  const int unit_shift = log2_blocksize - U::kLog2Elems;  // units per quantization block, log2
  const int64_t units = numel >> U::kLog2Elems;
  const int64_t tile = int64_t{kThreads} * kUnroll;

  for (int64_t base = int64_t{blockIdx.x} * tile + threadIdx.x; base < units; base += int64_t{gridDim.x} * tile) {
    uint32_t codes[kUnroll];
    float scale[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const int64_t u = base + k * kThreads;
      codes[k] = 0;
      scale[k] = 0.0f;
      if (u < units) {
        codes[k] = __ldg(codes_in + u);
        scale[k] = __ldg(absmax + (u >> unit_shift));
      }
    }
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const int64_t u = base + k * kThreads;
      if (u < units) out16[u] = decode_unit<OutT>(table, codes[k], scale[k]);
    }
  }

  const int64_t tail_begin = units << U::kLog2Elems;
  if (blockIdx.x == 0 && threadIdx.x < numel - tail_begin) {
    dequant_element(packed, absmax, out, table, tail_begin + threadIdx.x, log2_blocksize);
  }
}

// Any alignment (e.g. packed is a view at an odd byte offset): one element per thread, grid-stride.
template <typename OutT>
__global__ void __launch_bounds__(kThreads)
    dequantize_4bit_scalar_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ absmax,
                                  OutT* __restrict__ out, int64_t numel, int log2_blocksize, int quant_type) {
  __shared__ float table[16];
  fill_table(table, quant_type);
  for (int64_t i = int64_t{blockIdx.x} * kThreads + threadIdx.x; i < numel; i += int64_t{gridDim.x} * kThreads) {
    dequant_element(packed, absmax, out, table, i, log2_blocksize);
  }
}

// The nested statistics are ~1/64 of the weight's size, so this kernel is launch-bound: it stays
// simple, one element per thread. The 256-entry code lives in shared memory (it is read at random);
// the arithmetic is nested_absmax(), i.e. __fmul_rn then __fadd_rn, which nvcc never contracts.
// log2_blocksize >= 0 replaces the 64-bit division when blocksize is a power of two (always 256 in
// bitsandbytes).
__global__ void __launch_bounds__(kThreads)
    dequantize_absmax_kernel(const uint8_t* __restrict__ qabsmax, const float* __restrict__ code,
                             const float* __restrict__ absmax2, const float* __restrict__ offset_device,
                             float offset_host, float* __restrict__ out, int64_t n, int64_t blocksize,
                             int log2_blocksize) {
  static_assert(kThreads == 256, "one code entry per thread");
  __shared__ float table[256];
  table[threadIdx.x] = __ldg(code + threadIdx.x);
  const float offset = offset_device != nullptr ? __ldg(offset_device) : offset_host;
  __syncthreads();
  for (int64_t i = int64_t{blockIdx.x} * kThreads + threadIdx.x; i < n; i += int64_t{gridDim.x} * kThreads) {
    const int64_t b = log2_blocksize >= 0 ? (i >> log2_blocksize) : (i / blocksize);
    out[i] = nested_absmax(table[__ldg(qabsmax + i)], __ldg(absmax2 + b), offset);
  }
}

int log2_exact(int64_t v) {  // log2 of a power of two, -1 otherwise
  if (v <= 0 || (v & (v - 1)) != 0) return -1;
  int l = 0;
  while ((int64_t{1} << l) < v) ++l;
  return l;
}

// Grid size for a grid-stride kernel: the CTAs the work needs, at most one full wave of resident
// CTAs (more would leave a partial second wave running at low occupancy).
template <typename Kernel>
cudaError_t grid_size(Kernel kernel, int64_t work_ctas, int* grid) {
  int device = 0;
  int sms = 0;
  int per_sm = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0);
  if (err != cudaSuccess) return err;
  const int64_t wave = int64_t{sms} * (per_sm > 0 ? per_sm : 1);
  *grid = static_cast<int>(work_ctas < 1 ? 1 : (work_ctas < wave ? work_ctas : wave));
  return cudaSuccess;
}

template <typename OutT>
cudaError_t launch_dequantize_4bit(const uint8_t* packed, const float* absmax, void* out, int64_t numel,
                                   int log2_blocksize, int quant_type, cudaStream_t stream) {
  using U = Unit<OutT>;
  OutT* o = static_cast<OutT*>(out);
  const bool aligned = reinterpret_cast<uintptr_t>(packed) % sizeof(typename U::Codes) == 0 &&
                       reinterpret_cast<uintptr_t>(out) % 16 == 0;
  int grid = 0;
  cudaError_t err;
  if (aligned) {
    const int64_t units = numel >> U::kLog2Elems;
    const int64_t tile = int64_t{kThreads} * kUnroll;
    err = grid_size(dequantize_4bit_vec_kernel<OutT>, (units + tile - 1) / tile, &grid);
    if (err != cudaSuccess) return err;
    dequantize_4bit_vec_kernel<OutT>
        <<<grid, kThreads, 0, stream>>>(packed, absmax, o, numel, log2_blocksize, quant_type);
  } else {
    err = grid_size(dequantize_4bit_scalar_kernel<OutT>, (numel + kThreads - 1) / kThreads, &grid);
    if (err != cudaSuccess) return err;
    dequantize_4bit_scalar_kernel<OutT>
        <<<grid, kThreads, 0, stream>>>(packed, absmax, o, numel, log2_blocksize, quant_type);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t dequantize_4bit(const uint8_t* packed, const float* absmax, void* out, int64_t numel,
                            int64_t blocksize, int quant_type, OutDtype dtype, cudaStream_t stream) {
  const int log2_blocksize = log2_exact(blocksize);
  if (numel < 0 || log2_blocksize < 5 || log2_blocksize > 12 || (quant_type != kNF4 && quant_type != kFP4)) {
    return cudaErrorInvalidValue;
  }
  if (numel == 0) return cudaSuccess;
  switch (dtype) {
    case OutDtype::kFloat32:
      return launch_dequantize_4bit<float>(packed, absmax, out, numel, log2_blocksize, quant_type, stream);
    case OutDtype::kBFloat16:
      return launch_dequantize_4bit<__nv_bfloat16>(packed, absmax, out, numel, log2_blocksize, quant_type, stream);
    case OutDtype::kFloat16:
      return launch_dequantize_4bit<__half>(packed, absmax, out, numel, log2_blocksize, quant_type, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t dequantize_absmax(const uint8_t* qabsmax, const float* code, const float* absmax2,
                              const float* offset_device, float offset_host, float* out, int64_t n,
                              int64_t blocksize, cudaStream_t stream) {
  if (n < 0 || blocksize <= 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  int grid = 0;
  const cudaError_t err = grid_size(dequantize_absmax_kernel, (n + kThreads - 1) / kThreads, &grid);
  if (err != cudaSuccess) return err;
  dequantize_absmax_kernel<<<grid, kThreads, 0, stream>>>(qabsmax, code, absmax2, offset_device, offset_host, out, n,
                                                          blocksize, log2_exact(blocksize));
  return cudaGetLastError();
}

}  // namespace fastlora::gpu
