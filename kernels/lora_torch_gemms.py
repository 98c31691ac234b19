"""The torch (cuBLAS) GEMMs of the LoRA linear layer's "torch" path (``kernels/lora_linear.GEMMS``, the default
on a GPU): S, dS, dB, dA and the LoRA terms of y and dx, with the roundings of fastlora/reference_lora.py.

Two families, chosen per call by kernels/lora_linear.py:

* ``*_pieces``: bf16 x with fp32 adapters (PEFT's default), bf16 tensor-core GEMMs over bf16 pieces of the fp32
  operands (kernels/adapter_gemms.py), so that no fp32 copy of x or G is made;
* ``*_fp32``: every other dtype pair (and ``ADAPTER_GEMMS = "fp32"``), fp32 GEMMs of fp32 upcasts, TF32 where the
  user allows it (``torch.backends.cuda.matmul.allow_tf32``), as PEFT's own adapter GEMMs.

Shapes: x (M, K) and G = dy (M, N) in X = x's dtype; lora_A (r, K), lora_B (N, r) and S (M, r) in the adapters'
dtype D; dS (M, r) fp32. The dropout mask of every function is the one of ``seed`` (Philox, kernels/philox.py),
regenerated here, never stored: a transient uint8 mask or a transient masked copy of x lives for one GEMM.
The LoRA term of y over fp32 GEMMs is added by the Triton epilogue kernel in kernels/lora_linear.py.
"""

from __future__ import annotations

import torch

from . import adapter_gemms
from .lora_dropout import dropout_keep_mask, lora_dropout
from .philox import dropout_constants

__all__ = [
    "da_fp32",
    "da_pieces",
    "ds_db_fp32",
    "ds_db_pieces",
    "dx_fp32",
    "dx_pieces",
    "s_fp32",
    "s_pieces",
    "y_pieces",
]


def _kept_x(x, dropout_p: float, seed: torch.Tensor) -> torch.Tensor:
    """x·keep in x's dtype (exact: products by 0 or 1), (M, K), the mask of the seed; the pieces path applies the
    dropout scale to the fp32 products instead (PEFT scales x first: the same value up to fp32 rounding)."""
    if dropout_p == 0.0:
        return x
    return x * dropout_keep_mask(x.numel(), dropout_p, seed, x.device).view(x.shape)


def _dropped_x(x, adt: torch.dtype, dropout_p: float, seed: torch.Tensor) -> torch.Tensor:
    """dropout(x) in the adapters' dtype, (M, K): the operand of S = xd·Aᵀ and dA = dSᵀ·xd. A transient copy of x,
    as PEFT's lora_A(dropout(x.to(adt)))."""
    xd = x.to(adt)
    return lora_dropout(xd, dropout_p, seed) if dropout_p > 0.0 else xd


# --------------------------------------------------------------------------------------------------
# bf16 x, fp32 adapters: bf16 GEMMs over the pieces of the fp32 operands
# --------------------------------------------------------------------------------------------------


def s_pieces(x, lora_A, dropout_p: float, seed: torch.Tensor) -> torch.Tensor:
    """S = dropout(x)·Aᵀ, (M, r) fp32, from one bf16 GEMM against A's pieces."""
    s = adapter_gemms.product_with_pieces(_kept_x(x, dropout_p, seed), lora_A.t())
    return s.mul_(dropout_constants(dropout_p)[1]) if dropout_p > 0.0 else s


def y_pieces(x, w, bias, s, lora_B, scaling: float, rounding: str) -> torch.Tensor:
    """y (M, N) bf16: base = rnd_X(x·Wᵀ + b) (w (N, K) bf16), then the LoRA term (scaling·S)·Bᵀ added into base in
    place by the GEMM of the pieces (one rounding, "linear"), or rounded to bf16 first and added in bf16
    ("linear4bit")."""
    y = torch.nn.functional.linear(x, w, bias)
    s_scaled = s * float(scaling)  # PEFT scales after S·Bᵀ: the same up to fp32 rounding
    if rounding == "linear4bit":
        return y.add_(adapter_gemms.pieces_product(s_scaled, lora_B))
    return adapter_gemms.add_product_(y, s_scaled, lora_B)


def ds_db_pieces(grad_y, S, lora_B, scaling: float, need_ds: bool, need_db: bool):
    """As ds_db_fp32, from bf16 GEMMs of G against the pieces of B and of S."""
    ds = adapter_gemms.product_with_pieces(grad_y, lora_B).mul_(float(scaling)) if need_ds else None
    db = adapter_gemms.product_with_pieces(grad_y.t(), S) if need_db else None
    return ds, db


def da_pieces(x, ds, dropout_p: float, seed: torch.Tensor) -> torch.Tensor:
    """dA = dSᵀ·dropout(x), (r, K) fp32, from one bf16 GEMM of dS's pieces against x·keep."""
    da = adapter_gemms.product_with_pieces(_kept_x(x, dropout_p, seed), ds.t(), t_on_left=True)
    return da.mul_(dropout_constants(dropout_p)[1]) if dropout_p > 0.0 else da


def dx_pieces(grad_y, w, ds, lora_A, dropout_p: float, seed: torch.Tensor) -> torch.Tensor:
    """dx = rnd_X(rnd_X(G·W) + keep·scale∘(dS·A)), (M, K) bf16: without dropout the pieces' GEMM adds dS·A into
    G·W in place."""
    dx = torch.mm(grad_y, w)
    if dropout_p == 0.0:
        return adapter_gemms.add_product_(dx, ds, lora_A.t())
    dxd = lora_dropout(adapter_gemms.fp32_product(ds, lora_A.t()), dropout_p, seed)
    return torch.add(dx, dxd).to(grad_y.dtype)


# --------------------------------------------------------------------------------------------------
# Any other dtype pair: fp32 GEMMs
# --------------------------------------------------------------------------------------------------


def s_fp32(x, lora_A, dropout_p: float, seed: torch.Tensor) -> torch.Tensor:
    """S = rnd_D(dropout(x)·Aᵀ), (M, r) in lora_A's dtype, by one fp32 GEMM. Why not the Triton S kernel on a GPU:
    at r = 16 it runs M/64 programs, each a sequential fp32 FMA loop over all of K (on an H100, the op's forward at
    4096 tokens took 1.5x PEFT's while plain cuBLAS LoRA GEMMs were faster than PEFT)."""
    return torch.mm(_dropped_x(x, lora_A.dtype, dropout_p, seed).float(), lora_A.float().t()).to(lora_A.dtype)


def ds_db_fp32(grad_y, S, lora_B, scaling: float, need_ds: bool, need_db: bool):
    """(dS = scaling·(G·B) fp32 (M, r), Gᵀ·S fp32 (N, r)), in fp32 (G's 16-bit values are exact in fp32; the
    backward launcher scales and rounds dB as for the Triton kernel). Either is None when not needed."""
    g = grad_y.float()
    # A Python float factor: the fp32 kernels multiply by fp32(scaling), as with an fp32 tensor, and no host
    # to device copy runs (it would break CUDA graph capture).
    ds = torch.mm(g, lora_B.float()).mul_(float(scaling)) if need_ds else None
    db = torch.mm(S.float().t(), g).t() if need_db else None
    return ds, db


def da_fp32(x, ds, lora_A, dropout_p: float, seed: torch.Tensor) -> torch.Tensor:
    """dA = dSᵀ·dropout(x), (r, K) fp32 (rounded to lora_A's dtype by the caller)."""
    return torch.mm(ds.t(), _dropped_x(x, lora_A.dtype, dropout_p, seed).float())


def dx_fp32(grad_y, w, ds, lora_A, dropout_p: float, seed: torch.Tensor) -> torch.Tensor:
    """dx = rnd_X(rnd_X(G·W) + keep·scale·(dS·A)), (M, K) in x's dtype: the base term rounded to x's dtype as
    PEFT's autograd does, the LoRA term in fp32 with the Philox mask of the forward."""
    dxd = torch.mm(ds, lora_A.float())
    if dropout_p > 0.0:
        dxd = lora_dropout(dxd, dropout_p, seed)
    return torch.add(torch.mm(grad_y, w), dxd).to(grad_y.dtype)
