// CUDA kernels of fastlora::lora_linear_fwd for the decode regime (M <= 16 rows of x) over a 4-bit
// (NF4 / FP4, bitsandbytes layout) weight:
//   y = rnd_X(rnd_X(x·Wᵀ + bias) + L)            rounding "linear"
//   y = rnd_X(rnd_X(x·Wᵀ + bias) + rnd_X(L))     rounding "linear4bit"
//   L = rnd_A(rnd_A(S·Bᵀ) · scaling),  S = rnd_A(dropout(x)·Aᵀ)
// with W decoded to x's dtype exactly as dequantize_4bit does (quant4.h), fp32 accumulation and the
// roundings of fastlora/reference_lora.py.
//
// Pure CUDA (no torch headers): builds standalone with
//   nvcc -c -std=c++17 -O3 --fmad=false -arch=sm_80 -I csrc/include csrc/cuda/lora_linear.cu
// and, for the CPU tests of the kernel logic, as plain C++ against the emulation headers of
// tests/cuda_emu (-DFASTLORA_CUDA_EMU): only the launch and the mma instruction differ there.
//
// Kernels, in launch order:
//  1. lora_dropout_kernel (only when p > 0): xd = rnd_A(x · keep · scale) into a workspace; one
//     Philox evaluation per 4 elements (philox.h). The seed is a device pointer loaded by the kernel,
//     so a CUDA graph replay uses the seed buffer's current value.
//  2. lora_s_kernel: S = rnd_A(xd·Aᵀ). One CTA per 2 rows of A, its threads stride over K with all
//     M rows of x in registers, then a warp-shuffle + shared-memory reduction in a fixed order.
//  3. the 4-bit GEMM with the LoRA epilogue, bandwidth-bound: the weight is read exactly once, in
//     16-byte loads (32 codes), each CTA owns 16 output rows and its 8 warps split K.
//     * bf16 / fp16 x, K % 32 == 0, 16-byte aligned x and codes, sm_80+: lora_linear_mma_kernel.
//       Tensor cores (mma.sync m16n8k16, fp32 accumulation): M <= 16 fills the A operand (rows >= M
//       are zero) and each 8-row tile of W is the B operand, decoded straight from the 16-byte load
//       into B fragments. The K order inside an mma is permuted the same way for A and B (a sum
//       does not care), so that lane (g, t) of a warp takes 32 consecutive codes of row g: one
//       16-byte load per lane, 4 lanes per row, and x's matching 64 bytes per row of A.
//     * everything else (fp32 x, odd K, misaligned pointers): lora_linear_simt_kernel, CUDA-core FMAs,
//       4 rows per CTA, 16-byte code loads when aligned (VEC) and single codes otherwise.
//     The epilogue of both: the per-warp partial sums are added in warp order through shared
//     memory (deterministic), the CTA's L values come from warp-parallel dot products S[m]·B[n],
//     then bias, the roundings and the store.
#include <cstdint>
#include <cstring>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "fastlora/philox.h"
#include "fastlora/quant4.h"
#include "lora_linear.h"

namespace fastlora::gpu {
namespace {

constexpr int kMaxRows = static_cast<int>(kLoraMaxRows);  // 16
constexpr unsigned kFullMask = 0xffffffffu;

// ------------------------------------------------------------------------------------------------
// element conversions (round to nearest even; the intrinsics match quant4.h's float_to_*_bits)

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// rnd_T: the value rounded to T, as fp32.
template <typename T>
__device__ __forceinline__ float round_to(float v) { return to_float(from_float<T>(v)); }

// A 16-bit element given by its bits (low 16 bits of `bits`), as fp32.
template <typename T>
__device__ __forceinline__ float bits_to_float(uint32_t bits);
template <>
__device__ __forceinline__ float bits_to_float<__nv_bfloat16>(uint32_t bits) { return __uint_as_float(bits << 16); }
template <>
__device__ __forceinline__ float bits_to_float<__half>(uint32_t bits) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits & 0xffffu)));
}

// Two values rounded to T and packed into one word, the first in the low half (the element with the
// lower index, as mma fragments and little-endian memory want it).
template <typename T>
__device__ __forceinline__ uint32_t pack_pair(float first, float second);
template <>
__device__ __forceinline__ uint32_t pack_pair<__nv_bfloat16>(float first, float second) {
  const __nv_bfloat162 p = __floats2bfloat162_rn(first, second);
  uint32_t w;
  memcpy(&w, &p, sizeof(w));
  return w;
}
template <>
__device__ __forceinline__ uint32_t pack_pair<__half>(float first, float second) {
  const __half2 p = __floats2half2_rn(first, second);
  uint32_t w;
  memcpy(&w, &p, sizeof(w));
  return w;
}

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : (i == 1 ? v.y : (i == 2 ? v.z : v.w));
}

// Four consecutive elements of x (16-byte aligned for fp32, 8-byte aligned for 16-bit types).
template <typename T>
__device__ __forceinline__ void load4(const T* p, float (&v)[4]);
template <>
__device__ __forceinline__ void load4<float>(const float* p, float (&v)[4]) {
  const float4 q = __ldg(reinterpret_cast<const float4*>(p));
  v[0] = q.x;
  v[1] = q.y;
  v[2] = q.z;
  v[3] = q.w;
}
template <typename T>
__device__ __forceinline__ void load4(const T* p, float (&v)[4]) {
  const uint2 q = __ldg(reinterpret_cast<const uint2*>(p));
  v[0] = bits_to_float<T>(q.x);
  v[1] = bits_to_float<T>(q.x >> 16);
  v[2] = bits_to_float<T>(q.y);
  v[3] = bits_to_float<T>(q.y >> 16);
}

// An element of lora_A / lora_B / S, which are fp32 or of x's dtype T.
template <typename T>
__device__ __forceinline__ float load_adapter(const void* p, int64_t i, bool a_float) {
  return a_float ? __ldg(static_cast<const float*>(p) + i) : to_float(static_cast<const T*>(p)[i]);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// The 16-entry code book in shared memory (see dequantize_4bit.cu for why), filled from quant4.h.
__device__ __forceinline__ void fill_table(float* table, int quant_type) {
  if (threadIdx.x < 16) table[threadIdx.x] = code_value(quant_type, threadIdx.x);
  __syncthreads();
}

// ------------------------------------------------------------------------------------------------
// 1. LoRA dropout of x into the workspace: xd[i] = keep(i) ? rnd_A(x[i] * scale) : 0. x -> A's dtype
// is exact (A is fp32 or x's dtype), so this is reference_lora.lora_dropout(x.to(A.dtype)).

constexpr int kDropThreads = 256;

template <typename XT, typename AT>
__global__ void __launch_bounds__(kDropThreads)
    lora_dropout_kernel(const XT* __restrict__ x, AT* __restrict__ xd, int64_t n, const int64_t* __restrict__ seed_ptr,
                        uint32_t threshold, float scale) {
  const uint64_t seed = static_cast<uint64_t>(__ldg(seed_ptr));  // all 64 bits: key (lo32, hi32)
  for (int64_t blk = int64_t{blockIdx.x} * kDropThreads + threadIdx.x; blk * 4 < n;
       blk += int64_t{gridDim.x} * kDropThreads) {
    const Philox4 rnd = philox4x32_10(seed, static_cast<uint64_t>(blk), kStreamLoraDropout);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t i = blk * 4 + e;
      if (i < n) {
        const float v = __fmul_rn(to_float(x[i]), scale);
        xd[i] = from_float<AT>(dropout_keep(rnd.w[e], threshold) ? v : 0.0f);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// 2. S[m, j] = rnd_A(sum_k xs[m, k] * A[j, k]) for m < M, j < r; xs is x (p = 0) or xd.

constexpr int kSThreads = 512;
constexpr int kSWarps = kSThreads / 32;
constexpr int kSRanks = 2;  // rows of A per CTA

template <typename XT, typename AT>
__global__ void __launch_bounds__(kSThreads)
    lora_s_kernel(const XT* __restrict__ xs, const AT* __restrict__ lora_A, AT* __restrict__ S, int M, int K, int r) {
  __shared__ float red[kSWarps][kSRanks][kMaxRows];
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int j0 = blockIdx.x * kSRanks;

  float acc[kSRanks][kMaxRows];
#pragma unroll
  for (int jj = 0; jj < kSRanks; ++jj) {
#pragma unroll
    for (int m = 0; m < kMaxRows; ++m) acc[jj][m] = 0.0f;
  }
  for (int k = threadIdx.x; k < K; k += kSThreads) {
    float a[kSRanks];
#pragma unroll
    for (int jj = 0; jj < kSRanks; ++jj) {
      a[jj] = j0 + jj < r ? to_float(lora_A[int64_t{j0 + jj} * K + k]) : 0.0f;
    }
#pragma unroll
    for (int m = 0; m < kMaxRows; ++m) {
      if (m < M) {
        const float xv = to_float(xs[int64_t{m} * K + k]);
#pragma unroll
        for (int jj = 0; jj < kSRanks; ++jj) acc[jj][m] = fmaf(xv, a[jj], acc[jj][m]);
      }
    }
  }
#pragma unroll
  for (int jj = 0; jj < kSRanks; ++jj) {
#pragma unroll
    for (int m = 0; m < kMaxRows; ++m) {
      if (m < M) {  // uniform over the block
        const float v = warp_sum(acc[jj][m]);
        if (lane == 0) red[warp][jj][m] = v;
      }
    }
  }
  __syncthreads();
  const int t = threadIdx.x;
  if (t < kSRanks * kMaxRows) {
    const int jj = t / kMaxRows;
    const int m = t % kMaxRows;
    const int j = j0 + jj;
    if (m < M && j < r) {
      float s = 0.0f;
      for (int w = 0; w < kSWarps; ++w) s += red[w][jj][m];
      S[int64_t{m} * r + j] = from_float<AT>(s);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// 3. the 4-bit GEMM with the LoRA epilogue

struct GemmParams {
  const void* x;          // (M, K) of T
  const uint8_t* packed;  // codes of the (N, K) weight
  const float* absmax;
  const void* bias;  // (N,) of T, or nullptr
  const void* S;     // (M, r), fp32 or T
  const void* B;     // (N, r), fp32 or T
  void* y;           // (M, N) of T
  int M, N, K, r;
  int log2_blocksize;
  int quant_type;
  float scaling;
  int a_float;          // adapters (and S) are fp32, else T
  int round_lora_to_x;  // rounding == "linear4bit"
};

// L[m][n] of `rows` consecutive output rows starting at n0, computed by the block's warps (one warp
// per (m, row) pair, lanes over r) into lora[m * rows + row].
template <typename T, int kWarps>
__device__ __forceinline__ void lora_term(const GemmParams& p, int n0, int rows, float* lora) {
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const bool a_float = p.a_float != 0;
  for (int pi = warp; pi < p.M * rows; pi += kWarps) {  // uniform over the warp
    const int m = pi / rows;
    const int row = pi - m * rows;
    const int n = n0 + row;
    float v = 0.0f;
    if (n < p.N) {
      for (int j = lane; j < p.r; j += 32) {
        v = fmaf(load_adapter<T>(p.S, int64_t{m} * p.r + j, a_float),
                 load_adapter<T>(p.B, int64_t{n} * p.r + j, a_float), v);
      }
    }
    v = warp_sum(v);
    if (lane == 0) {
      float l = a_float ? v : round_to<T>(v);  // rnd_A(S·Bᵀ)
      l = __fmul_rn(l, p.scaling);
      l = a_float ? l : round_to<T>(l);  // rnd_A(· scaling)
      if (p.round_lora_to_x) l = round_to<T>(l);
      lora[pi] = l;
    }
  }
}

// y[m, n] from the fp32 sum x[m]·W[n] and the LoRA term.
template <typename T>
__device__ __forceinline__ void store_output(const GemmParams& p, int m, int n, float sum, float lora) {
  float base = sum;
  if (p.bias != nullptr) base = __fadd_rn(base, to_float(static_cast<const T*>(p.bias)[n]));
  base = round_to<T>(base);
  static_cast<T*>(p.y)[int64_t{m} * p.N + n] = from_float<T>(__fadd_rn(base, lora));
}

// ---- tensor-core kernel (bf16 / fp16)

constexpr int kMmaWarps = 8;
constexpr int kMmaThreads = kMmaWarps * 32;
constexpr int kMmaTiles = 2;                // 8-row tiles per CTA
constexpr int kMmaRows = 8 * kMmaTiles;     // output rows per CTA
constexpr int kMmaUnroll = 2;               // slabs in flight per warp
constexpr int kSlab = 128;                  // K elements per warp-wide step: 4 lanes x 32 codes
static_assert(kMmaThreads == kMmaTiles * 128, "the final reduction has one thread per accumulator");

// D += A·B, m16n8k16, fp32 accumulation. A: 4 words (8 elements), B: 2 words (4 elements).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

#if defined(FASTLORA_CUDA_EMU)
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                        const uint32_t (&b)[2]) {
  fastlora_emu::mma_m16n8k16(d, a, b, /*bf16=*/true);
}
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  fastlora_emu::mma_m16n8k16(d, a, b, /*bf16=*/false);
}
#else
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                        const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // the host launches this kernel on sm_80+ only
#else
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}
#endif

// Requires K % 32 == 0 and x, packed 16-byte aligned. Grid: ceil(N / 16) CTAs of 8 warps.
//
// Lane (g = lane / 4, t = lane % 4) of a warp, in slab s (K elements k_s .. k_s + 127):
//  * B: codes k_s + 32t .. +31 of weight row n0 + 8·tile + g: one 16-byte load and one absmax per
//    tile (32 codes sit in one quantization block since blocksize >= 32 is a power of two). mma j
//    (0..7) takes codes 4j .. 4j+3 as its B rows 2t, 2t+1, 2t+8, 2t+9 (bytes 2j and 2j+1).
//  * A: elements k_s + 32t .. +31 of x rows g and g + 8 (4 x 16-byte loads each); mma j takes
//    elements 4j, 4j+1 as A columns 2t, 2t+1 and 4j+2, 4j+3 as columns 2t+8, 2t+9, the same
//    permutation as B's rows.
// Warp w takes slabs w, w + 8, ...; lanes whose codes lie past K (last, partial slab) or whose row
// lies past N contribute zeros.
template <typename T>
__global__ void __launch_bounds__(kMmaThreads, 2) lora_linear_mma_kernel(const GemmParams p) {
  __shared__ float table[16];
  __shared__ float red[kMmaWarps][kMmaThreads];
  __shared__ float lora[kMaxRows * kMmaRows];
  fill_table(table, p.quant_type);

  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int n0 = blockIdx.x * kMmaRows;
  const int K = p.K;
  const int slabs = (K + kSlab - 1) / kSlab;
  const uint4* __restrict__ codes = reinterpret_cast<const uint4*>(p.packed);
  const float* __restrict__ absmax = p.absmax;
  const int log2_bs = p.log2_blocksize;

  int64_t wrow[kMmaTiles];  // flat index of this lane's weight row
  bool wok[kMmaTiles];
#pragma unroll
  for (int tile = 0; tile < kMmaTiles; ++tile) {
    const int n = n0 + tile * 8 + g;
    wok[tile] = n < p.N;
    wrow[tile] = wok[tile] ? int64_t{n} * K : 0;
  }
  const T* x = static_cast<const T*>(p.x);
  const bool xok0 = g < p.M;
  const bool xok1 = g + 8 < p.M;
  const uint4* __restrict__ xrow0 = reinterpret_cast<const uint4*>(x + (xok0 ? int64_t{g} * K : 0));
  const uint4* __restrict__ xrow1 = reinterpret_cast<const uint4*>(x + (xok1 ? int64_t{g + 8} * K : 0));

  float acc[kMmaTiles][4];
#pragma unroll
  for (int tile = 0; tile < kMmaTiles; ++tile) {
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[tile][i] = 0.0f;
  }
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);

  for (int s0 = warp; s0 < slabs; s0 += kMmaWarps * kMmaUnroll) {
    uint4 wq[kMmaUnroll][kMmaTiles];
    float sc[kMmaUnroll][kMmaTiles];
    uint4 xa[kMmaUnroll][2][4];
    // all loads of the step first
#pragma unroll
    for (int u = 0; u < kMmaUnroll; ++u) {
      const int slab = s0 + u * kMmaWarps;
      const int k = slab * kSlab + 32 * t;
      const bool kok = slab < slabs && k < K;
#pragma unroll
      for (int tile = 0; tile < kMmaTiles; ++tile) {
        wq[u][tile] = zero;
        sc[u][tile] = 0.0f;
        if (kok && wok[tile]) {
          const int64_t e = wrow[tile] + k;
          wq[u][tile] = __ldg(codes + (e >> 5));
          sc[u][tile] = __ldg(absmax + (e >> log2_bs));
        }
      }
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        xa[u][0][q] = (kok && xok0) ? __ldg(xrow0 + (k >> 3) + q) : zero;
        xa[u][1][q] = (kok && xok1) ? __ldg(xrow1 + (k >> 3) + q) : zero;
      }
    }
#pragma unroll
    for (int u = 0; u < kMmaUnroll; ++u) {
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int q = j >> 1;
        const int h = (j & 1) * 2;
        const uint32_t a[4] = {word(xa[u][0][q], h), word(xa[u][1][q], h), word(xa[u][0][q], h + 1),
                               word(xa[u][1][q], h + 1)};
#pragma unroll
        for (int tile = 0; tile < kMmaTiles; ++tile) {
          // bits 0..7: byte 2j (codes 4j high nibble, 4j+1 low); bits 8..15: byte 2j+1
          const uint32_t bytes = word(wq[u][tile], j >> 1) >> (16 * (j & 1));
          const float s = sc[u][tile];
          const uint32_t b[2] = {pack_pair<T>(table[(bytes >> 4) & 0xfu] * s, table[bytes & 0xfu] * s),
                                 pack_pair<T>(table[(bytes >> 12) & 0xfu] * s, table[(bytes >> 8) & 0xfu] * s)};
          mma_16816<T>(acc[tile], a, b);
        }
      }
    }
  }

  // partial sums of this warp: C fragment element i of tile -> red[warp][tile * 128 + i * 32 + lane]
#pragma unroll
  for (int tile = 0; tile < kMmaTiles; ++tile) {
#pragma unroll
    for (int i = 0; i < 4; ++i) red[warp][tile * 128 + i * 32 + lane] = acc[tile][i];
  }
  lora_term<T, kMmaWarps>(p, n0, kMmaRows, lora);
  __syncthreads();

  const int tid = threadIdx.x;
  float sum = 0.0f;
#pragma unroll
  for (int w = 0; w < kMmaWarps; ++w) sum += red[w][tid];
  const int tile = tid >> 7;
  const int i = (tid >> 5) & 3;
  const int ln = tid & 31;
  const int m = (ln >> 2) + 8 * (i >> 1);  // C fragment: c0, c1 row g; c2, c3 row g + 8
  const int row = tile * 8 + 2 * (ln & 3) + (i & 1);
  const int n = n0 + row;
  if (m < p.M && n < p.N) store_output<T>(p, m, n, sum, lora[m * kMmaRows + row]);
}

// ---- CUDA-core kernel (any dtype, any K, any alignment)

constexpr int kSimtWarps = 4;
constexpr int kSimtThreads = kSimtWarps * 32;
constexpr int kSimtRows = 4;  // output rows per CTA

// MT: rows of x held in registers (>= M). VEC: K % 32 == 0 with x and packed 16-byte aligned; lane
// takes 32 codes (one 16-byte load per row) per step, otherwise one code per step.
template <typename T, int MT, bool VEC>
__global__ void __launch_bounds__(kSimtThreads, MT >= 16 ? 2 : 4) lora_linear_simt_kernel(const GemmParams p) {
  __shared__ float table[16];
  __shared__ float red[kSimtWarps][kSimtRows][MT];
  __shared__ float lora[MT * kSimtRows];
  fill_table(table, p.quant_type);

  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int n0 = blockIdx.x * kSimtRows;
  const int K = p.K;
  const int M = p.M;
  const int log2_bs = p.log2_blocksize;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const float* __restrict__ absmax = p.absmax;

  int64_t wrow[kSimtRows];
  bool wok[kSimtRows];
#pragma unroll
  for (int rr = 0; rr < kSimtRows; ++rr) {
    wok[rr] = n0 + rr < p.N;
    wrow[rr] = wok[rr] ? int64_t{n0 + rr} * K : 0;
  }
  float acc[kSimtRows][MT];
#pragma unroll
  for (int rr = 0; rr < kSimtRows; ++rr) {
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[rr][m] = 0.0f;
  }

  if constexpr (VEC) {
    const uint4* __restrict__ codes = reinterpret_cast<const uint4*>(p.packed);
    const int chunks = K >> 5;
    for (int c = threadIdx.x; c < chunks; c += kSimtThreads) {
      uint4 wq[kSimtRows];
      float sc[kSimtRows];
#pragma unroll
      for (int rr = 0; rr < kSimtRows; ++rr) {
        wq[rr] = make_uint4(0u, 0u, 0u, 0u);
        sc[rr] = 0.0f;
        if (wok[rr]) {
          const int64_t e = wrow[rr] + (int64_t{c} << 5);
          wq[rr] = __ldg(codes + (e >> 5));
          sc[rr] = __ldg(absmax + (e >> log2_bs));
        }
      }
      // Not unrolled: hoisting the x loads of all 8 groups costs ~8 * MT * 4 registers.
#pragma unroll 1
      for (int grp = 0; grp < 8; ++grp) {  // codes 4grp .. 4grp+3: byte 2grp, 2grp+1
        float wv[kSimtRows][4];
#pragma unroll
        for (int rr = 0; rr < kSimtRows; ++rr) {
          const uint32_t bytes = word(wq[rr], grp >> 1) >> (16 * (grp & 1));
          wv[rr][0] = round_to<T>(table[(bytes >> 4) & 0xfu] * sc[rr]);
          wv[rr][1] = round_to<T>(table[bytes & 0xfu] * sc[rr]);
          wv[rr][2] = round_to<T>(table[(bytes >> 12) & 0xfu] * sc[rr]);
          wv[rr][3] = round_to<T>(table[(bytes >> 8) & 0xfu] * sc[rr]);
        }
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          if (m < M) {
            float xv[4];
            load4<T>(x + int64_t{m} * K + (c << 5) + 4 * grp, xv);
#pragma unroll
            for (int rr = 0; rr < kSimtRows; ++rr) {
#pragma unroll
              for (int e = 0; e < 4; ++e) acc[rr][m] = fmaf(xv[e], wv[rr][e], acc[rr][m]);
            }
          }
        }
      }
    }
  } else {
    for (int k = threadIdx.x; k < K; k += kSimtThreads) {
      float wv[kSimtRows];
#pragma unroll
      for (int rr = 0; rr < kSimtRows; ++rr) {
        wv[rr] = 0.0f;
        if (wok[rr]) {
          const int64_t e = wrow[rr] + k;
          const uint32_t byte = __ldg(p.packed + (e >> 1));
          const uint32_t code = (e & 1) ? (byte & 0xfu) : (byte >> 4);
          wv[rr] = round_to<T>(table[code] * __ldg(absmax + (e >> log2_bs)));
        }
      }
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        if (m < M) {
          const float xv = to_float(x[int64_t{m} * K + k]);
#pragma unroll
          for (int rr = 0; rr < kSimtRows; ++rr) acc[rr][m] = fmaf(xv, wv[rr], acc[rr][m]);
        }
      }
    }
  }

#pragma unroll
  for (int rr = 0; rr < kSimtRows; ++rr) {
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m < M) {  // uniform over the block
        const float v = warp_sum(acc[rr][m]);
        if (lane == 0) red[warp][rr][m] = v;
      }
    }
  }
  lora_term<T, kSimtWarps>(p, n0, kSimtRows, lora);
  __syncthreads();

  const int tid = threadIdx.x;
  if (tid < kSimtRows * MT) {
    const int rr = tid / MT;
    const int m = tid % MT;
    const int n = n0 + rr;
    if (m < M && n < p.N) {
      float sum = 0.0f;
#pragma unroll
      for (int w = 0; w < kSimtWarps; ++w) sum += red[w][rr][m];
      store_output<T>(p, m, n, sum, lora[m * kSimtRows + rr]);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// host side

template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), unsigned grid, unsigned block, cudaStream_t stream, Args... args) {
  if (grid == 0) return cudaSuccess;
#if defined(FASTLORA_CUDA_EMU)
  (void)stream;
  // by value: the emulation may queue the launch and run it later (fastlora_cuda_emu.h, deferred launches)
  fastlora_emu::launch(grid, block, [=] { kernel(args...); });
#else
  kernel<<<grid, block, 0, stream>>>(args...);
#endif
  return cudaGetLastError();
}

int log2_exact(int64_t v) {  // log2 of a power of two, -1 otherwise
  if (v <= 0 || (v & (v - 1)) != 0) return -1;
  int l = 0;
  while ((int64_t{1} << l) < v) ++l;
  return l;
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

unsigned ceil_div(int64_t a, int64_t b) { return static_cast<unsigned>((a + b - 1) / b); }

// Dropout (p > 0) and S, with AT the adapters' type.
template <typename T, typename AT>
cudaError_t launch_s(const LoraLinearFwdArgs& a, cudaStream_t stream) {
  const int M = static_cast<int>(a.M), K = static_cast<int>(a.K), r = static_cast<int>(a.r);
  AT* S = static_cast<AT*>(a.S);
  const AT* A = static_cast<const AT*>(a.lora_A);
  if (a.dropout_p > 0.0) {
    AT* xd = static_cast<AT*>(a.xd);
    const int64_t n = a.M * a.K;
    if (n > 0) {
      const int64_t blocks = (n + 4 * kDropThreads - 1) / (4 * kDropThreads);
      const cudaError_t err =
          launch(lora_dropout_kernel<T, AT>, static_cast<unsigned>(blocks < 65536 ? blocks : 65536), kDropThreads,
                 stream, static_cast<const T*>(a.x), xd, n, a.seed, dropout_threshold(a.dropout_p),
                 dropout_scale(a.dropout_p));
      if (err != cudaSuccess) return err;
    }
    return launch(lora_s_kernel<AT, AT>, ceil_div(r, kSRanks), kSThreads, stream, static_cast<const AT*>(xd), A, S,
                  M, K, r);
  }
  return launch(lora_s_kernel<T, AT>, ceil_div(r, kSRanks), kSThreads, stream, static_cast<const T*>(a.x), A, S, M,
                K, r);
}

template <typename T>
constexpr bool kIsFloat = false;
template <>
constexpr bool kIsFloat<float> = true;

template <typename T>
cudaError_t launch_gemm(const LoraLinearFwdArgs& a, const GemmParams& p, cudaStream_t stream) {
  const bool vec = a.K % 32 == 0 && aligned16(a.x) && aligned16(a.packed);
  if constexpr (!kIsFloat<T>) {
    if (vec) {
      int device = 0, major = 0;
      cudaError_t err = cudaGetDevice(&device);
      if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
      if (err != cudaSuccess) return err;
      if (major >= 8) return launch(lora_linear_mma_kernel<T>, ceil_div(a.N, kMmaRows), kMmaThreads, stream, p);
    }
  }
  const unsigned grid = ceil_div(a.N, kSimtRows);
  if (!vec) return launch(lora_linear_simt_kernel<T, kMaxRows, false>, grid, kSimtThreads, stream, p);
  if (a.M <= 1) return launch(lora_linear_simt_kernel<T, 1, true>, grid, kSimtThreads, stream, p);
  if (a.M <= 4) return launch(lora_linear_simt_kernel<T, 4, true>, grid, kSimtThreads, stream, p);
  return launch(lora_linear_simt_kernel<T, kMaxRows, true>, grid, kSimtThreads, stream, p);
}

template <typename T>
cudaError_t launch_all(const LoraLinearFwdArgs& a, cudaStream_t stream) {
  const bool a_float = a.a_dtype == OutDtype::kFloat32;
  if (a.r > 0) {
    const cudaError_t err = a_float ? launch_s<T, float>(a, stream) : launch_s<T, T>(a, stream);
    if (err != cudaSuccess) return err;
  }
  GemmParams p;
  p.x = a.x;
  p.packed = a.packed;
  p.absmax = a.absmax;
  p.bias = a.bias;
  p.S = a.S;
  p.B = a.lora_B;
  p.y = a.y;
  p.M = static_cast<int>(a.M);
  p.N = static_cast<int>(a.N);
  p.K = static_cast<int>(a.K);
  p.r = static_cast<int>(a.r);
  p.log2_blocksize = log2_exact(a.blocksize);
  p.quant_type = a.quant_type;
  p.scaling = a.scaling;
  p.a_float = a_float ? 1 : 0;
  p.round_lora_to_x = a.round_lora_to_x ? 1 : 0;
  return launch_gemm<T>(a, p, stream);
}

}  // namespace

cudaError_t lora_linear_fwd_small_m(const LoraLinearFwdArgs& a, cudaStream_t stream) {
  constexpr int64_t kIntMax = 0x7fffffff;
  const int log2_bs = log2_exact(a.blocksize);
  const bool dtypes_ok = a.a_dtype == OutDtype::kFloat32 || a.a_dtype == a.x_dtype;
  if (a.M < 0 || a.M > kLoraMaxRows || a.N < 0 || a.N > kIntMax || a.K < 0 || a.K > kIntMax || a.r < 0 ||
      a.r > kIntMax || log2_bs < 5 || log2_bs > 12 || (a.quant_type != kNF4 && a.quant_type != kFP4) || !dtypes_ok ||
      !(a.dropout_p >= 0.0 && a.dropout_p < 1.0) ||
      (a.dropout_p > 0.0 && a.M * a.K > 0 && (a.xd == nullptr || a.seed == nullptr))) {
    return cudaErrorInvalidValue;
  }
  if (a.M == 0) return cudaSuccess;
  switch (a.x_dtype) {
    case OutDtype::kFloat32: return launch_all<float>(a, stream);
    case OutDtype::kBFloat16: return launch_all<__nv_bfloat16>(a, stream);
    case OutDtype::kFloat16: return launch_all<__half>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastlora::gpu
