// Schemas of every fastlora custom op (the op contract) and the Python module fastlora._C.
// Kernels register themselves per dispatch key in csrc/cpu/*.cpp and csrc/cuda/*.cu; fake (meta)
// implementations are registered from Python in fastlora/ops/.
#include <torch/extension.h>

#include "cpu/cpu_features.h"

TORCH_LIBRARY(fastlora, m) {
  // packed: uint8[ceil(numel/2)] (any quant_storage viewed as bytes); absmax: fp32[ceil(numel/blocksize)].
  // Returns a flat tensor of `numel` elements in `dtype` (float32 / bfloat16 / float16).
  m.def(
      "dequantize_4bit(Tensor packed, Tensor absmax, int blocksize, str quant_type, int numel, "
      "ScalarType dtype) -> Tensor");
  // Same, written into a caller-owned contiguous buffer out[numel] of the output dtype (a reused
  // workspace: a fresh 100 MB output costs more in page faults than the decode itself).
  m.def("dequantize_4bit_into(Tensor packed, Tensor absmax, int blocksize, str quant_type, Tensor(a!) out) -> ()");
  // qabsmax: uint8[n]; code: fp32[256]; absmax2: fp32[ceil(n/blocksize)]; offset: fp32 scalar.
  // Returns fp32[n] = code[qabsmax] * absmax2[i / blocksize] + offset, two roundings.
  m.def("dequantize_absmax(Tensor qabsmax, Tensor code, Tensor absmax2, Tensor offset, int blocksize) -> Tensor");
  // weight: fp32/bf16/fp16, any shape. Returns (packed uint8[ceil(numel/2)], absmax fp32[blocks]).
  m.def("quantize_4bit(Tensor weight, int blocksize, str quant_type) -> (Tensor, Tensor)");
  // values: fp32[n]; code: fp32[256] sorted. Returns (uint8[n] codes, fp32 absmax per block), bitsandbytes'
  // CPU 8-bit quantization (65536-point grid, see cpu/quantize_4bit.cpp).
  m.def("quantize_absmax(Tensor values, Tensor code, int blocksize) -> (Tensor, Tensor)");

  // LoRA ops (shapes, dtypes and rounding: fastlora/ops/lora_linear.py and fastlora/reference_lora.py;
  // randomness: include/fastlora/philox.h). `seed` is an int64 tensor with one element, value in [0, 2^63):
  // on the CPU for CPU kernels, on the GPU (read by the kernel at run time, CUDA-graph safe) for GPU ones.
  // x: any shape, fp32/bf16/fp16. Returns round(x * scale) where Philox(seed) keeps the element, else 0.
  m.def("lora_dropout(Tensor x, float p, Tensor seed) -> Tensor");
  // x (M, K); weight dense (N, K) of x's dtype when absmax is None, else uint8[ceil(N*K/2)] codes with
  // fp32 absmax[ceil(N*K/blocksize)]; lora_A (r, K), lora_B (N, r) fp32 or x's dtype; bias (N,) or None.
  // Returns (y (M, N) x's dtype, S = dropout(x)·Aᵀ (M, r) lora_A's dtype).
  m.def(
      "lora_linear_fwd(Tensor x, Tensor weight, Tensor? absmax, int blocksize, str quant_type, int out_features, "
      "Tensor lora_A, Tensor lora_B, float scaling, Tensor? bias, float dropout_p, Tensor seed, str rounding) "
      "-> (Tensor, Tensor)");
  // Returns (dx (M, K), dA (r, K), dB (N, r)); an output whose need_* is false is an empty tensor.
  m.def(
      "lora_linear_bwd(Tensor grad_y, Tensor x, Tensor S, Tensor weight, Tensor? absmax, int blocksize, "
      "str quant_type, int out_features, Tensor lora_A, Tensor lora_B, float scaling, float dropout_p, Tensor seed, "
      "bool need_dx, bool need_dA, bool need_dB) -> (Tensor, Tensor, Tensor)");

  // NEFTune (fastlora/ops/neftune_embedding.py, fastlora/reference_neftune.py; randomness: philox.h stream 1).
  // ids int64 (T,) in [0, V); weight (V, d) fp32/bf16/fp16; mag fp32 (T,) per-token noise magnitude.
  // Returns (T, d) weight's dtype: round(weight[ids[t], j] + u(t*d + j) * mag[t]), u in [-1, 1); mag 0 rows copied.
  m.def("neftune_embedding(Tensor ids, Tensor weight, Tensor mag, Tensor seed) -> Tensor");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "fastlora compiled kernels (ops are registered under torch.ops.fastlora)";
  module.def("cpu_features", &fastlora::cpu::cpu_features, "CPU features the kernels detected and use");
  module.def("with_cuda", []() {
#ifdef FASTLORA_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether the extension was built with its CUDA kernels");
}
