// C++ CPU kernels of fastlora::lora_linear_fwd / lora_linear_bwd (semantics and rounding points:
// fastlora/reference_lora.py; all arithmetic in fp32).
//
// The big GEMMs (x·Wᵀ forward, G·W backward) run in MKL through at::mm. A 4-bit (or bf16/fp16
// dense) weight is never materialised in full: forward walks tiles of output rows of W, backward
// tiles of input columns of W; each tile is decoded (or widened) into an fp32 buffer of at most
// 8 MiB per thread (L3-resident), multiplied, and its slice of the output is finished right away
// by a fused epilogue (bias, the LoRA branch, the rounding, and in backward the dropout mask
// regenerated with Philox, shared by dx and by dropout(x) for dA). A dense fp32 weight is not
// copied: its tiles are views.
//
// Threads take whole tiles (one parallel region per op, MKL single-threaded inside it). Measured
// on 2 cores, 1024 x 4096 -> 4096: this beats one 2-thread MKL GEMM per tile (a barrier per tile,
// thin GEMMs split two ways) and, with 8 MiB tiles, matches one full-size 2-thread torch.mm; each
// MKL call repacks the whole activation operand, so tiles much smaller than ~512 weight rows cost
// up to 10% more GEMM time (2 MiB tiles: +7% fwd+bwd). Transients per thread: the weight tile,
// and two to three (M, tile) fp32 buffers; bf16/fp16 x and grad_y are widened to fp32 once.
//
// bf16 GEMM mode (bf16 x on a CPU with native bf16 -- AVX512-BF16 / AMX -- or forced with
// FASTLORA_CPU_BF16_GEMM=1; =0 forces it off; cpu_features.h): the two big GEMMs run in bf16 in
// torch (oneDNN, fp32 accumulation; ~4x the fp32 GEMM on an AVX512-BF16 EPYC), on tiles of W decoded
// to bf16 (the same rnd_bf16(code * absmax) values): forward rnd(x·Wᵀ + bias) comes rounded out of
// the GEMM (a bf16 bias inside it, as F.linear), then the epilogue adds the LoRA branch as before --
// the reference's rounding; backward dx = rnd(rnd(G·W) + keep·scale·(dS·A)), one rounding more than
// the reference: PEFT's autograd sums the base layer's bf16 gradient and the LoRA branch's (PEFT
// also rounds the LoRA branch's gradient to bf16 before that sum; here it stays fp32). S, dA, dB
// are unchanged (fp32). fp32 / fp16 x always use the fp32 GEMMs (MKL).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <optional>
#include <tuple>

#include "cpu_features.h"
#include "fastlora/checks.h"
#include "fastlora/philox.h"
#include "fastlora/quant4.h"
#include "lora_cpu.h"
#include "lora_elementwise.h"
#include "lora_philox.h"
#include "quant4_avx2.h"

namespace fastlora::cpu {
namespace {

template <DT d>
struct Tag {
  static constexpr DT value = d;
};

// Calls f(Tag<X>, Tag<A>) for x's dtype X and the adapters' dtype A (float32 or X).
template <class F>
void dispatch_xa(DT x, DT a, F&& f) {
  switch (x) {
    case DT::F32: f(Tag<DT::F32>{}, Tag<DT::F32>{}); break;
    case DT::BF16:
      if (a == DT::F32) f(Tag<DT::BF16>{}, Tag<DT::F32>{});
      else f(Tag<DT::BF16>{}, Tag<DT::BF16>{});
      break;
    case DT::F16:
      if (a == DT::F32) f(Tag<DT::F16>{}, Tag<DT::F32>{});
      else f(Tag<DT::F16>{}, Tag<DT::F16>{});
      break;
  }
}

constexpr int64_t elem_size(DT d) { return d == DT::F32 ? 4 : 2; }

// fp32 bytes a decoded weight tile may take, per thread (FASTLORA_CPU_TILE_BYTES overrides, for
// benchmarks and tests). 8 MiB = 512 rows of K = 4096: see the file comment.
int64_t tile_budget_bytes() {
  const char* env = std::getenv("FASTLORA_CPU_TILE_BYTES");
  if (env != nullptr && env[0] != '\0') {
    const long long v = std::atoll(env);
    if (v > 0) return v;
  }
  return int64_t{8} << 20;
}

// How many rows of `row_len` values of `elem` bytes (fp32; bf16 tiles in the bf16 GEMM mode) fit
// the tile budget (a multiple of 16, at least 16).
int64_t tile_extent(int64_t total, int64_t row_len, int64_t elem = 4) {
  int64_t t = tile_budget_bytes() / (elem * std::max<int64_t>(row_len, 1));
  t = std::max<int64_t>(16, t / 16 * 16);
  return std::min(t, total);
}

// Rows per parallel task so that each task has ~16K elements.
int64_t row_grain(int64_t row_len) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(row_len, 1)); }

// ---------------------------------------------------------------------------------------------
// The frozen weight

enum class WKind { DenseF32, Dense16, FourBit };

struct Weight {
  WKind kind = WKind::DenseF32;
  at::Tensor dense;  // (N, K) contiguous, x's dtype
  at::Tensor packed, absmax;
  int lg_blocksize = 6;
  float table[16] = {};
};

// 4-bit decode of flat elements [e0, e0 + len) into out[0, len): round_X(code * absmax), stored as
// Out (fp32, or bf16 for the bf16 GEMMs: exact, the value is already a bf16 value then).
template <DT X, DT Out>
void decode_range_portable(const Weight& w, int64_t e0, int64_t len, void* out) {
  const uint8_t* packed = w.packed.data_ptr<uint8_t>();
  const float* absmax = w.absmax.data_ptr<float>();
  for (int64_t i = 0; i < len; ++i) {
    const int64_t e = e0 + i;
    const uint32_t byte = packed[e >> 1];
    const uint32_t q = (e & 1) ? (byte & 0xfu) : (byte >> 4);
    store1<Out>(out, i, round1<X>(w.table[q] * absmax[e >> w.lg_blocksize]));
  }
}

#if defined(__x86_64__)
// Per absmax block, the 16 possible outputs round_X(code * absmax) are computed once and then only
// looked up: fp32 tiles with two 8-entry table permutes per 8 elements, bf16 (fp16) tiles with
// vpshufb on byte planes of the 16-bit results (quant4_avx2.h). Same bits as the per-element math.
template <DT X, DT Out>
FL_AVX2 void decode_range_avx2(const Weight& w, int64_t e0, int64_t len, void* out) {
  const uint8_t* packed = w.packed.data_ptr<uint8_t>();
  const float* absmax = w.absmax.data_ptr<float>();
  const int lg = w.lg_blocksize;
  const __m256 table_lo = _mm256_loadu_ps(w.table);
  const __m256 table_hi = _mm256_loadu_ps(w.table + 8);
  int64_t i = 0;
  while (i < len) {
    // One absmax block at a time; the first element may be an odd (low-nibble) one.
    const int64_t b = (e0 + i) >> lg;
    const int64_t seg_end = std::min(len, ((b + 1) << lg) - e0);
    const float s = absmax[b];
    if ((e0 + i) & 1) {
      store1<Out>(out, i, round1<X>(w.table[packed[(e0 + i) >> 1] & 0xfu] * s));
      ++i;
    }
    const __m256 scale = _mm256_set1_ps(s);
    const __m256 value_lo = round8<X>(_mm256_mul_ps(table_lo, scale));
    const __m256 value_hi = round8<X>(_mm256_mul_ps(table_hi, scale));
    if constexpr (Out == DT::F32) {
      i += decode_run_f32(packed + ((e0 + i) >> 1), value_lo, value_hi, static_cast<float*>(out) + i, seg_end - i);
    } else {
      const Planes16 planes = Out == DT::BF16 ? planes16_bf16(value_lo, value_hi, std::isfinite(s))
                                              : planes16_fp16(value_lo, value_hi);
      i += decode_run_planes16(packed + ((e0 + i) >> 1), planes, static_cast<uint16_t*>(out) + i, seg_end - i);
    }
    for (; i < seg_end; ++i) {
      const int64_t e = e0 + i;
      const uint32_t byte = packed[e >> 1];
      store1<Out>(out, i, round1<X>(w.table[(e & 1) ? (byte & 0xfu) : (byte >> 4)] * s));
    }
  }
}
#endif

template <DT X, DT Out>
void decode_range(const Weight& w, int64_t e0, int64_t len, void* out, bool avx2) {
#if defined(__x86_64__)
  if (avx2) return decode_range_avx2<X, Out>(w, e0, len, out);
#endif
  decode_range_portable<X, Out>(w, e0, len, out);
}

// Rows [n0, n0 + nt) of W (all K columns) as Out (buf's dtype) into buf (nt, K).
template <DT X, DT Out = DT::F32>
void weight_rows(const Weight& w, int64_t n0, int64_t nt, int64_t K, at::Tensor& buf, bool avx2) {
  if (w.kind == WKind::Dense16) {
    buf.copy_(w.dense.narrow(0, n0, nt));
    return;
  }
  char* out = static_cast<char*>(buf.data_ptr());
  at::parallel_for(0, nt, row_grain(K), [&](int64_t a, int64_t b) {
    for (int64_t n = a; n < b; ++n) decode_range<X, Out>(w, (n0 + n) * K, K, out + n * K * elem_size(Out), avx2);
  });
}

// Columns [k0, k0 + kt) of W (all N rows) as Out (buf's dtype) into buf (N, kt).
template <DT X, DT Out = DT::F32>
void weight_cols(const Weight& w, int64_t k0, int64_t kt, int64_t N, int64_t K, at::Tensor& buf, bool avx2) {
  if (w.kind == WKind::Dense16) {
    buf.copy_(w.dense.narrow(1, k0, kt));
    return;
  }
  char* out = static_cast<char*>(buf.data_ptr());
  const uint8_t* packed = w.packed.data_ptr<uint8_t>();
  const int64_t row_bytes = (kt + 1) / 2 + 1;
  at::parallel_for(0, N, row_grain(kt), [&](int64_t a, int64_t b) {
    for (int64_t n = a; n < b; ++n) {
      // The codes of consecutive tile rows are K / 2 bytes apart, a stride the hardware prefetcher
      // misses once the weight is out of cache (decode 40% faster in backward): fetch 4 rows ahead.
      if (n + 4 < b) {
        const uint8_t* ahead = packed + (((n + 4) * K + k0) >> 1);
        for (int64_t off = 0; off < row_bytes; off += 64) __builtin_prefetch(ahead + off);
      }
      decode_range<X, Out>(w, n * K + k0, kt, out + n * kt * elem_size(Out), avx2);
    }
  });
}

// A contiguous (rows, cols) view of the front of a flat buffer.
at::Tensor front(const at::Tensor& flat, int64_t rows, int64_t cols) {
  return flat.narrow(0, 0, rows * cols).view({rows, cols});
}

// ---------------------------------------------------------------------------------------------
// Argument checks (ValueError / TypeError naming the argument; never a crash)

struct Problem {
  int64_t M = 0, K = 0, N = 0, r = 0;
  DT x_dt = DT::F32, a_dt = DT::F32;
  Weight w;
};

Problem check_problem(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& absmax,
                      int64_t blocksize, c10::string_view quant_type, int64_t out_features, const at::Tensor& lora_A,
                      const at::Tensor& lora_B) {
  Problem pr;
  check_float_tensor(x, "x");
  FASTLORA_CHECK_VALUE(x.dim() == 2, "x must be 2-D (M, in_features), got shape ", x.sizes());
  pr.M = x.size(0);
  pr.K = x.size(1);
  pr.x_dt = float_dt(x.scalar_type());
  FASTLORA_CHECK_VALUE(out_features >= 0, "out_features must be >= 0, got ", out_features);
  pr.N = out_features;
  check_device(x, "x", at::kCPU);
  check_device(weight, "weight", at::kCPU);
  if (absmax.has_value()) {
    const int qt = check_quant_type(quant_type);
    check_blocksize(blocksize, "blocksize");
    FASTLORA_CHECK_TYPE(weight.scalar_type() == at::kByte,
                        "weight must be uint8 packed 4-bit codes when absmax is given, got ", weight.scalar_type());
    FASTLORA_CHECK_TYPE(absmax->scalar_type() == at::kFloat,
                        "absmax must be float32 (resolve double quant first), got ", absmax->scalar_type());
    check_device(*absmax, "absmax", at::kCPU);
    const int64_t numel = pr.N * pr.K;
    FASTLORA_CHECK_VALUE(weight.numel() == (numel + 1) / 2, "weight must hold ceil(out_features*in_features/2) = ",
                         (numel + 1) / 2, " packed bytes for out_features=", pr.N, ", in_features=", pr.K, ", got ",
                         weight.numel());
    FASTLORA_CHECK_VALUE(absmax->numel() == (numel + blocksize - 1) / blocksize,
                         "absmax must hold ceil(out_features*in_features/blocksize) = ",
                         (numel + blocksize - 1) / blocksize, " values, got ", absmax->numel());
    pr.w.kind = WKind::FourBit;
    pr.w.packed = weight.detach().contiguous();
    pr.w.absmax = absmax->detach().contiguous();
    pr.w.lg_blocksize = __builtin_ctzll(static_cast<unsigned long long>(blocksize));
    for (uint32_t q = 0; q < 16; ++q) pr.w.table[q] = code_value(qt, q);
  } else {
    FASTLORA_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), "weight must have x's dtype ", x.scalar_type(),
                        " when dense (absmax is None), got ", weight.scalar_type());
    FASTLORA_CHECK_VALUE(weight.dim() == 2 && weight.size(0) == pr.N && weight.size(1) == pr.K,
                         "weight must be (out_features, in_features) = (", pr.N, ", ", pr.K, "), got shape ",
                         weight.sizes());
    pr.w.kind = pr.x_dt == DT::F32 ? WKind::DenseF32 : WKind::Dense16;
    pr.w.dense = weight.detach().contiguous();
  }
  FASTLORA_CHECK_TYPE(lora_A.scalar_type() == at::kFloat || lora_A.scalar_type() == x.scalar_type(),
                      "lora_A must be float32 or x's dtype ", x.scalar_type(), ", got ", lora_A.scalar_type());
  FASTLORA_CHECK_TYPE(lora_B.scalar_type() == lora_A.scalar_type(), "lora_B must have lora_A's dtype ",
                      lora_A.scalar_type(), ", got ", lora_B.scalar_type());
  FASTLORA_CHECK_VALUE(lora_A.dim() == 2 && lora_A.size(1) == pr.K, "lora_A must be (r, in_features=", pr.K,
                       "), got shape ", lora_A.sizes());
  pr.r = lora_A.size(0);
  FASTLORA_CHECK_VALUE(lora_B.dim() == 2 && lora_B.size(0) == pr.N && lora_B.size(1) == pr.r,
                       "lora_B must be (out_features, r) = (", pr.N, ", ", pr.r, "), got shape ", lora_B.sizes());
  check_device(lora_A, "lora_A", at::kCPU);
  check_device(lora_B, "lora_B", at::kCPU);
  pr.a_dt = float_dt(lora_A.scalar_type());
  return pr;
}

bool check_rounding(c10::string_view rounding) {
  if (rounding == "linear") return false;
  if (rounding == "linear4bit") return true;
  FASTLORA_CHECK_VALUE(false, "rounding must be 'linear' or 'linear4bit', got '", std::string(rounding), "'");
  return false;
}

at::Tensor to_f32(const at::Tensor& t) { return t.detach().to(at::kFloat).contiguous(); }

// ---------------------------------------------------------------------------------------------
// Forward

// S = dropout(x)·Aᵀ in fp32 (not yet rounded to A's dtype); dropout(x) is regenerated in row blocks
// of ~2 MiB, the threads taking whole blocks.
template <DT X, DT A>
void lora_down_dropout(const at::Tensor& x, const at::Tensor& A32, double p, uint64_t seed, int64_t M, int64_t K,
                       at::Tensor& S32raw, bool avx2) {
  const uint32_t threshold = dropout_threshold(p);
  const float scale = dropout_scale(p);
  const int64_t mb = std::max<int64_t>(
      1, std::min<int64_t>((M + at::get_num_threads() - 1) / at::get_num_threads(), (int64_t{1} << 19) / K));
  const int64_t blocks = (M + mb - 1) / mb;
  const char* xp = static_cast<const char*>(x.data_ptr());
  const at::ThreadLocalState tls;  // the worker threads call ATen (at::mm) below autograd too
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    at::ThreadLocalStateGuard tls_guard(tls);
    at::Tensor xd = at::empty({mb * K}, x.options().dtype(at::kFloat));
    float* xdp = xd.data_ptr<float>();
    alignas(32) uint32_t mask[kMaskChunk];
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t m0 = blk * mb, rows = std::min(mb, M - m0);
      for (int64_t m = 0; m < rows; ++m) {
        for (int64_t k = 0; k < K; k += kMaskChunk) {
          const int64_t n = std::min(kMaskChunk, K - k);
          const int64_t e = (m0 + m) * K + k;
          dropout_mask(seed, threshold, e, n, mask, avx2);
          dropout_apply<X, A, DT::F32>(xp + e * elem_size(X), xdp + m * K + k, mask, scale, n, avx2);
        }
      }
      at::Tensor out = S32raw.narrow(0, m0, rows);
      at::mm_out(out, front(xd, rows, K), A32.t());
    }
  });
}

// Tile extent for `total` rows (or columns) of `row_len` fp32 values each: the tile budget, but
// small enough that every thread gets at least one tile.
int64_t tile_extent_threads(int64_t total, int64_t row_len, int64_t elem = 4) {
  const int64_t threads = at::get_num_threads();
  const int64_t per_thread = ((total + threads - 1) / threads + 15) / 16 * 16;
  return std::min(tile_extent(total, row_len, elem), std::max<int64_t>(per_thread, 16));
}

// The threads take whole tiles (one parallel region per op; MKL runs single-threaded inside it):
// no barrier per tile, and MKL is not asked to split a thin GEMM two ways.
template <DT X, DT A>
void fwd_impl(const Problem& pr, const at::Tensor& x, const at::Tensor& x32, const at::Tensor& S32,
              const at::Tensor& B32, const at::Tensor& bias32, float scaling, bool linear4bit, at::Tensor& y,
              bool avx2) {
  const int64_t M = pr.M, K = pr.K, N = pr.N;
  const bool dense_f32 = pr.w.kind == WKind::DenseF32;
  // Output rows of W per tile: (nt, K) fp32, decoded into a buffer or a view of a dense fp32 W.
  const int64_t nt_max = tile_extent_threads(N, K);
  const int64_t tiles = (N + nt_max - 1) / nt_max;
  const auto f32 = x.options().dtype(at::kFloat);
  const float* bias = bias32.defined() ? bias32.data_ptr<float>() : nullptr;
  char* yp = static_cast<char*>(y.data_ptr());
  const at::ThreadLocalState tls;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    at::ThreadLocalStateGuard tls_guard(tls);
    at::Tensor lora = at::empty({M * nt_max}, f32);
    at::Tensor ybuf = at::empty({M * nt_max}, f32);
    at::Tensor wbuf = dense_f32 ? at::Tensor() : at::empty({nt_max * K}, f32);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * nt_max, nt = std::min(nt_max, N - n0);
      at::Tensor wt;
      if (dense_f32) {
        wt = pr.w.dense.narrow(0, n0, nt);
      } else {
        wt = front(wbuf, nt, K);
        weight_rows<X>(pr.w, n0, nt, K, wt, avx2);
      }
      at::Tensor yt = front(ybuf, M, nt);
      at::mm_out(yt, x32, wt.t());
      at::Tensor lt = front(lora, M, nt);
      at::mm_out(lt, S32, B32.narrow(0, n0, nt).t());
      const float* base = yt.data_ptr<float>();
      const float* lp = lt.data_ptr<float>();
      for (int64_t m = 0; m < M; ++m) {
        fwd_epilogue<X, A>(base + m * nt, lp + m * nt, bias != nullptr ? bias + n0 : nullptr, scaling, linear4bit,
                           yp + (m * N + n0) * elem_size(X), nt, avx2);
      }
    }
  });
}

// bf16 GEMM mode (bf16 x, use_bf16_gemm()): each tile of W is decoded to bf16 -- the values
// bitsandbytes dequantizes to, rnd_bf16(code * absmax) -- or is a view of a dense bf16 W, and
// x·Wᵀ [+ bias] runs as one bf16 GEMM in torch (oneDNN: fp32 accumulation, one rounding to bf16 --
// PEFT's base layer F.linear). A bias that is not bf16 cannot enter that GEMM: it is added to the
// rounded base in the epilogue, rnd(rnd(x·Wᵀ) + bias), one rounding more than the reference.
template <DT A>
void fwd_impl_bf16(const Problem& pr, const at::Tensor& x, const at::Tensor& S32, const at::Tensor& B32,
                   const at::Tensor& bias16, const at::Tensor& bias32, float scaling, bool linear4bit, at::Tensor& y,
                   bool avx2) {
  constexpr DT X = DT::BF16;
  const int64_t M = pr.M, K = pr.K, N = pr.N;
  const bool dense = pr.w.kind != WKind::FourBit;  // a dense W has x's dtype: its tiles are views
  const int64_t nt_max = tile_extent_threads(N, K, 2);  // bf16 tiles: twice the rows of fp32 ones
  const int64_t tiles = (N + nt_max - 1) / nt_max;
  const auto f32 = x.options().dtype(at::kFloat);
  const float* bias = bias32.defined() ? bias32.data_ptr<float>() : nullptr;
  char* yp = static_cast<char*>(y.data_ptr());
  const at::ThreadLocalState tls;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    at::ThreadLocalStateGuard tls_guard(tls);
    at::Tensor lora = at::empty({M * nt_max}, f32);
    at::Tensor ybuf = at::empty({M * nt_max}, x.options());
    at::Tensor wbuf = dense ? at::Tensor() : at::empty({nt_max * K}, x.options());
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * nt_max, nt = std::min(nt_max, N - n0);
      at::Tensor wt;
      if (dense) {
        wt = pr.w.dense.narrow(0, n0, nt);
      } else {
        wt = front(wbuf, nt, K);
        weight_rows<X, DT::BF16>(pr.w, n0, nt, K, wt, avx2);
      }
      at::Tensor yt = front(ybuf, M, nt);
      if (bias16.defined()) {
        at::addmm_out(yt, bias16.narrow(0, n0, nt), x, wt.t());
      } else {
        at::mm_out(yt, x, wt.t());
      }
      at::Tensor lt = front(lora, M, nt);
      at::mm_out(lt, S32, B32.narrow(0, n0, nt).t());
      const char* base = static_cast<const char*>(yt.data_ptr());
      const float* lp = lt.data_ptr<float>();
      for (int64_t m = 0; m < M; ++m) {
        fwd_epilogue<X, A, DT::BF16>(base + m * nt * elem_size(X), lp + m * nt, bias != nullptr ? bias + n0 : nullptr,
                                     scaling, linear4bit, yp + (m * N + n0) * elem_size(X), nt, avx2);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> lora_linear_fwd_cpu(const at::Tensor& x_in, const at::Tensor& weight,
                                                       const std::optional<at::Tensor>& absmax, int64_t blocksize,
                                                       c10::string_view quant_type, int64_t out_features,
                                                       const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                       double scaling, const std::optional<at::Tensor>& bias,
                                                       double dropout_p, const at::Tensor& seed_t, c10::string_view rounding) {
  // The ATen calls below work on plain tensors: keep them out of autograd (the inputs may require
  // grad when the op runs inside an autograd.Function).
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Problem pr = check_problem(x_in, weight, absmax, blocksize, quant_type, out_features, lora_A, lora_B);
  const bool linear4bit = check_rounding(rounding);
  check_dropout_p(dropout_p, "dropout_p");
  const uint64_t seed = read_cpu_seed(seed_t);
  const bool bf16_gemm = pr.x_dt == DT::BF16 && use_bf16_gemm();
  at::Tensor bias32, bias16;  // bias16: a bf16 bias that enters the bf16 GEMM
  if (bias.has_value()) {
    check_float_tensor(*bias, "bias");
    FASTLORA_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == pr.N, "bias must be (out_features=", pr.N,
                         ",), got shape ", bias->sizes());
    check_device(*bias, "bias", at::kCPU);
    if (bf16_gemm && bias->scalar_type() == at::kBFloat16) {
      bias16 = bias->detach().contiguous();
    } else {
      bias32 = to_f32(*bias);
    }
  }
  const int64_t M = pr.M, K = pr.K, N = pr.N;
  const bool avx2 = has_avx2_fma_f16c();
  const at::Tensor x = x_in.detach().contiguous();
  const at::Tensor x32 = to_f32(x);
  const at::Tensor A32 = to_f32(lora_A);
  const at::Tensor B32 = to_f32(lora_B);
  const auto f32 = x.options().dtype(at::kFloat);

  // LoRA down-projection S = rnd_A(dropout(x)·Aᵀ).
  at::Tensor S32raw = at::empty({M, pr.r}, f32);
  if (dropout_p == 0.0 || K == 0 || M == 0) {
    at::mm_out(S32raw, x32, A32.t());  // dropout(x) with p = 0 is x itself
  } else {
    dispatch_xa(pr.x_dt, pr.a_dt, [&](auto xt, auto at_) {
      lora_down_dropout<decltype(xt)::value, decltype(at_)::value>(x, A32, dropout_p, seed, M,
                                                                   K, S32raw, avx2);
    });
  }
  const at::Tensor S = pr.a_dt == DT::F32 ? S32raw : S32raw.to(lora_A.scalar_type());
  const at::Tensor S32 = to_f32(S);

  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return {y, S};
  const float scale_f = static_cast<float>(scaling);
  if (bf16_gemm) {
    if (pr.a_dt == DT::F32) {
      fwd_impl_bf16<DT::F32>(pr, x, S32, B32, bias16, bias32, scale_f, linear4bit, y, avx2);
    } else {
      fwd_impl_bf16<DT::BF16>(pr, x, S32, B32, bias16, bias32, scale_f, linear4bit, y, avx2);
    }
    return {y, S};
  }
  dispatch_xa(pr.x_dt, pr.a_dt, [&](auto xt, auto at_) {
    fwd_impl<decltype(xt)::value, decltype(at_)::value>(pr, x, x32, S32, B32, bias32, scale_f, linear4bit, y, avx2);
  });
  return {y, S};
}

// ---------------------------------------------------------------------------------------------
// Backward

// G16 defined: bf16 GEMM mode (bf16 x, use_bf16_gemm()): G·W runs as a bf16 GEMM on G16 (grad_y)
// and tiles of W decoded to bf16, rounded to bf16 by the GEMM; dx = rnd(rnd(G·W) + lora term) as
// PEFT's autograd sums the base layer's bf16 gradient and the LoRA branch's.
template <DT X, DT A>
void bwd_impl(const Problem& pr, const at::Tensor& x, const at::Tensor& G32, const at::Tensor& G16, const at::Tensor& dS,
              const at::Tensor& A32, double p, uint64_t seed, bool need_dx, bool need_dA, at::Tensor& dx,
              at::Tensor& dA32, bool avx2) {
  const int64_t M = pr.M, K = pr.K, N = pr.N, r = pr.r;
  const bool bf16_gemm = G16.defined();
  const bool dense_f32 = pr.w.kind == WKind::DenseF32;
  const bool view = dense_f32 || (bf16_gemm && pr.w.kind == WKind::Dense16);  // tiles of W are views
  const bool decode = need_dx && !view;
  const auto f32 = x.options().dtype(at::kFloat);
  const auto gemm_opts = bf16_gemm ? G16.options() : f32;
  // Input columns of W per tile: (N, kt) fp32, decoded into a buffer or a strided view of a dense
  // fp32 W; without dx the tile is only the (M, kt) dropout(x) buffer.
  const int64_t kt_max = need_dx ? tile_extent_threads(K, N, bf16_gemm ? 2 : 4) : tile_extent_threads(K, M);
  const int64_t tiles = (K + kt_max - 1) / kt_max;
  const bool dropout = p > 0.0;
  const uint32_t threshold = dropout ? dropout_threshold(p) : 0;
  const float scale = dropout ? dropout_scale(p) : 1.0f;
  const char* xp = static_cast<const char*>(x.data_ptr());
  char* dxp = need_dx ? static_cast<char*>(dx.data_ptr()) : nullptr;
  const at::ThreadLocalState tls;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    at::ThreadLocalStateGuard tls_guard(tls);
    at::Tensor wbuf, gbuf, dxd, xd, da_tile;
    if (need_dx) {
      dxd = at::empty({M * kt_max}, f32);
      gbuf = at::empty({M * kt_max}, gemm_opts);
    }
    if (decode) wbuf = at::empty({N * kt_max}, gemm_opts);
    if (need_dA) {
      xd = at::empty({M * kt_max}, f32);
      da_tile = at::empty({r * kt_max}, f32);
    }
    alignas(32) uint32_t mask_buf[kMaskChunk];
    const uint32_t* mask = dropout ? mask_buf : nullptr;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t k0 = t * kt_max, kt = std::min(kt_max, K - k0);
      const char* base = nullptr;   // (M, kt) G·W tile, fp32 (bf16 in bf16 GEMM mode)
      const float* dxdp = nullptr;  // (M, kt) dS·A tile
      if (need_dx) {
        at::Tensor wt;
        if (view) {
          wt = pr.w.dense.narrow(1, k0, kt);
        } else if (bf16_gemm) {
          wt = front(wbuf, N, kt);
          weight_cols<X, DT::BF16>(pr.w, k0, kt, N, K, wt, avx2);
        } else {
          wt = front(wbuf, N, kt);
          weight_cols<X>(pr.w, k0, kt, N, K, wt, avx2);
        }
        at::Tensor gt = front(gbuf, M, kt);
        at::mm_out(gt, bf16_gemm ? G16 : G32, wt);
        base = static_cast<const char*>(gt.data_ptr());
        at::Tensor dt = front(dxd, M, kt);
        at::mm_out(dt, dS, A32.narrow(1, k0, kt));
        dxdp = dt.data_ptr<float>();
      }
      float* xdp = need_dA ? xd.data_ptr<float>() : nullptr;
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t j = 0; j < kt; j += kMaskChunk) {
          const int64_t n = std::min(kMaskChunk, kt - j);
          const int64_t e = m * K + k0 + j;  // row-major index of element (m, k0 + j) of x and dx
          if (dropout) dropout_mask(seed, threshold, e, n, mask_buf, avx2);
          if (need_dx) {
            if (bf16_gemm) {
              dx_epilogue<X, DT::BF16>(base + (m * kt + j) * 2, dxdp + m * kt + j, mask, scale, dxp + e * elem_size(X), n,
                                       avx2);
            } else {
              dx_epilogue<X>(base + (m * kt + j) * 4, dxdp + m * kt + j, mask, scale, dxp + e * elem_size(X), n, avx2);
            }
          }
          if (need_dA) dropout_apply<X, A, DT::F32>(xp + e * elem_size(X), xdp + m * kt + j, mask, scale, n, avx2);
        }
      }
      if (need_dA) {
        at::Tensor dat = front(da_tile, r, kt);
        at::mm_out(dat, dS.t(), front(xd, M, kt));
        dA32.narrow(1, k0, kt).copy_(dat);
      }
    }
  });
}

// bf16 GEMM mode: dS = G·B and Sᵀ·G (for dB) in fp32 from a bf16 G that is never widened whole (a
// (M, N) fp32 copy costs more than these two thin GEMMs): row blocks of ~2 MiB are widened into a
// per-thread buffer and used at once; each thread sums its own (r, N) part of Sᵀ·G, and the parts
// are added in thread order.
void ds_stg_bf16(const at::Tensor& G16, const at::Tensor& B32, const at::Tensor& S32, bool need_stg, at::Tensor& dS,
                 at::Tensor& StG, bool avx2) {
  const int64_t M = G16.size(0), N = G16.size(1), r = B32.size(1);
  const int64_t threads = at::get_num_threads();
  const int64_t mb =
      std::max<int64_t>(1, std::min<int64_t>((M + threads - 1) / threads, (int64_t{1} << 19) / std::max<int64_t>(N, 1)));
  const int64_t blocks = (M + mb - 1) / mb;
  const auto f32 = G16.options().dtype(at::kFloat);
  dS = at::empty({M, r}, f32);
  at::Tensor parts = need_stg ? at::zeros({threads, r, N}, f32) : at::Tensor();
  const char* gp = static_cast<const char*>(G16.data_ptr());
  const at::ThreadLocalState tls;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    at::ThreadLocalStateGuard tls_guard(tls);
    at::Tensor buf = at::empty({mb * N}, f32);
    at::Tensor part = need_stg ? parts[at::get_thread_num()] : at::Tensor();
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t m0 = blk * mb, rows = std::min(mb, M - m0);
      dropout_apply<DT::BF16, DT::F32, DT::F32>(gp + m0 * N * 2, buf.data_ptr<float>(), nullptr, 1.0f, rows * N, avx2);
      const at::Tensor g = front(buf, rows, N);
      at::Tensor ds = dS.narrow(0, m0, rows);
      at::mm_out(ds, g, B32);
      if (need_stg) part.addmm_(S32.narrow(0, m0, rows).t(), g);
    }
  });
  if (need_stg) StG = parts.sum(0);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_linear_bwd_cpu(
    const at::Tensor& grad_y, const at::Tensor& x_in, const at::Tensor& S, const at::Tensor& weight,
    const std::optional<at::Tensor>& absmax, int64_t blocksize, c10::string_view quant_type, int64_t out_features,
    const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling, double dropout_p, const at::Tensor& seed_t,
    bool need_dx, bool need_dA, bool need_dB) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Problem pr = check_problem(x_in, weight, absmax, blocksize, quant_type, out_features, lora_A, lora_B);
  check_dropout_p(dropout_p, "dropout_p");
  const uint64_t seed = read_cpu_seed(seed_t);
  const int64_t M = pr.M, K = pr.K, N = pr.N, r = pr.r;
  check_float_tensor(grad_y, "grad_y");
  FASTLORA_CHECK_VALUE(grad_y.dim() == 2 && grad_y.size(0) == M && grad_y.size(1) == N,
                       "grad_y must be (M, out_features) = (", M, ", ", N, "), got shape ", grad_y.sizes());
  check_float_tensor(S, "S");
  FASTLORA_CHECK_VALUE(S.dim() == 2 && S.size(0) == M && S.size(1) == r, "S must be (M, r) = (", M, ", ", r,
                       "), got shape ", S.sizes());
  check_device(grad_y, "grad_y", at::kCPU);
  check_device(S, "S", at::kCPU);
  const bool avx2 = has_avx2_fma_f16c();
  const at::Tensor x = x_in.detach().contiguous();
  // bf16 GEMM mode for dx: bf16 x and bf16 grad_y (PEFT's case) on a CPU with native bf16.
  const bool bf16_gemm = need_dx && pr.x_dt == DT::BF16 && grad_y.scalar_type() == at::kBFloat16 && use_bf16_gemm();
  const at::Tensor G16 = bf16_gemm ? grad_y.detach().contiguous() : at::Tensor();
  const at::Tensor G32 = bf16_gemm ? at::Tensor() : to_f32(grad_y);
  const at::Tensor A32 = to_f32(lora_A);
  const at::Tensor B32 = to_f32(lora_B);
  const float scale_f = static_cast<float>(scaling);

  at::Tensor dx = at::empty({0}, x.options()), dA = at::empty({0}, lora_A.options()),
             dB = at::empty({0}, lora_B.options());
  // dB = scaling·Gᵀ·S, computed as (Sᵀ·G)ᵀ: MKL reads G row-major (1.6x faster than Gᵀ·S on one core).
  at::Tensor dS;  // scaling·G·B, (M, r), fp32, not rounded
  if (bf16_gemm) {
    at::Tensor StG;
    ds_stg_bf16(G16, B32, to_f32(S), need_dB && M > 0, dS, StG, avx2);
    dS.mul_(scale_f);
    if (need_dB) {
      if (M == 0) StG = at::zeros({r, N}, B32.options());
      dB = StG.t().mul(scale_f).to(lora_B.scalar_type()).contiguous();
    }
  } else {
    if (need_dB) dB = at::mm(to_f32(S).t(), G32).t().mul(scale_f).to(lora_B.scalar_type()).contiguous();
    if (!need_dx && !need_dA) return {dx, dA, dB};
    dS = at::mm(G32, B32).mul_(scale_f);
  }
  at::Tensor dA32;
  if (need_dx) dx = at::empty({M, K}, x.options());
  if (need_dA) dA32 = at::empty({r, K}, x.options().dtype(at::kFloat));
  if (M == 0 || K == 0) {
    if (need_dA) dA32.zero_();
  } else if (need_dA && !need_dx && dropout_p == 0.0) {
    at::mm_out(dA32, dS.t(), to_f32(x));  // dropout(x) with p = 0 is x itself
  } else {
    dispatch_xa(pr.x_dt, pr.a_dt, [&](auto xt, auto at_) {
      bwd_impl<decltype(xt)::value, decltype(at_)::value>(pr, x, G32, G16, dS, A32, dropout_p, seed,
                                                          need_dx, need_dA, dx, dA32, avx2);
    });
  }
  if (need_dA) dA = pr.a_dt == DT::F32 ? dA32 : dA32.to(lora_A.scalar_type());
  return {dx, dA, dB};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlora, CPU, m) {
  m.impl("lora_linear_fwd", &lora_linear_fwd_cpu);
  m.impl("lora_linear_bwd", &lora_linear_bwd_cpu);
}

}  // namespace fastlora::cpu
