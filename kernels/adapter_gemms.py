"""The LoRA adapter GEMMs of the torch (cuBLAS) GEMM path for bf16 activations with fp32 adapters (PEFT's
default), on the bf16 tensor cores instead of fp32 GEMMs over fp32 copies of x and G.

PEFT computes the adapter terms in fp32 on ``x.to(float32)``. Converting x (M, K) and G (M, N) to fp32 costs a
read and a write of each at twice their size, and fp32 GEMMs are memory-bound on those copies: on an H200 at 4096
tokens, 4096 -> 14336 (bench/bench_lora_gpu.py --profile), the conversions took 280 us and the fp32 adapter GEMMs
about 370 us of a 2.3 ms forward + backward, and the Triton kernel adding the LoRA term to y another 245 us.

Here an fp32 operand ``t`` is split into bf16 pieces ``t1 = bf16(t)``, ``t2 = bf16(t - t1)``, ``t3 = bf16(t - t1 -
t2)`` (each difference exact in fp32), whose sum is t to about 2^-24 relative. A product of two bf16 values is
exact in fp32, so a bf16 GEMM with fp32 accumulation over the pieces gives the fp32 product to fp32 accuracy:

* bf16 times fp32 (x·Aᵀ, G·B, Gᵀ·S, dSᵀ·x): one GEMM against the three pieces stacked, ``(M, K)·(K, 3r)``, then
  the three column groups summed (smallest first);
* fp32 times fp32 (S·Bᵀ, dS·A): the six piece products of order up to three, stacked along the reduction, one
  GEMM with a reduction of 6r: ``[S1 S1 S2 S1 S2 S3]·[B1 B2 B1 B3 B2 B1]ᵀ``.

The LoRA term of y and dx is then added by the GEMM itself (beta = 1 on the 16-bit output, fp32 epilogue, one
rounding), or produced in bf16 and added in bf16 for PEFT's ``lora.bnb.Linear4bit`` rounding. Results differ from
fp32 GEMMs only in the order of fp32 sums, with one exception: an Inf in x meets pieces of both signs, so the LoRA
term of its row is NaN where fp32 GEMMs give ±Inf (y of that row is non-finite either way).

On the GPU the fp32-output GEMMs are ``torch.mm(a, b, out_dtype=torch.float32)`` (cuBLAS, torch >= 2.8); on the
CPU, where torch has no such overload, the same products are computed in fp32 from exact upcasts (how the tests
check this path under the Triton interpreter).
"""

from __future__ import annotations

import warnings

import torch

__all__ = [
    "add_product_",
    "bf16_pieces",
    "fp32_product",
    "mm_fp32",
    "pieces_product",
    "product_with_pieces",
    "split_applies",
    "summed_groups",
]

PIECES = 3
# (left piece, right piece) of the products of order <= 3 of two three-piece splits, largest first
_PRODUCT_TERMS = ((0, 0), (0, 1), (1, 0), (0, 2), (1, 1), (2, 0))


def split_applies(x_dtype: torch.dtype, adapter_dtype: torch.dtype) -> bool:
    """True for the case this module serves: bf16 activations (exact in bf16 GEMMs) with fp32 adapters. fp16
    activations are not exact in bf16 and fp16 pieces underflow (fp16's exponent range), so they keep the fp32
    GEMMs."""
    return x_dtype == torch.bfloat16 and adapter_dtype == torch.float32


def bf16_pieces(t: torch.Tensor) -> list[torch.Tensor]:
    """``t`` (fp32) as PIECES bf16 tensors of its shape whose sum is exactly t (3 x 8 significant bits hold fp32's
    24), unless a piece falls below bf16's normal range (|t| < 2^-110), where its lowest bits are lost."""
    pieces, rest = [], t
    for i in range(PIECES):
        piece = rest.to(torch.bfloat16)
        pieces.append(piece)
        if i + 1 < PIECES:
            # exact, and in fp32 by type promotion (one op, no upcast copy): piece is rest rounded to 8 leading bits
            rest = rest - piece
    return pieces


OUT_DTYPE_DEVICES = ("cuda",)  # where torch.mm has the fp32-output overload for bf16 operands (cuBLAS)
_out_dtype_works = True  # False once that overload has failed here


def mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a·b`` of bf16 matrices as fp32 (fp32 accumulation, no rounding of the result to bf16). On a GPU whose torch
    lacks the fp32-output overload (torch < 2.8) or refuses these operands, the fp32 GEMM of exact upcasts, with
    one warning."""
    global _out_dtype_works
    if a.device.type in OUT_DTYPE_DEVICES and _out_dtype_works:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError, NotImplementedError) as exc:
            _out_dtype_works = False
            warnings.warn(f"fastlora: torch.mm(..., out_dtype=torch.float32) failed ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:160]}); the adapter GEMMs use fp32 GEMMs on upcast pieces",
                          RuntimeWarning, stacklevel=2)  # fmt: skip
    return torch.mm(a.float(), b.float())  # the same exact products, summed in fp32


def summed_groups(t: torch.Tensor, groups: int, dim: int) -> torch.Tensor:
    """Sum of the ``groups`` equal slices of fp32 ``t`` along ``dim``, smallest (last) first."""
    parts = t.chunk(groups, dim)
    total = parts[-1]
    for part in reversed(parts[:-1]):
        total = total + part
    return total


def product_with_pieces(a16: torch.Tensor, t: torch.Tensor, *, t_on_left: bool = False) -> torch.Tensor:
    """fp32 product of a bf16 matrix and an fp32 matrix: ``a16·t`` (a16 (M, C), t (C, R)), or ``t·a16`` with
    ``t_on_left`` (t (R, C), a16 (C, K)); one GEMM over t's pieces stacked along R."""
    if t_on_left:
        return summed_groups(mm_fp32(torch.cat(bf16_pieces(t), 0), a16), PIECES, 0)
    return summed_groups(mm_fp32(a16, torch.cat(bf16_pieces(t), 1)), PIECES, 1)


def _stacked_terms(left: torch.Tensor, right_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L6 (M, 6r), R6 (6r, N)) with ``L6·R6`` the sum of the order <= 3 piece products of ``left·right_tᵀ``
    (left (M, r), right_t (N, r), both fp32)."""
    lp, rp = bf16_pieces(left), bf16_pieces(right_t)
    l6 = torch.cat([lp[i] for i, _ in _PRODUCT_TERMS], 1)
    r6 = torch.cat([rp[j] for _, j in _PRODUCT_TERMS], 1)
    return l6, r6.t()


def fp32_product(left: torch.Tensor, right_t: torch.Tensor) -> torch.Tensor:
    """``left·right_tᵀ`` of fp32 matrices (M, r) and (N, r) as fp32 (M, N)."""
    return mm_fp32(*_stacked_terms(left, right_t))


def pieces_product(left: torch.Tensor, right_t: torch.Tensor) -> torch.Tensor:
    """``left·right_tᵀ`` of fp32 matrices (M, r) and (N, r), rounded once to bf16: (M, N) bf16."""
    l6, r6 = _stacked_terms(left, right_t)
    if l6.is_cuda:
        return torch.mm(l6, r6)  # fp32 accumulation, one rounding to bf16
    return mm_fp32(l6, r6).to(torch.bfloat16)


def add_product_(out: torch.Tensor, left: torch.Tensor, right_t: torch.Tensor) -> torch.Tensor:
    """``out = bf16(out + left·right_tᵀ)`` in place, one rounding (out (M, N) bf16; left (M, r), right_t (N, r)
    fp32): the GEMM's own epilogue adds out in fp32."""
    l6, r6 = _stacked_terms(left, right_t)
    if out.is_cuda:
        return out.addmm_(l6, r6)
    return out.copy_(torch.addmm(out.float(), l6.float(), r6.float()))
