// CUDA dispatch of fastlora::dequantize_4bit(_into) and fastlora::dequantize_absmax: argument checks,
// device guard, output allocation, then the plain launchers of dequantize_4bit.cu on torch's
// current stream.
//
// The stream comes from c10/cuda/CUDAStream.h (at::cuda::getCurrentCUDAStream is the same
// function): ATen/cuda/CUDAContext.h would also pull in the cuBLAS / cuSPARSE headers, which this
// file does not need.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime_api.h>

#include "dequantize_4bit.h"
#include "fastlora/checks.h"

namespace fastlora::gpu {
namespace {

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "fastlora::", op, ": CUDA kernel launch failed: ", cudaGetErrorName(err), " (",
              cudaGetErrorString(err), ")");
}

void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " must be on the same device as ", ref_name, " (",
                    ref.device(), "), got ", t.device());
}

OutDtype out_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return OutDtype::kFloat32;
    case at::kBFloat16: return OutDtype::kBFloat16;
    default: return OutDtype::kFloat16;  // check_dequantize_args admits nothing else
  }
}

at::Tensor dequantize_4bit_cuda(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                                c10::string_view quant_type, int64_t numel, at::ScalarType dtype) {
  const int qt = check_quant_type(quant_type);
  check_dequantize_args(packed, absmax, blocksize, numel, dtype, at::kCUDA);
  check_same_device(absmax, "absmax", packed, "packed");
  const c10::cuda::CUDAGuard guard(packed.device());
  at::Tensor out = at::empty({numel}, packed.options().dtype(dtype));
  if (numel == 0) return out;
  const at::Tensor p = packed.contiguous();
  const at::Tensor a = absmax.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(packed.device().index()).stream();
  check_launch(dequantize_4bit(p.data_ptr<uint8_t>(), a.data_ptr<float>(), out.data_ptr(), numel, blocksize, qt,
                               out_dtype(dtype), stream),
               "dequantize_4bit");
  return out;
}

void dequantize_4bit_into_cuda(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                               c10::string_view quant_type, at::Tensor out) {
  const int qt = check_quant_type(quant_type);
  TORCH_CHECK_VALUE(out.is_contiguous(), "out must be contiguous");
  const int64_t numel = out.numel();
  check_dequantize_args(packed, absmax, blocksize, numel, out.scalar_type(), at::kCUDA);
  check_same_device(absmax, "absmax", packed, "packed");
  check_same_device(out, "out", packed, "packed");
  if (numel == 0) return;
  const c10::cuda::CUDAGuard guard(packed.device());
  const at::Tensor p = packed.contiguous();
  const at::Tensor a = absmax.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(packed.device().index()).stream();
  check_launch(dequantize_4bit(p.data_ptr<uint8_t>(), a.data_ptr<float>(), out.data_ptr(), numel, blocksize, qt,
                               out_dtype(out.scalar_type()), stream),
               "dequantize_4bit_into");
}

at::Tensor dequantize_absmax_cuda(const at::Tensor& qabsmax, const at::Tensor& code, const at::Tensor& absmax2,
                                  const at::Tensor& offset, int64_t blocksize) {
  check_dequantize_absmax_args(qabsmax, code, absmax2, offset, blocksize, at::kCUDA);
  check_same_device(code, "code", qabsmax, "qabsmax");
  check_same_device(absmax2, "absmax2", qabsmax, "qabsmax");
  // A CUDA offset is read by the kernel itself (no .item(), so no host sync); a CPU one is passed
  // by value.
  const bool offset_on_device = offset.is_cuda();
  if (offset_on_device) {
    check_same_device(offset, "offset", qabsmax, "qabsmax");
  } else {
    TORCH_CHECK_VALUE(offset.is_cpu(), "offset must be on the CPU or on ", qabsmax.device(), ", got ",
                      offset.device());
  }
  const c10::cuda::CUDAGuard guard(qabsmax.device());
  const int64_t n = qabsmax.numel();
  at::Tensor out = at::empty({n}, qabsmax.options().dtype(at::kFloat));
  if (n == 0) return out;
  const at::Tensor q = qabsmax.contiguous();
  const at::Tensor c = code.contiguous();
  const at::Tensor a2 = absmax2.contiguous();
  // data_ptr of a one-element tensor points at its element whatever its shape and strides.
  const float* offset_device = offset_on_device ? offset.data_ptr<float>() : nullptr;
  const float offset_host = offset_on_device ? 0.0f : offset.item<float>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(qabsmax.device().index()).stream();
  check_launch(dequantize_absmax(q.data_ptr<uint8_t>(), c.data_ptr<float>(), a2.data_ptr<float>(), offset_device,
                                 offset_host, out.data_ptr<float>(), n, blocksize, stream),
               "dequantize_absmax");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlora, CUDA, m) {
  m.impl("dequantize_4bit", &dequantize_4bit_cuda);
  m.impl("dequantize_4bit_into", &dequantize_4bit_into_cuda);
  m.impl("dequantize_absmax", &dequantize_absmax_cuda);
}

}  // namespace fastlora::gpu
