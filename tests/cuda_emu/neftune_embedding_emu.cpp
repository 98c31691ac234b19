// C entry point over the CPU emulation of csrc/cuda/neftune_embedding.cu (tests/test_cuda_neftune.py builds
// this file into a shared library and calls it through ctypes). The CUDA source is compiled here as plain C++
// against the emulation headers of tests/cuda_emu/include.
#include "neftune_embedding.cu"

// seed: pointer to the int64 seed, read by the kernels when they run.
extern "C" int fastlora_emu_neftune_embedding(const int64_t* ids, const void* weight, const float* mag, void* out,
                                              int64_t T, int64_t V, int64_t d, const int64_t* seed, int dtype) {
  return fastlora::gpu::neftune_embedding(ids, weight, mag, out, T, V, d, seed,
                                          static_cast<fastlora::gpu::OutDtype>(dtype), nullptr);
}

// Launches made while deferring is set are queued; fastlora_emu_run_deferred runs them (a graph replay).
extern "C" void fastlora_emu_set_deferring(int on) { fastlora_emu::deferring = on != 0; }
extern "C" void fastlora_emu_run_deferred() { fastlora_emu::run_deferred(); }
