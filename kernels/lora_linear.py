"""Triton kernels of ``fastlora::lora_linear_fwd_triton`` / ``lora_linear_bwd_triton``: the LoRA linear
layer ``y = x·Wᵀ + bias + scaling·(dropout(x)·Aᵀ)·Bᵀ`` over a dense or bitsandbytes 4-bit weight.

Semantics, including every rounding step, are those of fastlora/reference_lora.py (PEFT's): with
``rnd_T`` a round-to-nearest-even cast, X = x's dtype, D = the adapters' dtype, all sums in fp32:

    base = rnd_X(x·Wᵀ + bias)            W dense (X), or 4-bit decoded to X like bitsandbytes
    xd   = rnd_D(x·keep·scale)           LoRA dropout (Philox, kernels/philox.py)
    S    = rnd_D(xd·Aᵀ)                  (M, r), returned for backward
    L    = rnd_D(rnd_D(S·Bᵀ)·scaling)
    y    = rnd_X(base + L)               rounding="linear";  rnd_X(base + rnd_X(L)) for "linear4bit"
    dS   = scaling·(G·B)                 fp32, never rounded (G = dy)
    dx   = rnd_X(G·W + keep·scale∘(dS·A));  dA = rnd_D(dSᵀ·xd);  dB = rnd_D(scaling·(Gᵀ·S))

The dropout mask is regenerated wherever it is needed, never kept between calls. fp32 operands are
multiplied in full fp32 (``input_precision="ieee"`` or plain FMAs, never TF32); 16-bit operands use
the tensor cores; every accumulator is fp32.

Kernels (M tokens, K in_features, N out_features, r rank):

* ``_lora_s_kernel``: S; one program per (BLOCK_M rows, BLOCK_R ranks), loop over K.
* ``_lora_fwd_kernel``: y. A GEMM over K with the LoRA up-projection S·Bᵀ fused into the epilogue of
  the same output tile (own accumulator: PEFT rounds base and L separately; a tensor-core dot over r
  for 16-bit adapters, rank-1 FMA updates for fp32 ones). ``W4=False`` reads a dense (N, K) weight of
  x's dtype; ``W4=True`` decodes NF4 / FP4 tiles inside the K loop from the packed bytes and absmax.
* ``_lora_bwd_ds_kernel``: one pass over G: dS (M, r) fp32 per row block, and dB's partial sums Gᵀ·S
  of the same G tiles added into an fp32 (N, r) workspace with atomics.
* ``_lora_bwd_dx_kernel``: dx tiles over (M, K): the LoRA term keep·scale∘(dS·A) first (rank-1 FMA
  updates), then the GEMM G·W over N accumulates onto it (dense, or in-loop 4-bit decode).
* ``_lora_bwd_da_kernel``: dA = dSᵀ·xd, a GEMM with a long reduction over M, split over M into a few
  slices whose fp32 partial sums are added with atomics; the mask is regenerated for its x tiles.

4-bit weights: for M <= ``SMALL_M`` (and K % blocksize == 0, blocksize >= 64) the fused-decode GEMMs
run; otherwise the weight is decoded once per call into an x-dtype workspace with
kernels/dequantize_4bit.py and the dense GEMMs run (DESIGN.md §6: the recipe that wins when the GEMM
is compute-bound).

Dropout with K % 4 == 0 evaluates Philox once per four elements inside the kernels; for other K the
launcher first generates a uint8 keep mask for the call (kernels/lora_dropout.py) that the kernels read.

Non-determinism: dA and dB are sums of fp32 atomics, so on a GPU their last bits may vary between
runs. y, S and dx are deterministic.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import CompileSpec, adapter_gemms
from . import lora_torch_gemms as torch_path
from ._common import (
    check_device,
    check_seed,
    convert,
    is_interpreted,
    load_w4_tile,
    mma,
    mul_rn,
    next_pow2,
    round_to,
    to_f32,
)
from .dequantize_4bit import code_table, dequantize_4bit
from .lora_dropout import dropout_keep_mask
from .philox import dropout_constants, keep_groups, load_key

__all__ = [
    "ADAPTER_GEMMS",
    "AUTOTUNE",
    "GEMM_CONFIGS",
    "SMALL_M",
    "GemmConfig",
    "GEMMS",
    "compile_specs",
    "lora_linear_bwd",
    "lora_linear_fwd",
    "uses_fused_4bit",
]

# Largest M (tokens) for which a 4-bit weight is decoded inside the GEMMs' K loop instead of once into
# a workspace. Default 64 = the largest BLOCK_M of the fused-decode configurations, so that each weight
# tile is decoded once per call; the real crossover is to be measured per GPU. Override with the
# environment variable FASTLORA_SMALL_M (read at import) or by assigning
# ``fastlora.kernels.lora_linear.SMALL_M`` (read at every call).
SMALL_M: int = int(os.environ.get("FASTLORA_SMALL_M", "64"))
# FASTLORA_TRITON_AUTOTUNE=0: use the first configuration of each list instead of benchmarking them.
AUTOTUNE: bool = os.environ.get("FASTLORA_TRITON_AUTOTUNE", "1") != "0"
# Which GEMMs run: "triton" = the fused Triton GEMMs (in-loop 4-bit decode up to SMALL_M tokens, the
# LoRA term in the GEMM epilogue), the one-pass dS/dB kernel and the S / dx-LoRA / dA kernels; "torch" = the
# weight decoded once into an x-dtype workspace, torch's GEMMs (cuBLAS, kernels/lora_torch_gemms.py) for x·Wᵀ,
# S, G·W, G·B, Gᵀ·S, dS·A and dA (for bf16 x with fp32 adapters over bf16 pieces, see ADAPTER_GEMMS), the
# dropout masks by the Triton kernels. "auto" (default) is "torch" on a GPU and "triton" under the interpreter,
# so the CPU tests check the Triton GEMMs.
# Why "torch" on the GPU: on an H100 (bench/bench_lora_gpu.py, nf4 double quant, bf16, r=16) the
# untuned Triton GEMMs took 3.7x cuBLAS' x·Wᵀ at 4096 tokens, the in-loop decode 585-925 us at 1-16
# tokens (dequantize + cuBLAS: ~45 us), and the dS/dB kernel, one program per 64 rows, serialises
# over N for small M. Override with FASTLORA_GEMMS or by assigning this attribute.
GEMMS: str = os.environ.get("FASTLORA_GEMMS", "auto")
# The adapter GEMMs of the "torch" path for bf16 x with fp32 adapters: "split" = bf16 tensor-core GEMMs over bf16
# pieces of the fp32 operands (kernels/adapter_gemms.py: no fp32 copies of x and G, the LoRA term added by the
# GEMMs' epilogue); "fp32" = fp32 GEMMs on fp32 copies, the LoRA term added by _lora_add_kernel. "auto" (default)
# is "split". Override with FASTLORA_ADAPTER_GEMMS or by assigning this attribute.
ADAPTER_GEMMS: str = os.environ.get("FASTLORA_ADAPTER_GEMMS", "auto")

_XDTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# (x dtype, adapter dtype): adapters are float32 or x's dtype.
_DTYPE_PAIRS = [(x, a) for x in _XDTYPES for a in dict.fromkeys((torch.float32, x))]
MAX_RANK = 256
_RANK_CHUNK = tl.constexpr(16)  # ranks per tensor-core step of the fwd epilogue (16-bit adapters)
_W4_MAX_TILE = 64  # widest weight tile (columns of W) of the fused-decode GEMMs; the smallest blocksize they take


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _tile_ids(pid, M, NC, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped ordering: GROUP_M row blocks sweep the column blocks together (L2 reuse of W).
    num_m = tl.cdiv(M, BLOCK_M)
    num_c = tl.cdiv(NC, BLOCK_C)
    width = GROUP_M * num_c
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_c = (pid % width) // size_m
    return pid_m, pid_c


@triton.jit
def _keep_tile(
    row0, rows, col0, K, mask_ptr, k0, k1, threshold, dropout_mode,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Keep mask [BLOCK_M, BLOCK_C] (int8 0 / 1) of elements (row0 + rows, col0 + arange) of a
    row-major (M, K) tensor. dropout_mode 0: all kept; 2 (K % 4 == 0): Philox here with the key
    halves k0, k1 (uint32, from load_key), one evaluation per 4 elements; 1 (other K): read from the
    uint8 mask the launcher generated for this call.
    (int8, not int1: an int1 tile that ends up in shared memory crashes Triton 3.9's compiler.)"""
    if dropout_mode == 2:
        first = ((row0 + rows.to(tl.int64)) * K + col0) >> 2  # col0 and K are multiples of 4
        n = first[:, None] + tl.arange(0, BLOCK_C // 4).to(tl.int64)[None, :]
        keep = keep_groups(n, k0, k1, threshold, BLOCK_M, BLOCK_C).to(tl.int8)
    elif dropout_mode == 1:
        cols = col0 + tl.arange(0, BLOCK_C)
        idx = (row0 + rows.to(tl.int64))[:, None] * K + cols[None, :]
        keep = tl.load(mask_ptr + idx, mask=(cols < K)[None, :], other=0).to(tl.int8)
    else:
        keep = tl.full((BLOCK_M, BLOCK_C), 1, tl.int8)
    return keep


@triton.jit
def _dropout_x(x, keep, scale, dropout_mode, dtype: tl.constexpr, INTERP: tl.constexpr):
    """dropout(x tile) in ``dtype`` (x converted exactly first): dtype(fp32(x) * scale) where kept, else 0."""
    x = convert(x, dtype, INTERP)
    if dropout_mode != 0:
        x = tl.where(keep != 0, round_to(to_f32(x, INTERP) * scale, dtype, INTERP), 0.0).to(dtype)
    return x


# The seed is read through seed_ptr at run time (a CUDA graph replays the tensor's current value); its
# alignment does not matter to one 8-byte load, so it does not split the kernel cache.
@triton.jit(do_not_specialize=["threshold", "dropout_mode"], do_not_specialize_on_alignment=["seed_ptr"])
def _lora_s_kernel(
    x_ptr,  # *X (M, K)
    a_ptr,  # *D (R, K)
    s_ptr,  # *D (M, R) out
    mask_ptr,  # *u8 (M, K) keep mask (dropout_mode 1 only)
    M, K, R,
    seed_ptr,  # *i64 [1]: the seed (Philox key lo32, hi32), loaded once per program
    threshold,  # ceil(p * 2^24)
    scale,  # fp32 (float)(1 / (1 - p))
    dropout_mode,  # 0: p == 0; 2: dropout, K % 4 == 0 (Philox here); 1: dropout, mask from mask_ptr
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, INTERP: tl.constexpr,
):  # fmt: skip
    adt: tl.constexpr = a_ptr.dtype.element_ty
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_M
    rows = tl.arange(0, BLOCK_M)
    m_ok = rows < M - row0
    rr = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rr < R
    x_ptr += row0 * K
    key0, key1 = load_key(seed_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        x = tl.load(x_ptr + rows[:, None] * K + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        a = tl.load(a_ptr + rr[None, :] * K + rk[:, None], mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        keep = _keep_tile(row0, rows, k0, K, mask_ptr, key0, key1, threshold, dropout_mode, BLOCK_M, BLOCK_K)
        acc = mma(_dropout_x(x, keep, scale, dropout_mode, adt, INTERP), a, acc, INTERP)
    s_ptr += row0 * R
    tl.store(s_ptr + rows[:, None] * R + rr[None, :], round_to(acc, adt, INTERP), mask=m_ok[:, None] & r_ok[None, :])


@triton.jit(do_not_specialize=["M_BUCKET"])
def _lora_fwd_kernel(
    x_ptr,  # *X (M, K)
    w_ptr,  # *X (N, K) dense, or *u8 packed 4-bit codes (W4)
    absmax_ptr,  # *fp32 per-block scales (W4; else unused)
    table_ptr,  # *fp32 [16] code book (W4; else unused)
    bias_ptr,  # *X (N,) (read when has_bias)
    s_ptr,  # *D (M, R)
    b_ptr,  # *D (N, R)
    y_ptr,  # *X (M, N) out
    M, N, K, R,
    log2_bs,  # log2(blocksize) (W4)
    scaling,  # fp32
    has_bias, linear4bit,  # 0 / 1
    M_BUCKET,  # autotune key only: next power of two of M
    W4: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    INTERP: tl.constexpr,
):  # fmt: skip
    xdt: tl.constexpr = x_ptr.dtype.element_ty
    adt: tl.constexpr = s_ptr.dtype.element_ty
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    row0 = pid_m.to(tl.int64) * BLOCK_M
    rows = tl.arange(0, BLOCK_M)
    m_ok = rows < M - row0
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    rk = tl.arange(0, BLOCK_K)

    x_ptrs = x_ptr + row0 * K + rows[:, None] * K + rk[None, :]
    if not W4:
        w_ptrs = w_ptr + (pid_n * BLOCK_N).to(tl.int64) * K + tl.arange(0, BLOCK_N)[None, :] * K + rk[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = rk < K - k0
        a = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if W4:
            b = tl.trans(load_w4_tile(w_ptr, absmax_ptr, table_ptr, rn, k0, N, K, log2_bs, BLOCK_K, xdt, INTERP))
        else:
            b = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            w_ptrs += BLOCK_K
        acc = mma(a, b, acc, INTERP)
        x_ptrs += BLOCK_K

    if has_bias != 0:
        acc += to_f32(tl.load(bias_ptr + rn, mask=n_ok, other=0.0), INTERP)[None, :]
    base = round_to(acc, xdt, INTERP)  # kept in x's dtype (half the registers of fp32 for 16-bit x)

    y = _lora_epilogue(base, s_ptr + row0 * R, b_ptr, rows, rn, m_ok, n_ok, R, scaling, linear4bit, xdt, adt,
                       BLOCK_M, BLOCK_N, INTERP)  # fmt: skip
    y_ptr += row0 * N
    tl.store(y_ptr + rows[:, None] * N + rn[None, :], y, mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _lora_epilogue(
    base, s_ptr, b_ptr, rows, rn, m_ok, n_ok, R, scaling, linear4bit,
    xdt: tl.constexpr, adt: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INTERP: tl.constexpr,
):  # fmt: skip
    """y tile (x's dtype) = base + the LoRA up-projection S[rows, :]·B[rn, :]ᵀ with PEFT's roundings;
    ``base`` is the rounded x-dtype tile, ``s_ptr`` points at S's first row of the tile."""
    lora = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    if adt == tl.float32:
        # fp32 FMAs as rank-1 updates: a full-fp32 dot over r without the register cost of an FMA tl.dot.
        for r in range(0, R):
            s = tl.load(s_ptr + rows * R + r, mask=m_ok, other=0.0)
            bv = tl.load(b_ptr + rn * R + r, mask=n_ok, other=0.0)
            lora += s[:, None] * bv[None, :]
    else:
        rr = tl.arange(0, _RANK_CHUNK)
        for r0 in range(0, R, _RANK_CHUNK):
            r_ok = rr < R - r0
            s = tl.load(s_ptr + rows[:, None] * R + (r0 + rr)[None, :], mask=m_ok[:, None] & r_ok[None, :],
                        other=0.0)  # fmt: skip
            bt = tl.load(b_ptr + rn[None, :] * R + (r0 + rr)[:, None], mask=r_ok[:, None] & n_ok[None, :], other=0.0)
            lora = mma(s, bt, lora, INTERP)
    lora = to_f32(round_to(lora, adt, INTERP), INTERP)
    lora = to_f32(round_to(mul_rn(lora, scaling, INTERP), adt, INTERP), INTERP)  # not fused with the add below
    if linear4bit != 0:
        lora = to_f32(round_to(lora, xdt, INTERP), INTERP)
    return round_to(to_f32(base, INTERP) + lora, xdt, INTERP)


@triton.jit
def _lora_add_kernel(
    base_ptr,  # *X (M, N) rnd_X(x·Wᵀ + bias) from another GEMM (cuBLAS); may be y_ptr itself
    s_ptr,  # *D (M, R)
    b_ptr,  # *D (N, R)
    y_ptr,  # *X (M, N) out
    M, N, R,
    scaling,  # fp32
    linear4bit,  # 0 / 1
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INTERP: tl.constexpr,
):  # fmt: skip
    # The epilogue of _lora_fwd_kernel on its own, for a base computed by torch's GEMM.
    xdt: tl.constexpr = y_ptr.dtype.element_ty
    adt: tl.constexpr = s_ptr.dtype.element_ty
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_M
    rows = tl.arange(0, BLOCK_M)
    m_ok = rows < M - row0
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    offs = row0 * N + rows[:, None] * N + rn[None, :]
    base = tl.load(base_ptr + offs, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
    y = _lora_epilogue(base, s_ptr + row0 * R, b_ptr, rows, rn, m_ok, n_ok, R, scaling, linear4bit, xdt, adt,
                       BLOCK_M, BLOCK_N, INTERP)  # fmt: skip
    tl.store(y_ptr + offs, y, mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _lora_bwd_ds_kernel(
    g_ptr,  # *X (M, N) grad of y
    b_ptr,  # *D (N, R)
    s_ptr,  # *D (M, R)
    ds_ptr,  # *fp32 (M, R) out: scaling · G·B (when need_ds)
    db_ptr,  # *fp32 (N, R) in/out: += Gᵀ·S (when need_db; atomics)
    M, N, R,
    scaling,  # fp32
    need_ds, need_db,  # 0 / 1
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, INTERP: tl.constexpr,
):  # fmt: skip
    adt: tl.constexpr = b_ptr.dtype.element_ty
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_M
    rows = tl.arange(0, BLOCK_M)
    m_ok = rows < M - row0
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    s_ptr += row0 * R
    s = tl.load(s_ptr + rows[:, None] * R + rr[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
    rn = tl.arange(0, BLOCK_N)
    g_ptrs = g_ptr + row0 * N + rows[:, None] * N + rn[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n_ok = rn < N - n0
        g = convert(tl.load(g_ptrs, mask=m_ok[:, None] & n_ok[None, :], other=0.0), adt, INTERP)
        if need_ds != 0:
            b = tl.load(b_ptr + (n0 + rn)[:, None] * R + rr[None, :], mask=n_ok[:, None] & r_ok[None, :], other=0.0)
            acc = mma(g, b, acc, INTERP)
        if need_db != 0:
            part = mma(tl.trans(g), s, tl.zeros((BLOCK_N, BLOCK_R), tl.float32), INTERP)
            tl.atomic_add(db_ptr + (n0 + rn)[:, None] * R + rr[None, :], part, mask=n_ok[:, None] & r_ok[None, :],
                          sem="relaxed")  # fmt: skip
        g_ptrs += BLOCK_N
    if need_ds != 0:
        ds_ptr += row0 * R
        tl.store(ds_ptr + rows[:, None] * R + rr[None, :], acc * scaling, mask=m_ok[:, None] & r_ok[None, :])


@triton.jit(do_not_specialize=["threshold", "dropout_mode", "M_BUCKET"], do_not_specialize_on_alignment=["seed_ptr"])
def _lora_bwd_dx_kernel(
    g_ptr,  # *X (M, N) grad of y
    w_ptr,  # *X (N, K) dense, or *u8 packed codes (W4)
    absmax_ptr,  # *fp32 (W4)
    table_ptr,  # *fp32 [16] (W4)
    ds_ptr,  # *fp32 (M, R)
    a_ptr,  # *D (R, K)
    dx_ptr,  # *X (M, K) out
    mask_ptr,  # *u8 (M, K) keep mask (dropout_mode 1 only)
    M, N, K, R,
    log2_bs,
    seed_ptr, threshold, scale, dropout_mode,  # as in _lora_s_kernel
    M_BUCKET,  # autotune key only
    W4: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # dx columns per program (a range of K)
    BLOCK_K: tl.constexpr,  # reduction step (a range of N)
    GROUP_M: tl.constexpr, INTERP: tl.constexpr,
):  # fmt: skip
    xdt: tl.constexpr = dx_ptr.dtype.element_ty
    pid_m, pid_c = _tile_ids(tl.program_id(0), M, K, BLOCK_M, BLOCK_N, GROUP_M)
    row0 = pid_m.to(tl.int64) * BLOCK_M
    rows = tl.arange(0, BLOCK_M)
    m_ok = rows < M - row0
    col0 = pid_c * BLOCK_N
    rc = col0 + tl.arange(0, BLOCK_N)
    c_ok = rc < K

    # LoRA term dS·A (fp32 FMAs as rank-1 updates), masked and scaled; the GEMM then accumulates onto it.
    # (The mask first: Philox's temporaries and the accumulator are never live together.)
    key0, key1 = load_key(seed_ptr)
    keep = _keep_tile(row0, rows, col0, K, mask_ptr, key0, key1, threshold, dropout_mode, BLOCK_M, BLOCK_N)
    ds_ptr += row0 * R
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for r in range(0, R):
        d = tl.load(ds_ptr + rows * R + r, mask=m_ok, other=0.0)
        a = to_f32(tl.load(a_ptr + r * K + rc, mask=c_ok, other=0.0), INTERP)
        acc += d[:, None] * a[None, :]
    if dropout_mode != 0:
        acc = tl.where(keep != 0, acc * scale, 0.0)

    rk = tl.arange(0, BLOCK_K)
    g_ptrs = g_ptr + row0 * N + rows[:, None] * N + rk[None, :]
    if not W4:
        w_ptrs = w_ptr + rk[:, None] * K + rc[None, :]
    for n0 in range(0, N, BLOCK_K):
        n_ok = rk < N - n0
        g = tl.load(g_ptrs, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        if W4:
            w = load_w4_tile(w_ptr, absmax_ptr, table_ptr, n0 + rk, col0, N, K, log2_bs, BLOCK_N, xdt, INTERP)
        else:
            w = tl.load(w_ptrs, mask=n_ok[:, None] & c_ok[None, :], other=0.0)
            w_ptrs += BLOCK_K * K
        acc = mma(g, w, acc, INTERP)
        g_ptrs += BLOCK_K
    dx_ptr += row0 * K
    tl.store(dx_ptr + rows[:, None] * K + rc[None, :], round_to(acc, xdt, INTERP), mask=m_ok[:, None] & c_ok[None, :])


@triton.jit(do_not_specialize=["threshold", "dropout_mode", "rows_per_split"],
            do_not_specialize_on_alignment=["seed_ptr"])  # fmt: skip
def _lora_bwd_da_kernel(
    x_ptr,  # *X (M, K)
    ds_ptr,  # *fp32 (M, R)
    da_ptr,  # *fp32 (R, K) in/out: += dSᵀ·xd over this program's rows (atomics)
    mask_ptr,  # *u8 (M, K) keep mask (dropout_mode 1 only)
    a_ptr,  # *D: only its dtype is used (xd is rounded to it)
    M, K, R,
    rows_per_split,  # rows of M per program along grid axis 2 (a multiple of BLOCK_M)
    seed_ptr, threshold, scale, dropout_mode,  # as in _lora_s_kernel
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, INTERP: tl.constexpr,
):  # fmt: skip
    adt: tl.constexpr = a_ptr.dtype.element_ty
    rk = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = rk < K
    rr = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rr < R
    first = tl.program_id(2).to(tl.int64) * rows_per_split
    last = tl.minimum(first + rows_per_split, M)
    rows = tl.arange(0, BLOCK_M)
    key0, key1 = load_key(seed_ptr)
    acc = tl.zeros((BLOCK_R, BLOCK_K), tl.float32)
    for row0 in range(first, last, BLOCK_M):
        m_ok = rows < last - row0
        x = tl.load(x_ptr + row0 * K + rows[:, None] * K + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        keep = _keep_tile(row0, rows, tl.program_id(0) * BLOCK_K, K, mask_ptr, key0, key1, threshold,
                          dropout_mode, BLOCK_M, BLOCK_K)  # fmt: skip
        xd = to_f32(_dropout_x(x, keep, scale, dropout_mode, adt, INTERP), INTERP)
        dst = tl.load(ds_ptr + row0 * R + rows[None, :] * R + rr[:, None], mask=r_ok[:, None] & m_ok[None, :],
                      other=0.0)  # fmt: skip  [BLOCK_R, BLOCK_M] = dSᵀ tile
        acc = mma(dst, xd, acc, INTERP)
    tl.atomic_add(da_ptr + rr[:, None] * K + rk[None, :], acc, mask=r_ok[:, None] & k_ok[None, :], sem="relaxed")


# --------------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------------

# Compile options of every kernel here, at each launch and in its compile spec: mul + add contracted into FMAs, as
# Triton did by default up to 3.9 (3.10 turns the default off), so that an upgrade changes neither speed nor rounding.
_OPTIONS = {"enable_fp_fusion": True}


@dataclass(frozen=True)
class GemmConfig:
    """Tile of a GEMM kernel: BLOCK_M rows x BLOCK_N output columns, BLOCK_K reduction step."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8

    def label(self) -> str:
        return f"{self.block_m}x{self.block_n}x{self.block_k} w{self.num_warps} s{self.num_stages}"

    def constexprs(self) -> dict[str, int]:
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k, "GROUP_M": self.group_m}

    def triton_config(self) -> triton.Config:
        return triton.Config(self.constexprs(), num_warps=self.num_warps, num_stages=self.num_stages)


# GEMM configurations per (weight kind, operand width); the autotuner picks among them per
# (M bucket, N, K) on a GPU, the first one is used without autotuning. The same lists serve the
# forward (columns = N, reduction = K) and dx (columns = K, reduction = N). fp32 GEMMs multiply with
# FMAs, whose dot operands live in registers: short reduction steps. The fused-decode ("w4") tiles
# span at most _W4_MAX_TILE columns of W (fwd: BLOCK_K, dx: BLOCK_N).
GEMM_CONFIGS: dict[tuple[str, str], tuple[GemmConfig, ...]] = {
    # (128x128 tiles spill once the LoRA epilogue / prologue is fused: 128x64 and 64x128 do not.)
    ("dense", "16bit"): (
        GemmConfig(128, 64, 64, 4, 4),
        GemmConfig(64, 128, 64, 8, 3),
        GemmConfig(64, 64, 64, 4, 3),
    ),
    ("dense", "fp32"): (
        GemmConfig(64, 64, 16, 4, 3),
        GemmConfig(128, 64, 16, 8, 3),
    ),
    ("w4", "16bit"): (
        GemmConfig(16, 64, 64, 4, 4),
        GemmConfig(64, 64, 64, 4, 3),
    ),
    ("w4", "fp32"): (
        GemmConfig(16, 64, 16, 4, 3),
        GemmConfig(32, 64, 16, 4, 3),
    ),
}
assert all(c.block_k <= _W4_MAX_TILE and c.block_n <= _W4_MAX_TILE for w in ("16bit", "fp32")
           for c in GEMM_CONFIGS["w4", w])  # fmt: skip
# One small fixed configuration under the interpreter (numerics tests): several tiles and loop
# iterations on tiny shapes.
_INTERP_GEMM = {"dense": GemmConfig(32, 64, 32, 4, 1, group_m=2), "w4": GemmConfig(16, 64, 32, 4, 1, group_m=2)}


@dataclass(frozen=True)
class SmallConfig:
    """Tile of the S / dS / dA kernels: BLOCK_M rows, BLOCK_C columns (S, dA: a range of K; dS: the
    reduction step over N)."""

    block_m: int
    block_c: int
    num_warps: int


# keyed by (BLOCK_R, operand width of the kernel's dots)
S_CONFIGS = {
    (16, "16bit"): SmallConfig(64, 64, 4), (64, "16bit"): SmallConfig(64, 64, 4),
    (16, "fp32"): SmallConfig(64, 16, 4), (64, "fp32"): SmallConfig(64, 16, 4),
}  # fmt: skip
DS_CONFIGS = {
    (16, "16bit"): SmallConfig(64, 64, 4), (64, "16bit"): SmallConfig(64, 64, 4),
    (256, "16bit"): SmallConfig(32, 32, 8),
    (16, "fp32"): SmallConfig(32, 16, 4), (64, "fp32"): SmallConfig(32, 16, 4), (256, "fp32"): SmallConfig(16, 16, 8),
}  # fmt: skip
DA_CONFIGS = {16: SmallConfig(16, 64, 4), 64: SmallConfig(16, 64, 4)}  # fp32 FMA dots (dS is fp32)
_INTERP_SMALL = SmallConfig(32, 32, 4)
_DA_PROGRAMS = 4 * 132  # target number of dA programs (about four per SM of an H100)


def _s_block_r(rank: int) -> int:
    return 16 if rank <= 16 else 64  # larger ranks: one program per 64 ranks


def _ds_block_r(rank: int) -> int:
    return 16 if rank <= 16 else 64 if rank <= 64 else 256  # all ranks in one program (one pass over G)


def _width(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "16bit"


def _m_bucket(m: int) -> int:
    return min(next_pow2(m), 8192)


def _prune(configs, named_args, **kwargs):
    """Autotune pruning: no BLOCK_M much larger than M (keep at least the smallest)."""
    m = named_args["M_BUCKET"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, m)]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"])]


_TUNED: dict[tuple, object] = {}


def _launch_gemm(fn, kind: str, width: str, grid_fn, args, kwargs) -> None:
    """Run a GEMM kernel with the interpreter's fixed config, the first config, or the autotuner."""
    configs = GEMM_CONFIGS[kind, width]
    if is_interpreted(fn):
        cfg = _INTERP_GEMM[kind]
    elif not AUTOTUNE or len(configs) == 1:
        cfg = configs[0]
    else:
        key = (fn, kind, width)
        tuned = _TUNED.get(key)
        if tuned is None:
            tuned = _TUNED[key] = triton.autotune(
                configs=[c.triton_config() for c in configs], key=["M_BUCKET", "N", "K"],
                prune_configs_by={"early_config_prune": _prune},
            )(fn)  # fmt: skip
        tuned[lambda meta: (grid_fn(meta["BLOCK_M"], meta["BLOCK_N"]),)](*args, **kwargs, **_OPTIONS)
        return
    grid = (grid_fn(cfg.block_m, cfg.block_n),)
    fn[grid](*args, **kwargs, **cfg.constexprs(), num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_OPTIONS)


# --------------------------------------------------------------------------------------------------
# Compile-check registry
# --------------------------------------------------------------------------------------------------

_C = "constexpr"


def compile_specs() -> list[CompileSpec]:
    """Every kernel configuration the launchers can produce on a GPU, for each (x, adapter) dtype pair."""
    specs: list[CompileSpec] = []
    for xdt, adt in _DTYPE_PAIRS:
        x, a = _XDTYPES[xdt], _XDTYPES[adt]
        pair = f"x={x} A={a}"
        for (block_r, width), c in S_CONFIGS.items():
            if width != _width(adt):
                continue
            specs.append(CompileSpec(
                kernel="lora_s", config=f"{pair} R{block_r} {c.block_m}x{c.block_c} w{c.num_warps}",
                fn=_lora_s_kernel,
                signature={"x_ptr": f"*{x}", "a_ptr": f"*{a}", "s_ptr": f"*{a}", "mask_ptr": "*u8", "M": "i32",
                           "K": "i32", "R": "i32", "seed_ptr": "*i64", "threshold": "i32", "scale": "fp32",
                           "dropout_mode": "i32", "BLOCK_M": _C, "BLOCK_K": _C, "BLOCK_R": _C, "INTERP": _C},
                constexprs={"BLOCK_M": c.block_m, "BLOCK_K": c.block_c, "BLOCK_R": block_r, "INTERP": False},
                aligned=("x_ptr", "a_ptr", "s_ptr", "mask_ptr", "K"), num_warps=c.num_warps,
                options=_OPTIONS,
            ))  # fmt: skip
        for (block_r, width), c in DS_CONFIGS.items():
            if width != _width(adt):
                continue
            specs.append(CompileSpec(
                kernel="lora_bwd_ds", config=f"{pair} R{block_r} {c.block_m}x{c.block_c} w{c.num_warps}",
                fn=_lora_bwd_ds_kernel,
                signature={"g_ptr": f"*{x}", "b_ptr": f"*{a}", "s_ptr": f"*{a}", "ds_ptr": "*fp32", "db_ptr": "*fp32",
                           "M": "i32", "N": "i32", "R": "i32", "scaling": "fp32", "need_ds": "i32", "need_db": "i32",
                           "BLOCK_M": _C, "BLOCK_N": _C, "BLOCK_R": _C, "INTERP": _C},
                constexprs={"BLOCK_M": c.block_m, "BLOCK_N": c.block_c, "BLOCK_R": block_r, "INTERP": False},
                aligned=("g_ptr", "b_ptr", "s_ptr", "ds_ptr", "db_ptr", "N"), num_warps=c.num_warps,
                options=_OPTIONS,
            ))  # fmt: skip
        for block_r, c in DA_CONFIGS.items():
            specs.append(CompileSpec(
                kernel="lora_bwd_da", config=f"{pair} R{block_r} {c.block_m}x{c.block_c} w{c.num_warps}",
                fn=_lora_bwd_da_kernel,
                signature={"x_ptr": f"*{x}", "ds_ptr": "*fp32", "da_ptr": "*fp32", "mask_ptr": "*u8",
                           "a_ptr": f"*{a}", "M": "i32", "K": "i32", "R": "i32", "rows_per_split": "i32",
                           "seed_ptr": "*i64", "threshold": "i32", "scale": "fp32", "dropout_mode": "i32",
                           "BLOCK_M": _C, "BLOCK_K": _C, "BLOCK_R": _C, "INTERP": _C},
                constexprs={"BLOCK_M": c.block_m, "BLOCK_K": c.block_c, "BLOCK_R": block_r, "INTERP": False},
                aligned=("x_ptr", "ds_ptr", "da_ptr", "mask_ptr", "a_ptr", "K"), num_warps=c.num_warps,
                options=_OPTIONS,
            ))  # fmt: skip
        specs.append(CompileSpec(
            kernel="lora_add", config=f"{pair} {ADD_CONFIG[0]}x{ADD_CONFIG[1]} w4", fn=_lora_add_kernel,
            signature={"base_ptr": f"*{x}", "s_ptr": f"*{a}", "b_ptr": f"*{a}", "y_ptr": f"*{x}", "M": "i32",
                       "N": "i32", "R": "i32", "scaling": "fp32", "linear4bit": "i32", "BLOCK_M": _C, "BLOCK_N": _C,
                       "INTERP": _C},
            constexprs={"BLOCK_M": ADD_CONFIG[0], "BLOCK_N": ADD_CONFIG[1], "INTERP": False},
            aligned=("base_ptr", "s_ptr", "b_ptr", "y_ptr", "N"), num_warps=4,
            options=_OPTIONS,
        ))  # fmt: skip
        for kind in ("dense", "w4"):
            w = "*u8" if kind == "w4" else f"*{x}"
            for cfg in GEMM_CONFIGS[kind, _width(xdt)]:
                common = {"W4": kind == "w4", **cfg.constexprs(), "INTERP": False}
                specs.append(CompileSpec(
                    kernel="lora_fwd", config=f"{pair} {kind} {cfg.label()}", fn=_lora_fwd_kernel,
                    signature={"x_ptr": f"*{x}", "w_ptr": w, "absmax_ptr": "*fp32", "table_ptr": "*fp32",
                               "bias_ptr": f"*{x}", "s_ptr": f"*{a}", "b_ptr": f"*{a}", "y_ptr": f"*{x}",
                               "M": "i32", "N": "i32", "K": "i32", "R": "i32", "log2_bs": "i32", "scaling": "fp32",
                               "has_bias": "i32", "linear4bit": "i32", "M_BUCKET": "i32",
                               **dict.fromkeys(common, _C)},
                    constexprs=common,
                    aligned=("x_ptr", "w_ptr", "absmax_ptr", "table_ptr", "bias_ptr", "s_ptr", "b_ptr", "y_ptr",
                             "N", "K"),
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages, options=_OPTIONS,
                ))  # fmt: skip
                specs.append(CompileSpec(
                    kernel="lora_bwd_dx", config=f"{pair} {kind} {cfg.label()}", fn=_lora_bwd_dx_kernel,
                    signature={"g_ptr": f"*{x}", "w_ptr": w, "absmax_ptr": "*fp32", "table_ptr": "*fp32",
                               "ds_ptr": "*fp32", "a_ptr": f"*{a}", "dx_ptr": f"*{x}", "mask_ptr": "*u8",
                               "M": "i32", "N": "i32", "K": "i32", "R": "i32", "log2_bs": "i32",
                               "seed_ptr": "*i64", "threshold": "i32", "scale": "fp32", "dropout_mode": "i32",
                               "M_BUCKET": "i32", **dict.fromkeys(common, _C)},
                    constexprs=common,
                    aligned=("g_ptr", "w_ptr", "absmax_ptr", "table_ptr", "ds_ptr", "a_ptr", "dx_ptr", "mask_ptr",
                             "N", "K"),
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages, options=_OPTIONS,
                ))  # fmt: skip
    return specs


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------

_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def _table(quant_type: str, device: torch.device) -> torch.Tensor:
    key = (quant_type, device)
    if key not in _TABLES:
        _TABLES[key] = code_table(quant_type).to(device)
    return _TABLES[key]


def uses_fused_4bit(m: int, k: int, blocksize: int) -> bool:
    """Whether a 4-bit weight is decoded inside the GEMMs (True) or once into a workspace (False):
    M <= SMALL_M, and rows of whole quantization blocks of at least _W4_MAX_TILE elements."""
    return m <= SMALL_M and blocksize >= _W4_MAX_TILE and k % blocksize == 0


def _dropout_args(p: float, seed: torch.Tensor, m: int, k: int, like: torch.Tensor):
    """(mask, threshold, scale, dropout_mode) kernel arguments (the kernels also take ``seed``, the
    checked seed tensor on like's device, whatever p). The mask is a freshly generated uint8 (m, k)
    keep mask when K % 4 != 0 (dropout_mode 1), else a dummy."""
    if p == 0.0:
        return like, 0, 1.0, 0
    threshold, scale = dropout_constants(p)
    if k % 4 == 0:
        return like, threshold, scale, 2
    return dropout_keep_mask(m * k, p, seed, like.device), threshold, scale, 1


def _check_common(x, weight, absmax, blocksize, quant_type, n, lora_A, lora_B):
    if x.dtype not in _XDTYPES:
        raise TypeError(f"x must be float32, bfloat16 or float16 for the Triton backend, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (M, K), got shape {tuple(x.shape)}")
    k = x.shape[1]
    if lora_A.dtype not in (torch.float32, x.dtype) or lora_B.dtype != lora_A.dtype:
        raise TypeError(f"lora_A / lora_B must both be float32 or x's dtype, got {lora_A.dtype} / {lora_B.dtype}")
    r = lora_A.shape[0] if lora_A.dim() == 2 else 0
    if lora_A.dim() != 2 or lora_A.shape[1] != k or not 1 <= r <= MAX_RANK:
        raise ValueError(f"lora_A must be (r, {k}) with 1 <= r <= {MAX_RANK}, got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (n, r):
        raise ValueError(f"lora_B must be ({n}, {r}), got {tuple(lora_B.shape)}")
    if absmax is None:
        if weight.dtype != x.dtype or tuple(weight.shape) != (n, k):
            raise ValueError(f"dense weight must be ({n}, {k}) of x's dtype, got {weight.dtype}{tuple(weight.shape)}")
        return
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    if blocksize not in tuple(1 << s for s in range(5, 13)):
        raise ValueError(f"blocksize must be a power of two in [32, 4096], got {blocksize}")
    if absmax.dtype != torch.float32:
        raise TypeError(f"absmax must be float32 (double quant resolved), got {absmax.dtype}")
    nbytes = weight.numel() * weight.element_size()
    if nbytes < (n * k + 1) // 2 or absmax.numel() < -(-n * k // blocksize):
        raise ValueError(f"packed / absmax hold {nbytes} bytes / {absmax.numel()} scales, too few for a ({n}, {k}) "
                         f"weight with blocksize {blocksize}")  # fmt: skip


def _weight_args(x, weight, absmax, blocksize, quant_type, n, fused: bool):
    """(w, absmax, table, log2_bs, W4) for the GEMM kernels: the dense weight, a freshly decoded
    x-dtype workspace (4-bit, not fused), or the packed codes (4-bit, fused)."""
    if absmax is None:
        return weight.contiguous(), x, x, 0, False
    k = x.shape[1]
    packed = weight.contiguous()
    packed = (packed if packed.dtype == torch.uint8 else packed.view(torch.uint8)).reshape(-1)
    absmax = absmax.reshape(-1).contiguous()
    if not fused:
        return _dequantize_workspace(packed, absmax, blocksize, quant_type, n, k, x.dtype), x, x, 0, False
    return packed, absmax, _table(quant_type, x.device), blocksize.bit_length() - 1, True


def _dequantize_workspace(packed, absmax, blocksize: int, quant_type: str, n: int, k: int, dtype) -> torch.Tensor:
    """The (n, k) weight decoded once into ``dtype``: with fastlora's CUDA kernel where the extension
    has it (2.5-4x this module's Triton kernel on an H100, bench/bench_dequantize_gpu.py), else Triton."""
    from .. import backends

    if packed.is_cuda and backends.available("cuda")["cuda"]:
        return torch.ops.fastlora.dequantize_4bit(packed, absmax, blocksize, quant_type, n * k, dtype).view(n, k)
    return dequantize_4bit(packed, absmax, blocksize, quant_type, n * k, dtype).view(n, k)


def _torch_gemms(interp: bool) -> bool:
    if GEMMS not in ("auto", "torch", "triton"):
        raise ValueError(f"fastlora.kernels.lora_linear.GEMMS must be 'auto', 'torch' or 'triton', got {GEMMS!r}")
    return GEMMS == "torch" or (GEMMS == "auto" and not interp)


ADD_CONFIG = (64, 64)  # (BLOCK_M, BLOCK_N) of _lora_add_kernel, 4 warps (64x128 spills with fp32 adapters)


def _split_adapters(x_dtype: torch.dtype, adapter_dtype: torch.dtype) -> bool:
    if ADAPTER_GEMMS not in ("auto", "split", "fp32"):
        raise ValueError(f"fastlora.kernels.lora_linear.ADAPTER_GEMMS must be 'auto', 'split' or 'fp32', "
                         f"got {ADAPTER_GEMMS!r}")  # fmt: skip
    return ADAPTER_GEMMS != "fp32" and adapter_gemms.split_applies(x_dtype, adapter_dtype)


def _fwd_torch(x, w, bias, s, lora_B, scaling: float, rounding: str, interp: bool) -> torch.Tensor:
    """y with PEFT's roundings (reference_lora.py) from a torch (cuBLAS) base GEMM, base = rnd_X(x·Wᵀ + b),
    and the LoRA term added in place by _lora_add_kernel (one pass over base: on an H100 the same
    epilogue as four torch ops took 199 us at 4096x4096, longer than the dequantization)."""
    y = torch.nn.functional.linear(x, w, bias)
    m, n = y.shape
    r = s.shape[1]
    block_m, block_n = (16, 32) if interp else ADD_CONFIG
    _lora_add_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
        y, s, lora_B, y, m, n, r, float(scaling), int(rounding == "linear4bit"),
        BLOCK_M=block_m, BLOCK_N=block_n, INTERP=interp, num_warps=4, **_OPTIONS,
    )  # fmt: skip
    return y


def lora_linear_fwd(x, weight, absmax, blocksize, quant_type, out_features, lora_A, lora_B, scaling, bias,
                    dropout_p, seed, rounding):
    """Forward of the LoRA linear layer; arguments as ``fastlora.reference_lora.lora_linear_fwd``, with
    ``seed`` an int64 tensor with one element on x's device or the CPU (see ``_common.check_seed``).
    Returns (y (M, N) in x's dtype, S (M, r) in lora_A's dtype)."""
    n = int(out_features)
    _check_common(x, weight, absmax, blocksize, quant_type, n, lora_A, lora_B)
    if rounding not in ("linear", "linear4bit"):
        raise ValueError(f"rounding must be 'linear' or 'linear4bit', got {rounding!r}")
    if bias is not None and (bias.dtype != x.dtype or tuple(bias.shape) != (n,)):
        raise ValueError(f"bias must be ({n},) of x's dtype, got {bias.dtype}{tuple(bias.shape)}")
    fn = _lora_fwd_kernel
    check_device(fn, x.device, weight=weight, absmax=absmax, lora_A=lora_A, lora_B=lora_B, bias=bias)
    seed = check_seed(seed, x.device)
    interp = is_interpreted(fn)
    m, k = x.shape
    r = lora_A.shape[0]
    x = x.contiguous()
    lora_A, lora_B = lora_A.contiguous(), lora_B.contiguous()
    if m == 0:
        return (torch.empty((0, n), dtype=x.dtype, device=x.device),
                torch.empty((0, r), dtype=lora_A.dtype, device=x.device))

    # y and S are allocated by whatever computes them: torch's GEMMs make their own, so an (M, N) buffer
    # allocated up front would sit unused through the whole call on the GPU path.
    torch_gemms = _torch_gemms(interp)
    pieces = torch_gemms and _split_adapters(x.dtype, lora_A.dtype)
    if pieces:
        s = torch_path.s_pieces(x, lora_A, float(dropout_p), seed)
    elif torch_gemms:
        s = torch_path.s_fp32(x, lora_A, float(dropout_p), seed)
    else:
        s = torch.empty((m, r), dtype=lora_A.dtype, device=x.device)
        keep_mask, threshold, scale, mode = _dropout_args(float(dropout_p), seed, m, k, x)
        block_r = _s_block_r(r)
        sc = _INTERP_SMALL if interp else S_CONFIGS[block_r, _width(lora_A.dtype)]
        _lora_s_kernel[(triton.cdiv(m, sc.block_m), triton.cdiv(r, block_r))](
            x, lora_A, s, keep_mask, m, k, r, seed, threshold, scale, mode,
            BLOCK_M=sc.block_m, BLOCK_K=sc.block_c, BLOCK_R=block_r, INTERP=interp, num_warps=sc.num_warps,
            **_OPTIONS,
        )  # fmt: skip
    if n == 0:
        return torch.empty((m, 0), dtype=x.dtype, device=x.device), s

    fused = absmax is not None and uses_fused_4bit(m, k, blocksize) and not torch_gemms
    w, amax, table, log2_bs, w4 = _weight_args(x, weight, absmax, blocksize, quant_type, n, fused)
    if pieces:
        return torch_path.y_pieces(x, w, bias, s, lora_B, float(scaling), rounding), s
    if torch_gemms:
        return _fwd_torch(x, w, bias, s, lora_B, float(scaling), rounding, interp), s
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    args = (x, w, amax, table, bias.contiguous() if bias is not None else y, s, lora_B, y, m, n, k, r, log2_bs,
            float(scaling), int(bias is not None), int(rounding == "linear4bit"), _m_bucket(m))  # fmt: skip
    _launch_gemm(fn, "w4" if w4 else "dense", _width(x.dtype), lambda bm, bn: triton.cdiv(m, bm) * triton.cdiv(n, bn),
                 args, {"W4": w4, "INTERP": interp})  # fmt: skip
    return y, s


def _da_split(m: int, k_tiles: int, r_tiles: int, block_m: int, interp: bool) -> int:
    """Rows per program of the dA kernel (a multiple of block_m): enough M slices to fill the GPU."""
    blocks = triton.cdiv(m, block_m)
    splits = 2 if interp else max(1, _DA_PROGRAMS // max(1, k_tiles * r_tiles))
    return triton.cdiv(blocks, min(blocks, splits)) * block_m


def lora_linear_bwd(grad_y, x, S, weight, absmax, blocksize, quant_type, out_features, lora_A, lora_B, scaling,
                    dropout_p, seed, need_dx, need_dA, need_dB):
    """Backward of the LoRA linear layer; arguments as ``fastlora.reference_lora.lora_linear_bwd``, with
    ``seed`` (the forward's) an int64 tensor with one element on x's device or the CPU. Returns
    (dx (M, K) in x's dtype, dA (r, K), dB (N, r) in lora_A's dtype); an output that is not needed is
    an empty (0,) tensor."""
    n = int(out_features)
    _check_common(x, weight, absmax, blocksize, quant_type, n, lora_A, lora_B)
    m, k = x.shape
    r = lora_A.shape[0]
    if grad_y.dtype != x.dtype or tuple(grad_y.shape) != (m, n):
        raise ValueError(f"grad_y must be ({m}, {n}) of x's dtype, got {grad_y.dtype}{tuple(grad_y.shape)}")
    if S.dtype != lora_A.dtype or tuple(S.shape) != (m, r):
        raise ValueError(f"S must be ({m}, {r}) of lora_A's dtype, got {S.dtype}{tuple(S.shape)}")
    fn = _lora_bwd_dx_kernel
    check_device(fn, x.device, grad_y=grad_y, S=S, weight=weight, absmax=absmax, lora_A=lora_A, lora_B=lora_B)
    seed = check_seed(seed, x.device)
    interp = is_interpreted(fn)
    dev, adt = x.device, lora_A.dtype
    need_dx, need_dA, need_dB = bool(need_dx), bool(need_dA), bool(need_dB)
    torch_gemms = _torch_gemms(interp)
    pieces = torch_gemms and _split_adapters(x.dtype, adt)
    # The Triton kernels write dx and accumulate dA / dB (atomics) into buffers made here; on the torch path (m > 0)
    # the GEMMs make their own, so buffers made up front would sit unused (dx: (M, K) through the whole backward).
    kernels_write = not (torch_gemms and m > 0)
    dx = torch.empty((m, k), dtype=x.dtype, device=dev) if need_dx and kernels_write else x.new_empty((0,))
    da_ws = torch.zeros((r, k), dtype=torch.float32, device=dev) if need_dA and kernels_write else None
    db_ws = torch.zeros((n, r), dtype=torch.float32, device=dev) if need_dB and kernels_write else None
    need_ds = need_dx or need_dA
    if m > 0 and (need_ds or need_dB):
        grad_y, x, S = grad_y.contiguous(), x.contiguous(), S.contiguous()
        lora_A, lora_B = lora_A.contiguous(), lora_B.contiguous()
        if pieces:
            ds, db_ws = torch_path.ds_db_pieces(grad_y, S, lora_B, float(scaling), need_ds, need_dB)
        elif torch_gemms:
            ds, db_ws = torch_path.ds_db_fp32(grad_y, S, lora_B, float(scaling), need_ds, need_dB)
        else:
            ds = torch.empty((m, r), dtype=torch.float32, device=dev) if need_ds else db_ws
            block_r = _ds_block_r(r)
            dc = _INTERP_SMALL if interp else DS_CONFIGS[block_r, _width(adt)]
            _lora_bwd_ds_kernel[(triton.cdiv(m, dc.block_m),)](
                grad_y, lora_B, S, ds, db_ws if need_dB else ds, m, n, r, float(scaling), int(need_ds),
                int(need_dB), BLOCK_M=dc.block_m, BLOCK_N=dc.block_c, BLOCK_R=block_r, INTERP=interp,
                num_warps=dc.num_warps, **_OPTIONS,
            )  # fmt: skip
        if need_ds and not torch_gemms:
            keep_mask, threshold, scale, mode = _dropout_args(float(dropout_p), seed, m, k, x)
        if need_dx:
            fused = absmax is not None and uses_fused_4bit(m, k, blocksize) and not torch_gemms
            w, amax, table, log2_bs, w4 = _weight_args(x, weight, absmax, blocksize, quant_type, n, fused)
            if pieces:
                dx = torch_path.dx_pieces(grad_y, w, ds, lora_A, float(dropout_p), seed)
            elif torch_gemms:
                dx = torch_path.dx_fp32(grad_y, w, ds, lora_A, float(dropout_p), seed)
            else:
                args = (grad_y, w, amax, table, ds, lora_A, dx, keep_mask, m, n, k, r, log2_bs, seed, threshold,
                        scale, mode, _m_bucket(m))  # fmt: skip
                _launch_gemm(fn, "w4" if w4 else "dense", _width(x.dtype),
                             lambda bm, bn: triton.cdiv(m, bm) * triton.cdiv(k, bn), args,
                             {"W4": w4, "INTERP": interp})  # fmt: skip
        if need_dA and pieces:
            da_ws = torch_path.da_pieces(x, ds, float(dropout_p), seed)
        elif need_dA and torch_gemms:
            da_ws = torch_path.da_fp32(x, ds, lora_A, float(dropout_p), seed)
        elif need_dA:
            block_r = _s_block_r(r)
            ac = _INTERP_SMALL if interp else DA_CONFIGS[block_r]
            k_tiles, r_tiles = triton.cdiv(k, ac.block_c), triton.cdiv(r, block_r)
            rows_per_split = _da_split(m, k_tiles, r_tiles, ac.block_m, interp)
            _lora_bwd_da_kernel[(k_tiles, r_tiles, triton.cdiv(m, rows_per_split))](
                x, ds, da_ws, keep_mask, lora_A, m, k, r, rows_per_split, seed, threshold, scale, mode,
                BLOCK_M=ac.block_m, BLOCK_K=ac.block_c, BLOCK_R=block_r, INTERP=interp, num_warps=ac.num_warps,
                **_OPTIONS,
            )  # fmt: skip
    # (outputs of a custom op must not alias each other: a fresh empty tensor for each one not needed)
    dA = da_ws.to(adt) if need_dA else x.new_empty((0,))
    dB = x.new_empty((0,))
    if need_dB:  # rnd_D(fp32(sum) * fp32(scaling)), as the reference; a Python float: no host to device copy
        dB = (db_ws * float(scaling)).to(adt)
    return dx, dA, dB
