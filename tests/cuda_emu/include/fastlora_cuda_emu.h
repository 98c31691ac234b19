// A small CPU emulation of the CUDA features fastlora's kernels use, so that the kernel logic of
// csrc/cuda/*.cu (indexing, fragment layouts, reductions, roundings) is tested on machines without a
// GPU. Tests only: compile a .cu as C++ with
//   g++ -x c++ -std=c++17 -O1 -ffp-contract=off -DFASTLORA_CUDA_EMU -I tests/cuda_emu/include ...
// The headers cuda_runtime.h, cuda_runtime_api.h, cuda_bf16.h and cuda_fp16.h of this folder stand
// in for the real ones and all include this file.
//
// Model: a launch runs its blocks one after another; the threads of a block are cooperative fibers
// on one OS thread, switched only at __syncthreads() and warp-collective operations
// (__shfl_xor_sync, mma), so there are no data races and runs are deterministic. __shared__ is
// `static`, i.e. shared by the threads of the running block. A barrier that can never complete
// (e.g. a thread returned before it) aborts with a message. Warp-collective operations require all
// 32 lanes of the warp, as the kernels' full masks do.
//
// Emulated: threadIdx / blockIdx / blockDim / gridDim (x only), __syncthreads, __shfl_xor_sync,
// __ldg, the vector types used, __nv_bfloat16 / __half with their RNE conversions (quant4.h's
// float_to_bf16_bits / float_to_fp16_bits), __fmul_rn / __fadd_rn, __float_as_uint /
// __uint_as_float, mma.sync.m16n8k16 (bf16 / f16 inputs, fp32 accumulation, fragment layouts of the
// PTX ISA) and the few runtime calls the launchers make, and deferred launches (a stand-in for CUDA
// graph capture and replay, see run_deferred).
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#include "fastlora/quant4.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint4 {
  unsigned x, y, z, w;
};
struct uint2 {
  unsigned x, y;
};
struct float4 {
  float x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

inline dim3 threadIdx, blockIdx, blockDim, gridDim;

// ---- 16-bit float types

struct __nv_bfloat16 {
  uint16_t bits;
};
struct __half {
  uint16_t bits;
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
struct __half2 {
  __half x, y;
};

inline float __uint_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline uint32_t __float_as_uint(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{fastlora::float_to_bf16_bits(f)}; }
inline float __bfloat162float(__nv_bfloat16 h) { return __uint_as_float(uint32_t{h.bits} << 16); }
inline __half __float2half_rn(float f) { return __half{fastlora::float_to_fp16_bits(f)}; }
inline float __half2float(__half h) {
  const uint32_t sign = uint32_t{h.bits & 0x8000u} << 16;
  const uint32_t exp = (h.bits >> 10) & 0x1fu;
  const uint32_t mant = h.bits & 0x3ffu;
  if (exp == 0) {
    const float f = std::ldexp(static_cast<float>(mant), -24);  // zero or subnormal, exact
    return sign ? -f : f;
  }
  if (exp == 31) return __uint_as_float(sign | 0x7f800000u | (mant << 13));
  return __uint_as_float(sign | ((exp + 112u) << 23) | (mant << 13));
}
inline __half __ushort_as_half(unsigned short bits) { return __half{bits}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return __nv_bfloat162{__float2bfloat16_rn(a), __float2bfloat16_rn(b)};
}
inline __half2 __floats2half2_rn(float a, float b) { return __half2{__float2half_rn(a), __float2half_rn(b)}; }

inline float __fmul_rn(float a, float b) { return a * b; }  // built with -ffp-contract=off
inline float __fadd_rn(float a, float b) { return a + b; }

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

// ---- runtime API subset

using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;
using cudaStream_t = void*;
enum cudaDeviceAttr { cudaDevAttrComputeCapabilityMajor = 75, cudaDevAttrMultiProcessorCount = 16 };

namespace fastlora_emu {

inline int compute_capability_major = 9;  // set lower to make the launchers take their sm<80 paths
inline cudaError_t last_error = cudaSuccess;

// ---- fiber scheduler
//
// On x86-64 fibers switch with fastlora_emu_switch_stack below (callee-saved registers and the stack pointer):
// glibc's swapcontext also saves the floating-point environment and makes an rt_sigprocmask system call on
// every switch, which was most of an emulated test's run time (20 s -> 2 s without it). Other architectures and AddressSanitizer
// builds (FASTLORA_EMU_CFLAGS, which must see stack switches through swapcontext) keep ucontext, as does
// -DFASTLORA_EMU_UCONTEXT (tests/test_cuda_emu.py runs both).
#if defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__) && !defined(FASTLORA_EMU_UCONTEXT)
#define FASTLORA_EMU_STACK_SWITCH 1
// fastlora_emu_switch_stack(save, next): push the callee-saved registers of the System V ABI, store the stack
// pointer in *save, load `next` (a pointer an earlier switch stored, or a fresh stack prepared by start_fiber),
// pop that context's registers and return into it. Every other register is caller-saved, so the compiler has
// spilled what it needs around the call. MXCSR and the x87 control word are not switched: no kernel changes
// rounding modes. Weak and hidden: one definition per shared library, whichever emulated kernels it holds.
extern "C" void fastlora_emu_switch_stack(void** save, void* next);
asm(R"(
  .text
  .weak fastlora_emu_switch_stack
  .hidden fastlora_emu_switch_stack
  .type fastlora_emu_switch_stack, @function
fastlora_emu_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size fastlora_emu_switch_stack, .-fastlora_emu_switch_stack
)");
#else
#define FASTLORA_EMU_STACK_SWITCH 0
#endif

constexpr size_t kStackBytes = 128 * 1024;

struct Fiber {
#if FASTLORA_EMU_STACK_SWITCH
  void* sp = nullptr;  // saved stack pointer while switched out
#else
  ucontext_t ctx;
#endif
  std::vector<char> stack;
  bool done = false;
};

struct Block {
  std::vector<Fiber> fibers;
#if FASTLORA_EMU_STACK_SWITCH
  void* scheduler_sp = nullptr;
#else
  ucontext_t scheduler;
#endif
  int current = 0;
  int nthreads = 0;
  const std::function<void()>* body = nullptr;
  int block_arrived = 0;
  unsigned block_generation = 0;
  std::vector<int> warp_arrived;
  std::vector<unsigned> warp_generation;
  std::vector<std::vector<uint32_t>> exchange;  // per warp: 32 lanes x kExchangeWords
  long idle_yields = 0;                          // yields since the last barrier release / exit
};
constexpr int kExchangeWords = 16;

inline Block& block() {
  static Block b;
  return b;
}

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "fastlora CUDA emulation: %s (block %u, thread %u)\n", what, blockIdx.x, threadIdx.x);
  std::abort();
}

inline void yield_to_scheduler() {
  Block& b = block();
#if FASTLORA_EMU_STACK_SWITCH
  fastlora_emu_switch_stack(&b.fibers[b.current].sp, b.scheduler_sp);
#else
  swapcontext(&b.fibers[b.current].ctx, &b.scheduler);
#endif
}

inline void switch_to_fiber(unsigned t) {
  Block& b = block();
#if FASTLORA_EMU_STACK_SWITCH
  fastlora_emu_switch_stack(&b.scheduler_sp, b.fibers[t].sp);
#else
  swapcontext(&b.scheduler, &b.fibers[t].ctx);
#endif
}

inline void fiber_entry() {
  Block& b = block();
  (*b.body)();
  b.fibers[b.current].done = true;
  b.idle_yields = 0;
#if FASTLORA_EMU_STACK_SWITCH
  yield_to_scheduler();  // a finished fiber is never switched to again
  fail("a finished fiber was resumed");
#endif
  // with ucontext, returning switches to uc_link (the scheduler)
}

inline void start_fiber(Fiber& f) {
  f.done = false;
  f.stack.resize(kStackBytes);
#if FASTLORA_EMU_STACK_SWITCH
  // The fresh stack as fastlora_emu_switch_stack pops it: six callee-saved registers (zero), then the address
  // its `ret` jumps to, fiber_entry, entered as if called (the ABI's rsp + 8 aligned to 16) with a null return
  // address it never uses.
  const auto top = reinterpret_cast<uintptr_t>(f.stack.data() + f.stack.size()) & ~uintptr_t{15};
  void** slots = reinterpret_cast<void**>(top);
  slots[-1] = nullptr;
  slots[-2] = reinterpret_cast<void*>(&fiber_entry);
  for (int i = 3; i <= 8; ++i) slots[-i] = nullptr;
  f.sp = slots - 8;
#else
  Block& b = block();
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack.data();
  f.ctx.uc_stack.ss_size = f.stack.size();
  f.ctx.uc_link = &b.scheduler;
  makecontext(&f.ctx, fiber_entry, 0);
#endif
}

inline void wait_generation(const unsigned& generation, unsigned seen) {
  Block& b = block();
  while (generation == seen) {
    ++b.idle_yields;
    yield_to_scheduler();
  }
}

inline void block_barrier() {
  Block& b = block();
  const unsigned seen = b.block_generation;
  if (++b.block_arrived == b.nthreads) {
    b.block_arrived = 0;
    ++b.block_generation;
    b.idle_yields = 0;
    return;
  }
  wait_generation(b.block_generation, seen);
}

inline void warp_barrier() {
  Block& b = block();
  const int w = static_cast<int>(threadIdx.x) / 32;
  const unsigned seen = b.warp_generation[w];
  if (++b.warp_arrived[w] == 32) {
    b.warp_arrived[w] = 0;
    ++b.warp_generation[w];
    b.idle_yields = 0;
    return;
  }
  wait_generation(b.warp_generation[w], seen);
}

inline uint32_t* lane_slot(int lane) {
  Block& b = block();
  return b.exchange[threadIdx.x / 32].data() + lane * kExchangeWords;
}

inline void run_block(unsigned nthreads, const std::function<void()>& body) {
  Block& b = block();
  if (nthreads % 32 != 0) fail("block size must be a multiple of 32");
  b.nthreads = static_cast<int>(nthreads);
  b.body = &body;
  b.fibers.resize(nthreads);
  b.block_arrived = 0;
  b.warp_arrived.assign(nthreads / 32, 0);
  b.warp_generation.assign(nthreads / 32, 0);
  b.exchange.assign(nthreads / 32, std::vector<uint32_t>(32 * kExchangeWords, 0));
  for (unsigned t = 0; t < nthreads; ++t) start_fiber(b.fibers[t]);
  b.idle_yields = 0;
  for (;;) {
    bool any = false;
    for (unsigned t = 0; t < nthreads; ++t) {
      if (b.fibers[t].done) continue;
      any = true;
      b.current = static_cast<int>(t);
      threadIdx = dim3(t);
      switch_to_fiber(t);
    }
    if (!any) break;
    if (b.idle_yields > 2L * nthreads) fail("deadlock: a barrier or warp-collective operation can never complete");
  }
}

inline void run_grid(unsigned grid, unsigned block_threads, const std::function<void()>& body) {
  gridDim = dim3(grid);
  blockDim = dim3(block_threads);
  for (unsigned bx = 0; bx < grid; ++bx) {
    blockIdx = dim3(bx);
    run_block(block_threads, body);
  }
  threadIdx = dim3(0);
  blockIdx = dim3(0);
}

// Deferred launches stand in for a captured CUDA graph: while `deferring` is set, launch() queues the
// kernel (body must hold its arguments by value) and returns, and run_deferred() later runs the queue in
// launch order. Whatever a kernel reads from memory it reads then, as at a graph replay; a value a
// launcher read on the host at launch time would be stale by then.
inline bool deferring = false;
inline std::vector<std::function<void()>> deferred;

inline void launch(unsigned grid, unsigned block_threads, std::function<void()> body) {
  if (deferring) {
    deferred.push_back([grid, block_threads, body = std::move(body)] { run_grid(grid, block_threads, body); });
    return;
  }
  run_grid(grid, block_threads, body);
}

inline void run_deferred() {
  std::vector<std::function<void()>> queue;
  queue.swap(deferred);
  for (const auto& run : queue) run();
}

// ---- warp-collective operations

inline float shfl_xor(float v, int lane_mask) {
  const int lane = static_cast<int>(threadIdx.x) % 32;
  lane_slot(lane)[0] = __float_as_uint(v);
  warp_barrier();
  const float out = __uint_as_float(lane_slot(lane ^ lane_mask)[0]);
  warp_barrier();
  return out;
}

inline float half_of(uint32_t word, int half, bool bf16) {
  const uint32_t bits = (word >> (16 * half)) & 0xffffu;
  return bf16 ? __uint_as_float(bits << 16) : __half2float(__half{static_cast<uint16_t>(bits)});
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32, D = A·B + C, fragment layouts of
// the PTX ISA (g = lane / 4, t = lane % 4):
//   A (16x16): a[0] = (row g, cols 2t, 2t+1), a[1] = (row g+8, cols 2t, 2t+1),
//              a[2] = (row g, cols 2t+8, 2t+9), a[3] = (row g+8, cols 2t+8, 2t+9); low half first
//   B (16x8):  b[0] = (rows 2t, 2t+1, col g), b[1] = (rows 2t+8, 2t+9, col g)
//   C, D (16x8 fp32): d[0], d[1] = (row g, cols 2t, 2t+1), d[2], d[3] = (row g+8, cols 2t, 2t+1)
// Products of 16-bit inputs are exact in fp32; the sum runs over k in order, one rounding per add.
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], bool bf16) {
  const int lane = static_cast<int>(threadIdx.x) % 32;
  uint32_t* mine = lane_slot(lane);
  for (int i = 0; i < 4; ++i) mine[i] = a[i];
  for (int i = 0; i < 2; ++i) mine[4 + i] = b[i];
  warp_barrier();
  auto a_at = [&](int row, int col) {
    const uint32_t* src = lane_slot((row % 8) * 4 + (col % 8) / 2);
    const int reg = (row < 8 ? 0 : 1) + (col < 8 ? 0 : 2);
    return half_of(src[reg], col & 1, bf16);
  };
  auto b_at = [&](int row, int col) {
    const uint32_t* src = lane_slot(col * 4 + (row % 8) / 2);
    return half_of(src[4 + (row < 8 ? 0 : 1)], row & 1, bf16);
  };
  const int g = lane / 4, t = lane % 4;
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i >> 1);
    const int col = 2 * t + (i & 1);
    float s = d[i];
    for (int k = 0; k < 16; ++k) s = s + a_at(row, k) * b_at(k, col);
    out[i] = s;
  }
  warp_barrier();
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}

}  // namespace fastlora_emu

inline void __syncthreads() { fastlora_emu::block_barrier(); }
inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask, int width = 32) {
  if (mask != 0xffffffffu || width != 32) fastlora_emu::fail("only full-warp shuffles are emulated");
  return fastlora_emu::shfl_xor(v, lane_mask);
}

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = fastlora_emu::last_error;
  fastlora_emu::last_error = cudaSuccess;
  return e;
}
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulated error"; }
inline const char* cudaGetErrorName(cudaError_t e) { return e == cudaSuccess ? "cudaSuccess" : "cudaErrorEmulated"; }
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int /*device*/) {
  *value = attr == cudaDevAttrComputeCapabilityMajor ? fastlora_emu::compute_capability_major : 132;
  return cudaSuccess;
}
