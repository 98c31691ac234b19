// Kernels that check the CUDA emulation itself (tests/test_cuda_emu.py): that fibers keep their own stacks
// and registers across switches, that __syncthreads orders shared-memory writes and reads, that warp shuffles
// exchange lanes, and that a barrier some thread can never reach aborts instead of hanging.
#include <cuda_runtime.h>

#include <cstdint>

namespace {

constexpr int kThreads = 128;

// Tree reduction over shared memory, one barrier per level, with per-thread values kept on each fiber's
// stack (locals[]) and in registers (acc) across every barrier: out[block] = sum of f(block, t) over t, and
// checks[block * kThreads + t] = the thread's own recomputation after the barriers.
__global__ void block_sum_kernel(const int64_t* in, int64_t* out, int64_t* checks) {
  __shared__ int64_t partial[kThreads];
  const int t = static_cast<int>(threadIdx.x);
  const int64_t mine = in[blockIdx.x * kThreads + t];
  int64_t locals[8];
  for (int i = 0; i < 8; ++i) locals[i] = mine * (i + 1);
  int64_t acc = mine;
  partial[t] = mine;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (t < stride) partial[t] += partial[t + stride];
    acc = acc * 3 + 1;
    __syncthreads();
  }
  int64_t again = 0;
  for (int i = 0; i < 8; ++i) again += locals[i] / (i + 1);  // 8 * mine if the stack survived
  checks[blockIdx.x * kThreads + t] = again - 8 * mine + acc;
  if (t == 0) out[blockIdx.x] = partial[0];
}

// Butterfly sum across each warp with __shfl_xor_sync: every lane ends with its warp's total.
__global__ void warp_sum_kernel(const float* in, float* out) {
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  float v = in[i];
  for (int mask = 16; mask > 0; mask /= 2) v += __shfl_xor_sync(0xffffffffu, v, mask);
  out[i] = v;
}

// Thread 0 returns before the barrier the others wait at: a real GPU hangs or is undefined; the emulation aborts.
__global__ void early_exit_kernel(int* out) {
  if (threadIdx.x == 0) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

}  // namespace

extern "C" void fastlora_emu_selftest_block_sum(const int64_t* in, int64_t* out, int64_t* checks, int blocks) {
  fastlora_emu::launch(static_cast<unsigned>(blocks), kThreads, [=] { block_sum_kernel(in, out, checks); });
}

extern "C" void fastlora_emu_selftest_warp_sum(const float* in, float* out, int blocks, int threads) {
  fastlora_emu::launch(static_cast<unsigned>(blocks), static_cast<unsigned>(threads), [=] { warp_sum_kernel(in, out); });
}

extern "C" void fastlora_emu_selftest_early_exit(int* out) {
  fastlora_emu::launch(1, 64, [=] { early_exit_kernel(out); });
}
