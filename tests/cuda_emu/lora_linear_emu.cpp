// C entry point over the CPU emulation of csrc/cuda/lora_linear.cu (tests/test_cuda_lora.py
// builds this file into a shared library and calls it through ctypes). The CUDA source is compiled
// here as plain C++ against the emulation headers of tests/cuda_emu/include. seed: pointer to the int64
// seed, read by the dropout kernel when it runs.
#include "lora_linear.cu"

extern "C" int fastlora_emu_lora_linear_fwd(const void* x, const uint8_t* packed, const float* absmax,
                                            const void* bias, const void* lora_A, const void* lora_B, void* y,
                                            void* S, void* xd, int64_t M, int64_t N, int64_t K, int64_t r,
                                            int64_t blocksize, int quant_type, int x_dtype, int a_dtype,
                                            float scaling, double dropout_p, const int64_t* seed, int round_lora_to_x,
                                            int compute_capability_major) {
  fastlora_emu::compute_capability_major = compute_capability_major;
  fastlora::gpu::LoraLinearFwdArgs a;
  a.x = x;
  a.packed = packed;
  a.absmax = absmax;
  a.bias = bias;
  a.lora_A = lora_A;
  a.lora_B = lora_B;
  a.y = y;
  a.S = S;
  a.xd = xd;
  a.M = M;
  a.N = N;
  a.K = K;
  a.r = r;
  a.blocksize = blocksize;
  a.quant_type = quant_type;
  a.x_dtype = static_cast<fastlora::gpu::OutDtype>(x_dtype);
  a.a_dtype = static_cast<fastlora::gpu::OutDtype>(a_dtype);
  a.scaling = scaling;
  a.dropout_p = dropout_p;
  a.seed = seed;
  a.round_lora_to_x = round_lora_to_x != 0;
  return fastlora::gpu::lora_linear_fwd_small_m(a, nullptr);
}

// Launches made while deferring is set are queued; fastlora_emu_run_deferred runs them (a graph replay).
extern "C" void fastlora_emu_set_deferring(int on) { fastlora_emu::deferring = on != 0; }
extern "C" void fastlora_emu_run_deferred() { fastlora_emu::run_deferred(); }
