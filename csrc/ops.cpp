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
  // values: fp32[n]; code: fp32[256] sorted. Returns (uint8[n] nearest codes, fp32 absmax per block).
  m.def("quantize_absmax(Tensor values, Tensor code, int blocksize) -> (Tensor, Tensor)");
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
