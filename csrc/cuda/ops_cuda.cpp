// CUDA dispatch of fastlora::dequantize_4bit(_into), fastlora::dequantize_absmax, (small M, 4-bit weight)
// fastlora::lora_linear_fwd and fastlora::neftune_embedding: argument checks, device guard, output allocation,
// then the plain launchers of dequantize_4bit.cu / lora_linear.cu / neftune_embedding.cu on torch's current stream.
//
// The stream comes from c10/cuda/CUDAStream.h (at::cuda::getCurrentCUDAStream is the same
// function): ATen/cuda/CUDAContext.h would also pull in the cuBLAS / cuSPARSE headers, which this
// file does not need.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime_api.h>

#include <optional>
#include <tuple>

#include "dequantize_4bit.h"
#include "fastlora/checks.h"
#include "lora_linear.h"
#include "neftune_embedding.h"

namespace fastlora::gpu {
namespace {

void check_launch(cudaError_t err, const char* op) {
  FASTLORA_CHECK(err == cudaSuccess, "fastlora::", op, ": CUDA kernel launch failed: ", cudaGetErrorName(err), " (",
                 cudaGetErrorString(err), ")");
}

// A CUDA event the host waits on (created on first record, destroyed with the object; the runtime API directly:
// ATen's CUDAEvent header pulls in the whole CUDA context, cuSPARSE's headers included).
class HostEvent {
 public:
  HostEvent() = default;
  HostEvent(const HostEvent&) = delete;
  HostEvent& operator=(const HostEvent&) = delete;
  ~HostEvent() {
    if (event_ != nullptr) cudaEventDestroy(event_);
  }
  void record(cudaStream_t stream) {
    if (event_ == nullptr) C10_CUDA_CHECK(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming));
    C10_CUDA_CHECK(cudaEventRecord(event_, stream));
  }
  void synchronize() const { C10_CUDA_CHECK(cudaEventSynchronize(event_)); }

 private:
  cudaEvent_t event_ = nullptr;
};

void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  FASTLORA_CHECK_VALUE(t.device() == ref.device(), name, " must be on the same device as ", ref_name, " (",
                       ref.device(), "), got ", t.device());
}

// The dropout / NEFTune seed for a kernel on `ref`'s GPU: an int64 tensor with one element (0-dim or (1,)) on
// that GPU, passed as is, or on the CPU. The kernels load it from device memory when they run, so a GPU seed is
// never read on the host (that would synchronize, and under CUDA graph capture bake the value into the graph);
// a CUDA graph replays whatever value the tensor holds then. A CPU seed is checked to lie in [0, 2^63) (free to
// read) and copied to the device, non_blocking, on the current stream: convenient, but the copy reads host
// memory when it is issued, so it is not CUDA-graph safe. Call under the device guard of `ref`.
// `copy` = false checks the seed only (the kernels will not read it).
at::Tensor seed_on_device(const at::Tensor& seed, const at::Tensor& ref, bool copy = true) {
  check_seed_tensor(seed);
  if (seed.is_cpu()) {
    read_cpu_seed(seed);
    return copy ? seed.to(ref.device(), at::kLong, /*non_blocking=*/true) : seed;
  }
  FASTLORA_CHECK_VALUE(seed.device() == ref.device(), "seed must be on the CPU or on ", ref.device(),
                       " (the inputs' device), got ", seed.device());
  return seed;
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
  FASTLORA_CHECK_VALUE(out.is_contiguous(), "out must be contiguous");
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
    FASTLORA_CHECK_VALUE(offset.is_cpu(), "offset must be on the CPU or on ", qabsmax.device(), ", got ",
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

// The CUDA kernels cover the decode regime only: a 4-bit weight and at most 16 rows of x. The Python
// layer (fastlora/ops/lora_linear.py) sends dense weights and larger M to the Triton backend; a
// direct call outside that range is refused here, naming the argument.
std::tuple<at::Tensor, at::Tensor> lora_linear_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                        const std::optional<at::Tensor>& absmax, int64_t blocksize,
                                                        c10::string_view quant_type, int64_t out_features,
                                                        const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                        double scaling, const std::optional<at::Tensor>& bias,
                                                        double dropout_p, const at::Tensor& seed,
                                                        c10::string_view rounding) {
  FASTLORA_CHECK_VALUE(absmax.has_value(),
                       "weight: the CUDA kernel of fastlora::lora_linear_fwd takes only 4-bit weights (codes + "
                       "absmax); dense weights run on the Triton backend (fastlora.ops.lora_linear routes them there)");
  const int qt = check_quant_type(quant_type);
  check_blocksize(blocksize, "blocksize");
  FASTLORA_CHECK_VALUE(rounding == "linear" || rounding == "linear4bit",
                       "rounding must be 'linear' or 'linear4bit', got '", std::string(rounding), "'");
  FASTLORA_CHECK_VALUE(x.dim() == 2, "x must be 2-D (M, in_features), got shape ", x.sizes());
  const int64_t M = x.size(0), K = x.size(1), N = out_features;
  FASTLORA_CHECK_VALUE(M <= kLoraMaxRows, "x: the CUDA kernel of fastlora::lora_linear_fwd takes at most ",
                       kLoraMaxRows, " rows (M, the decode regime), got M=", M,
                       "; larger M runs on the Triton backend");
  FASTLORA_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
                      "x must be float32, bfloat16 or float16, got ", x.scalar_type());
  FASTLORA_CHECK_VALUE(N >= 0, "out_features must be >= 0, got ", N);
  const at::Tensor& am = *absmax;
  FASTLORA_CHECK_TYPE(weight.scalar_type() == at::kByte, "weight (4-bit codes) must be uint8, got ",
                      weight.scalar_type());
  FASTLORA_CHECK_TYPE(am.scalar_type() == at::kFloat, "absmax must be float32 (resolved), got ", am.scalar_type());
  const int64_t numel = N * K;
  FASTLORA_CHECK_VALUE(weight.numel() == (numel + 1) / 2, "weight must hold ceil(out_features*in_features/2) = ",
                       (numel + 1) / 2, " bytes of codes, got ", weight.numel());
  FASTLORA_CHECK_VALUE(am.numel() == (numel + blocksize - 1) / blocksize,
                       "absmax must hold ceil(out_features*in_features/blocksize) = ",
                       (numel + blocksize - 1) / blocksize, " values, got ", am.numel());
  FASTLORA_CHECK_VALUE(lora_A.dim() == 2 && lora_A.size(1) == K, "lora_A must be (r, in_features=", K, "), got shape ",
                       lora_A.sizes());
  const int64_t r = lora_A.size(0);
  FASTLORA_CHECK_VALUE(lora_B.dim() == 2 && lora_B.size(0) == N && lora_B.size(1) == r,
                       "lora_B must be (out_features, r) = (", N, ", ", r, "), got shape ", lora_B.sizes());
  FASTLORA_CHECK_TYPE(lora_A.scalar_type() == lora_B.scalar_type(), "lora_A and lora_B must have one dtype, got ",
                      lora_A.scalar_type(), " and ", lora_B.scalar_type());
  FASTLORA_CHECK_TYPE(lora_A.scalar_type() == at::kFloat || lora_A.scalar_type() == x.scalar_type(),
                      "lora_A must be float32 or x's dtype ", x.scalar_type(), ", got ", lora_A.scalar_type());
  if (bias.has_value()) {
    FASTLORA_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, "bias must be (out_features=", N, ",), got shape ",
                         bias->sizes());
    FASTLORA_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), "bias must have x's dtype ", x.scalar_type(), ", got ",
                        bias->scalar_type());
  }
  FASTLORA_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1), got ", dropout_p);
  check_device(x, "x", at::kCUDA);
  check_same_device(weight, "weight", x, "x");
  check_same_device(am, "absmax", x, "x");
  check_same_device(lora_A, "lora_A", x, "x");
  check_same_device(lora_B, "lora_B", x, "x");
  if (bias.has_value()) check_same_device(*bias, "bias", x, "x");

  const c10::cuda::CUDAGuard guard(x.device());
  // Only the dropout kernel reads the seed: without dropout (or dropout of nothing) it is checked, not copied.
  const bool dropout = dropout_p > 0.0 && M * K > 0;
  const at::Tensor seed_dev = seed_on_device(seed, x, dropout);
  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor S = at::empty({M, r}, lora_A.options());
  if (M == 0) return {y, S};
  const at::Tensor xc = x.contiguous();
  const at::Tensor w = weight.contiguous();
  const at::Tensor a = am.contiguous();
  const at::Tensor A = lora_A.contiguous();
  const at::Tensor B = lora_B.contiguous();
  at::Tensor b;
  if (bias.has_value()) b = bias->contiguous();
  // dropout(x) in A's dtype, read by the S kernel (the mask is regenerated from the seed in backward)
  at::Tensor xd;
  if (dropout_p > 0.0) xd = at::empty({M, K}, lora_A.options());

  LoraLinearFwdArgs args;
  args.x = xc.data_ptr();
  args.packed = w.data_ptr<uint8_t>();
  args.absmax = a.data_ptr<float>();
  args.bias = bias.has_value() ? b.data_ptr() : nullptr;
  args.lora_A = A.data_ptr();
  args.lora_B = B.data_ptr();
  args.y = y.data_ptr();
  args.S = S.data_ptr();
  args.xd = dropout_p > 0.0 ? xd.data_ptr() : nullptr;
  args.M = M;
  args.N = N;
  args.K = K;
  args.r = r;
  args.blocksize = blocksize;
  args.quant_type = qt;
  args.x_dtype = out_dtype(x.scalar_type());
  args.a_dtype = out_dtype(lora_A.scalar_type());
  args.scaling = static_cast<float>(scaling);  // fp32, as the reference's torch.tensor(scaling, float32)
  args.dropout_p = dropout_p;
  // data_ptr of a one-element tensor points at its element whatever its shape and strides.
  args.seed = dropout ? seed_dev.data_ptr<int64_t>() : nullptr;
  args.round_lora_to_x = rounding == "linear4bit";
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  check_launch(lora_linear_fwd_small_m(args, stream), "lora_linear_fwd");
  return {y, S};
}

// ids out of range are found on the host with one aminmax (a device sync) before the launch, so a bad id is a
// ValueError, never a device-side fault. While the stream is being captured into a CUDA graph no host read is
// possible (it would end the capture with an error): the check is skipped there and a bad id's row is NaN, as
// the kernel never dereferences such ids.
at::Tensor neftune_embedding_cuda(const at::Tensor& ids, const at::Tensor& weight, const at::Tensor& mag,
                                  const at::Tensor& seed) {
  FASTLORA_CHECK_TYPE(ids.scalar_type() == at::kLong, "ids must be int64, got ", ids.scalar_type());
  FASTLORA_CHECK_TYPE(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16 ||
                       weight.scalar_type() == at::kHalf,
                      "weight must be float32, bfloat16 or float16, got ", weight.scalar_type());
  FASTLORA_CHECK_TYPE(mag.scalar_type() == at::kFloat, "mag must be float32, got ", mag.scalar_type());
  FASTLORA_CHECK_VALUE(ids.dim() == 1, "ids must be 1-D (T,) flat token ids, got shape ", ids.sizes());
  FASTLORA_CHECK_VALUE(weight.dim() == 2, "weight must be 2-D (V, d), got shape ", weight.sizes());
  FASTLORA_CHECK_VALUE(mag.dim() == 1 && mag.size(0) == ids.size(0), "mag must have the shape of ids (", ids.size(0),
                       ",), got shape ", mag.sizes());
  check_device(weight, "weight", at::kCUDA);
  check_same_device(ids, "ids", weight, "weight");
  check_same_device(mag, "mag", weight, "weight");
  const int64_t T = ids.size(0), V = weight.size(0), d = weight.size(1);
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor seed_dev = seed_on_device(seed, weight, T > 0 && d > 0);
  at::Tensor out = at::empty({T, d}, weight.options());
  if (T == 0 || d == 0) return out;
  FASTLORA_CHECK_VALUE(V > 0, "input_ids: out of range for an empty weight (V = 0)");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(weight.device().index()).stream();
  // cudaStreamIsCapturing directly: c10's stream-taking wrapper is newer than some torch releases we build against.
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  // The ids' (min, max), copied to pinned host memory without blocking and read after the kernel is queued behind
  // the copy: the GPU goes on with the lookup while the host waits for two numbers (the one sync). Bad ids only
  // give NaN rows of an output that is dropped with the error.
  at::Tensor range;
  HostEvent range_ready;
  if (capture == cudaStreamCaptureStatusNone) {
    const auto [lo, hi] = at::aminmax(ids);
    range = at::empty({2}, ids.options().device(at::kCPU).pinned_memory(true));
    range.copy_(at::stack({lo, hi}), /*non_blocking=*/true);
    range_ready.record(stream);
  }
  const at::Tensor i = ids.contiguous();
  const at::Tensor w = weight.contiguous();
  const at::Tensor m = mag.contiguous();
  check_launch(neftune_embedding(i.data_ptr<int64_t>(), w.data_ptr(), m.data_ptr<float>(), out.data_ptr(), T, V, d,
                                 seed_dev.data_ptr<int64_t>(), out_dtype(weight.scalar_type()), stream),
               "neftune_embedding");
  if (range.defined()) {
    range_ready.synchronize();
    const int64_t lo_v = range.data_ptr<int64_t>()[0], hi_v = range.data_ptr<int64_t>()[1];
    FASTLORA_CHECK_VALUE(lo_v >= 0 && hi_v < V, "input_ids must be in [0, ", V, ") (the rows of weight), got ",
                         lo_v < 0 ? lo_v : hi_v);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlora, CUDA, m) {
  m.impl("dequantize_4bit", &dequantize_4bit_cuda);
  m.impl("dequantize_4bit_into", &dequantize_4bit_into_cuda);
  m.impl("dequantize_absmax", &dequantize_absmax_cuda);
  m.impl("lora_linear_fwd", &lora_linear_fwd_cuda);
  m.impl("neftune_embedding", &neftune_embedding_cuda);
}

}  // namespace fastlora::gpu
