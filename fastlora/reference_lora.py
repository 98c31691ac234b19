"""Torch reference of the LoRA ops: Philox randomness, LoRA dropout, and the fused LoRA linear
forward / backward. Ground truth for the tests and the fallback backend; plain torch, any device.

Philox and the dropout rule are defined in csrc/include/fastlora/philox.h; this file mirrors them
bit for bit with int64 arithmetic (torch has no 32x32->64 unsigned multiply).

Rounding (DESIGN.md §3). ``rnd_T`` is a round-to-nearest-even cast to dtype T, all sums in fp32
(float64 when x is float64), x of dtype X, adapters A (r, K) and B (N, r) of dtype D:
    base = rnd_X(x·Wᵀ + bias)                          W decoded to X when 4-bit
    xd   = rnd_D(x · keep · scale)                     LoRA dropout, see philox.h
    S    = rnd_D(xd·Aᵀ)                                (M, r), saved for backward
    L    = rnd_D(rnd_D(S·Bᵀ) · scaling)
    y    = rnd_X(base + L)            rounding="linear"      (peft lora.Linear)
    y    = rnd_X(base + rnd_X(L))     rounding="linear4bit"  (peft lora.bnb.Linear4bit)
Backward, computed in fp32 and rounded once per output (G = dy):
    dS = scaling · G·B;  dx = G·W + keep·scale·(dS·A);  dA = dSᵀ·xd;  dB = scaling · Gᵀ·S
"""

from __future__ import annotations

import math

import torch

from . import reference

PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
PHILOX_ROUNDS = 10
STREAM_LORA_DROPOUT = 0
STREAM_NEFTUNE = 1
_MASK32 = 0xFFFFFFFF
ROUNDINGS = ("linear", "linear4bit")


def _mulhilo(m: int, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of the 64-bit product m * c for a constant m and int64 c < 2^32."""
    m1, m0 = m >> 16, m & 0xFFFF
    c1, c0 = c >> 16, c & 0xFFFF
    p00, p01, p10, p11 = c0 * m0, c0 * m1, c1 * m0, c1 * m1  # each < 2^32
    mid = (p00 >> 16) + (p01 & 0xFFFF) + (p10 & 0xFFFF)
    lo = ((mid & 0xFFFF) << 16) | (p00 & 0xFFFF)
    hi = p11 + (p01 >> 16) + (p10 >> 16) + (mid >> 16)
    return hi & _MASK32, lo


def seed_value(seed) -> int:
    """A seed as a Python int: an int, or an int64 tensor with one element (the ops' ``Tensor seed``,
    read on the host: this is the reference, not a kernel)."""
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1:
            raise TypeError(f"seed must be an int64 tensor with one element, got {seed.dtype} of shape "
                            f"{tuple(seed.shape)}")
        return int(seed.item())
    return seed


def philox4x32_10(seed, n: torch.Tensor, stream: int) -> tuple[torch.Tensor, ...]:
    """The four 32-bit words (int64 tensors) of Philox4x32-10 for block counters ``n`` (int64);
    ``seed`` an int or a one-element int64 tensor."""
    seed = seed_value(seed) & ((1 << 64) - 1)
    k0, k1 = seed & _MASK32, seed >> 32
    c0, c1 = n & _MASK32, (n >> 32) & _MASK32
    c2 = torch.full_like(n, stream & _MASK32)
    c3 = torch.zeros_like(n)
    for _ in range(PHILOX_ROUNDS):
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_W0) & _MASK32, (k1 + PHILOX_W1) & _MASK32
    return c0, c1, c2, c3


def philox_words(seed: int, numel: int, stream: int, device=None) -> torch.Tensor:
    """int64[numel]: the random word of elements 0..numel-1 (element i: word i & 3 of block i >> 2)."""
    blocks = torch.arange((numel + 3) // 4, dtype=torch.int64, device=device)
    words = torch.stack(philox4x32_10(seed, blocks, stream), dim=1)
    return words.reshape(-1)[:numel]


def dropout_threshold(p: float) -> int:
    return math.ceil(p * 16777216.0)


def dropout_scale(p: float) -> float:
    """(float)(1.0 / (1.0 - p)) rounded to fp32, as a Python float."""
    return torch.tensor(1.0 / (1.0 - p), dtype=torch.float32).item()


def dropout_keep_mask(seed: int, shape, p: float, device=None) -> torch.Tensor:
    """bool[shape]: which elements LoRA dropout keeps."""
    numel = math.prod(shape)
    words = philox_words(seed, numel, STREAM_LORA_DROPOUT, device)
    return ((words >> 8) >= dropout_threshold(p)).reshape(shape)


def lora_dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """LoRA dropout of ``x`` (any shape, element order row-major): x·scale where kept, else 0, in
    x's dtype (computed in fp32, or float64 for float64 x). p = 0 returns a copy of x."""
    if p == 0.0:
        return x.clone()
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    keep = dropout_keep_mask(seed, tuple(x.shape), p, x.device)
    scaled = x.to(compute) * torch.tensor(dropout_scale(p), dtype=compute, device=x.device)
    return torch.where(keep, scaled, torch.zeros((), dtype=compute, device=x.device)).to(x.dtype)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def dense_weight(weight, absmax, blocksize: int, quant_type: str, out_features: int, in_features: int,
                 dtype: torch.dtype) -> torch.Tensor:
    """The (out, in) weight in ``dtype``: ``weight`` itself when dense (absmax is None), else the
    4-bit codes decoded to ``dtype`` (float64: decoded to fp32, which is exact, then widened)."""
    if absmax is None:
        return weight.to(dtype)
    decode_dtype = torch.float32 if dtype == torch.float64 else dtype
    flat = reference.dequantize_4bit(weight, absmax, blocksize, quant_type, out_features * in_features, decode_dtype)
    return flat.view(out_features, in_features).to(dtype)


def lora_linear_fwd(x, weight, absmax, blocksize, quant_type, out_features, lora_A, lora_B, scaling, bias,
                    dropout_p, seed, rounding):
    """Forward; x (M, K). Returns (y (M, N) in x.dtype, S (M, r) in lora_A.dtype)."""
    ct = _compute_dtype(x)
    adt = lora_A.dtype
    w = dense_weight(weight, absmax, blocksize, quant_type, out_features, x.shape[1], x.dtype).to(ct)
    base = x.to(ct) @ w.T
    if bias is not None:
        base = base + bias.to(ct)
    base = base.to(x.dtype).to(ct)
    xd = lora_dropout(x.to(adt), dropout_p, seed)
    S = (xd.to(ct) @ lora_A.to(ct).T).to(adt)
    lora = (S.to(ct) @ lora_B.to(ct).T).to(adt).to(ct)
    lora = (lora * torch.tensor(scaling, dtype=torch.float32).to(ct)).to(adt)
    if rounding == "linear4bit":
        lora = lora.to(x.dtype)
    y = (base + lora.to(ct)).to(x.dtype)
    return y, S


def lora_linear_bwd(grad_y, x, S, weight, absmax, blocksize, quant_type, out_features, lora_A, lora_B, scaling,
                    dropout_p, seed, need_dx, need_dA, need_dB):
    """Backward; returns (dx (M, K) x.dtype, dA (r, K), dB (N, r) in lora_A.dtype); an output that is
    not needed is an empty tensor."""
    ct = _compute_dtype(x)
    adt = lora_A.dtype
    g = grad_y.to(ct)
    scale = torch.tensor(scaling, dtype=torch.float32).to(ct)
    d_s = (g @ lora_B.to(ct)) * scale
    # Fresh empty tensors: torch.library rejects outputs that alias each other.
    dx, dA, dB = x.new_empty((0,)), lora_A.new_empty((0,)), lora_B.new_empty((0,))
    if need_dx:
        w = dense_weight(weight, absmax, blocksize, quant_type, out_features, x.shape[1], x.dtype).to(ct)
        dxd = d_s @ lora_A.to(ct)
        dx = (g @ w + lora_dropout(dxd, dropout_p, seed)).to(x.dtype)
    if need_dA:
        xd = lora_dropout(x.to(adt), dropout_p, seed)
        dA = (d_s.T @ xd.to(ct)).to(adt)
    if need_dB:
        dB = ((g.T @ S.to(ct)) * scale).to(adt)
    return dx, dA, dB
