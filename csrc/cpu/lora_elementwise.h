// Element-wise steps of the LoRA CPU kernels (dropout, the forward and backward epilogues), each as
// a portable loop and an AVX2 loop that produce the same bits. The rounding points are those of
// fastlora/reference_lora.py; `mask` is a dropout mask from lora_philox.h (nullptr: keep all).
#pragma once

#include <cstdint>

#include "lora_simd.h"

namespace fastlora::cpu {

// ---- dropout: out = keep ? rnd_R(in * scale) : 0, stored as Out ---------------------------------
// Without a mask (p == 0): out = rnd_R(in), no scaling (the reference copies x then).

template <DT In, DT R, DT Out>
inline void dropout_apply_portable(const void* in, void* out, const uint32_t* mask, float scale, int64_t n) {
  if (mask == nullptr) {
    for (int64_t i = 0; i < n; ++i) store1<Out>(out, i, round1<R>(load1<In>(in, i)));
    return;
  }
  for (int64_t i = 0; i < n; ++i) store1<Out>(out, i, mask[i] ? round1<R>(load1<In>(in, i) * scale) : 0.0f);
}

#if defined(__x86_64__)
template <DT In, DT R, DT Out>
FL_AVX2 void dropout_apply_avx2(const void* in, void* out, const uint32_t* mask, float scale, int64_t n) {
  int64_t i = 0;
  if (mask == nullptr) {
    for (; i + 8 <= n; i += 8) store8<Out>(out, i, round8<R>(load8<In>(in, i)));
    for (; i < n; ++i) store1<Out>(out, i, round1<R>(load1<In>(in, i)));
    return;
  }
  const __m256 s = _mm256_set1_ps(scale);
  for (; i + 8 <= n; i += 8) {
    const __m256 keep = _mm256_castsi256_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(mask + i)));
    store8<Out>(out, i, _mm256_and_ps(round8<R>(_mm256_mul_ps(load8<In>(in, i), s)), keep));
  }
  for (; i < n; ++i) store1<Out>(out, i, mask[i] ? round1<R>(load1<In>(in, i) * scale) : 0.0f);
}
#endif

template <DT In, DT R, DT Out>
inline void dropout_apply(const void* in, void* out, const uint32_t* mask, float scale, int64_t n, bool avx2) {
#if defined(__x86_64__)
  if (avx2) return dropout_apply_avx2<In, R, Out>(in, out, mask, scale, n);
#endif
  dropout_apply_portable<In, R, Out>(in, out, mask, scale, n);
}

// ---- forward epilogue ---------------------------------------------------------------------------
// y = rnd_X(rnd_X(base [+ bias]) + l),  l = rnd_A(rnd_A(L) * scaling), then l = rnd_X(l) for
// rounding="linear4bit". L = S·Bᵀ in fp32; base = x·Wᵀ stored as Base: fp32, or bf16 when a bf16
// GEMM already rounded it (then rnd_X(base) is base itself when there is no bias here).

template <DT X, DT A, DT Base = DT::F32>
inline void fwd_epilogue_portable(const void* base, const float* lora, const float* bias, float scaling,
                                  bool linear4bit, void* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = load1<Base>(base, i);
    const float b = round1<X>(bias != nullptr ? v + bias[i] : v);
    float l = round1<A>(round1<A>(lora[i]) * scaling);
    if (linear4bit) l = round1<X>(l);
    store1<X>(y, i, b + l);
  }
}

#if defined(__x86_64__)
template <DT X, DT A, DT Base = DT::F32>
FL_AVX2 void fwd_epilogue_avx2(const void* base, const float* lora, const float* bias, float scaling,
                               bool linear4bit, void* y, int64_t n) {
  const __m256 s = _mm256_set1_ps(scaling);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 b = load8<Base>(base, i);
    if (bias != nullptr) b = _mm256_add_ps(b, _mm256_loadu_ps(bias + i));
    b = round8<X>(b);
    __m256 l = round8<A>(_mm256_mul_ps(round8<A>(_mm256_loadu_ps(lora + i)), s));
    if (linear4bit) l = round8<X>(l);
    store8<X>(y, i, _mm256_add_ps(b, l));
  }
  fwd_epilogue_portable<X, A, Base>(static_cast<const char*>(base) + i * (Base == DT::F32 ? 4 : 2), lora + i,
                                    bias != nullptr ? bias + i : nullptr, scaling, linear4bit,
                                    static_cast<char*>(y) + i * (X == DT::F32 ? 4 : 2), n - i);
}
#endif

template <DT X, DT A, DT Base = DT::F32>
inline void fwd_epilogue(const void* base, const float* lora, const float* bias, float scaling, bool linear4bit,
                         void* y, int64_t n, bool avx2) {
#if defined(__x86_64__)
  if (avx2) return fwd_epilogue_avx2<X, A, Base>(base, lora, bias, scaling, linear4bit, y, n);
#endif
  fwd_epilogue_portable<X, A, Base>(base, lora, bias, scaling, linear4bit, y, n);
}

// ---- backward epilogue of dx --------------------------------------------------------------------
// dx = rnd_X(base + (keep ? dxd * scale : 0)), dxd = dS·A in fp32 (no mask: base + dxd); base = G·W
// stored as Base: fp32, or bf16 when a bf16 GEMM already rounded it (PEFT's two bf16 gradients).

template <DT X, DT Base = DT::F32>
inline void dx_epilogue_portable(const void* base, const float* dxd, const uint32_t* mask, float scale, void* dx,
                                 int64_t n) {
  if (mask == nullptr) {
    for (int64_t i = 0; i < n; ++i) store1<X>(dx, i, load1<Base>(base, i) + dxd[i]);
    return;
  }
  for (int64_t i = 0; i < n; ++i) store1<X>(dx, i, load1<Base>(base, i) + (mask[i] ? dxd[i] * scale : 0.0f));
}

#if defined(__x86_64__)
template <DT X, DT Base = DT::F32>
FL_AVX2 void dx_epilogue_avx2(const void* base, const float* dxd, const uint32_t* mask, float scale, void* dx,
                              int64_t n) {
  int64_t i = 0;
  if (mask == nullptr) {
    for (; i + 8 <= n; i += 8) store8<X>(dx, i, _mm256_add_ps(load8<Base>(base, i), _mm256_loadu_ps(dxd + i)));
  } else {
    const __m256 s = _mm256_set1_ps(scale);
    for (; i + 8 <= n; i += 8) {
      const __m256 keep = _mm256_castsi256_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(mask + i)));
      const __m256 l = _mm256_and_ps(_mm256_mul_ps(_mm256_loadu_ps(dxd + i), s), keep);
      store8<X>(dx, i, _mm256_add_ps(load8<Base>(base, i), l));
    }
  }
  dx_epilogue_portable<X, Base>(static_cast<const char*>(base) + i * (Base == DT::F32 ? 4 : 2), dxd + i,
                                mask != nullptr ? mask + i : nullptr, scale,
                                static_cast<char*>(dx) + i * (X == DT::F32 ? 4 : 2), n - i);
}
#endif

template <DT X, DT Base = DT::F32>
inline void dx_epilogue(const void* base, const float* dxd, const uint32_t* mask, float scale, void* dx, int64_t n,
                        bool avx2) {
#if defined(__x86_64__)
  if (avx2) return dx_epilogue_avx2<X, Base>(base, dxd, mask, scale, dx, n);
#endif
  dx_epilogue_portable<X, Base>(base, dxd, mask, scale, dx, n);
}

}  // namespace fastlora::cpu
