"""Triton kernel of the NEFTune embedding: lookup + uniform noise in one pass (``fastlora::neftune_embedding``).

Contract (the same on the torch reference, the C++ CPU and the CUDA kernels; bitwise)::

    out[t, j] = round_to(weight.dtype, float(weight[ids[t], j]) + u(i) * mag[t]),   i = t * d + j

* ``bits(i)``: the 16-bit half ``i & 1`` (low first) of word ``(i >> 1) & 3`` of the Philox4x32-10 block ``i >> 3``
  on stream 1 (csrc/include/fastlora/philox.h ``philox_half``): one Philox evaluation per eight elements;
* ``u(i) = float((int32)bits - 2^15) * 2^-15``: exact, in [-1, 1);
* the noise ``u * mag`` is one rounded fp32 product, then ONE fp32 add, then one RNE rounding to the weight dtype;
  no FMA anywhere (the product is :func:`mul_rn`, which ptxas cannot contract);
* where ``mag[t] == 0`` the output row is exactly ``weight[ids[t]]`` (signed zeros and NaN payloads included).

One program per (block of tokens, block of columns). Rows of a ``d % 8 == 0`` weight start at multiples of 8
elements, so there one Philox evaluation serves eight consecutive elements; other widths evaluate Philox per
element. Loads and stores are contiguous along ``d`` (16-byte vectors when ``d`` and the pointers are
16-aligned). Out-of-range ids are refused on the host (one ``aminmax``; not while a CUDA graph is being
captured); the kernel masks them as well (no out-of-bounds read whatever it is given) and writes NaN rows for
them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import FP_FMA_PTX, CompileSpec
from ._common import check_device, check_seed, is_interpreted, mul_rn, round_to, stream_capturing, to_f32
from .philox import load_key, philox4x32_10

__all__ = ["NEFTUNE_CONFIGS", "STREAM_NEFTUNE", "NeftuneConfig", "compile_specs", "neftune_config", "neftune_embedding"]

STREAM_NEFTUNE = 1
_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_STREAM: tl.constexpr = tl.constexpr(STREAM_NEFTUNE)
_U_SCALE: tl.constexpr = tl.constexpr(1.0 / 32768.0)  # 2^-15, exact


@triton.jit
def _block_words(n, k0, k1):
    """The four uint32 words of the Philox blocks ``n`` (int64 tile) on the NEFTune stream, key (k0, k1)."""
    c0 = n.to(tl.uint32)  # lo32(n)
    c1 = (n >> 32).to(tl.uint32)
    c2 = tl.full(c0.shape, _STREAM, tl.uint32)
    c3 = tl.zeros(c0.shape, tl.uint32)
    return philox4x32_10(c0, c1, c2, c3, k0, k1)


@triton.jit
def _uniform(bits):
    """16 random bits (uint32 < 2^16) -> fp32 in [-1, 1): float((int32)bits - 2^15) * 2^-15 (both steps exact)."""
    return (bits.to(tl.int32) - 32768).to(tl.float32) * _U_SCALE


# The seed is read through seed_ptr at run time (a CUDA graph replays the tensor's current value); its
# alignment does not matter to one 8-byte load, so it does not split the kernel cache.
@triton.jit(do_not_specialize_on_alignment=["seed_ptr"])
def _neftune_embedding_kernel(
    ids_ptr,  # *i64 [T]
    w_ptr,  # *fp32 | *bf16 | *fp16 [V, d] contiguous
    mag_ptr,  # *fp32 [T]
    out_ptr,  # weight's dtype [T, d]
    T,
    V,
    d,
    seed_ptr,  # *i64 [1]: the seed, Philox key (lo32, hi32)
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUPS: tl.constexpr,  # d % 8 == 0: one Philox evaluation per 8 elements
    INTERP: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    c0 = tl.program_id(1) * BLOCK_D
    cols = c0 + tl.arange(0, BLOCK_D)
    row_ok = t < T
    ids = tl.load(ids_ptr + t, mask=row_ok, other=0)
    id_ok = (ids >= 0) & (ids < V)
    mag = tl.load(mag_ptr + t, mask=row_ok, other=0.0)
    col_ok = cols < d
    store_mask = row_ok[:, None] & col_ok[None, :]
    load_mask = store_mask & id_ok[:, None]
    w = tl.load(w_ptr + (ids * d)[:, None] + cols[None, :], mask=load_mask, other=0.0)
    k0, k1 = load_key(seed_ptr)

    if GROUPS:
        # Rows start at multiples of 8 (d % 8 == 0) and so does c0: group g of the tile is Philox block
        # (t * d + c0) / 8 + g, its eight halves the elements 8g .. 8g + 7.
        G: tl.constexpr = BLOCK_D // 8
        n = (t * (d // 8) + c0 // 8)[:, None] + tl.arange(0, G)[None, :].to(tl.int64)
        w0, w1, w2, w3 = _block_words(n, k0, k1)
        # element 8g + 4a + 2b + c is half c of word 2a + b; join adds a last axis, so the joins nest c outermost
        # (x_e: half e & 1 of word e >> 1) and a row-major reshape puts element e at 8g + e.
        x0, x1, x2, x3 = w0 & 0xFFFF, w0 >> 16, w1 & 0xFFFF, w1 >> 16
        x4, x5, x6, x7 = w2 & 0xFFFF, w2 >> 16, w3 & 0xFFFF, w3 >> 16
        even = tl.join(tl.join(x0, x4), tl.join(x2, x6))  # c = 0: [..., a, b] = x_{4a + 2b}
        odd = tl.join(tl.join(x1, x5), tl.join(x3, x7))  # c = 1
        bits = tl.reshape(tl.join(even, odd), (BLOCK_T, BLOCK_D))
    else:
        i = (t * d)[:, None] + cols[None, :].to(tl.int64)
        w0, w1, w2, w3 = _block_words(i >> 3, k0, k1)
        k = (i >> 1) & 3
        word = tl.where(k == 0, w0, tl.where(k == 1, w1, tl.where(k == 2, w2, w3)))
        bits = tl.where((i & 1) == 0, word & 0xFFFF, word >> 16)

    noise = mul_rn(_uniform(bits), tl.broadcast_to(mag[:, None], (BLOCK_T, BLOCK_D)), INTERP)
    v = round_to(to_f32(w, INTERP) + noise, out_ptr.dtype.element_ty, INTERP)
    v = tl.where((mag == 0.0)[:, None], w, v)  # exactly the lookup (also -0.0 and NaN payloads)
    v = tl.where(id_ok[:, None], v, float("nan"))  # never reached through the launcher (host check)
    tl.store(out_ptr + (t * d)[:, None] + cols[None, :], v, mask=store_mask)


@dataclass(frozen=True)
class NeftuneConfig:
    name: str
    block_t: int
    block_d: int
    num_warps: int


# wide: rows of >= 512 elements, 2048 elements per program (16 per thread: 16-byte vectors of 16-bit types
# twice, or four fp32 vectors). narrow: short rows, 16 tokens of 64 columns per program.
NEFTUNE_CONFIGS = {
    "wide": NeftuneConfig("wide", block_t=2, block_d=1024, num_warps=4),
    "narrow": NeftuneConfig("narrow", block_t=16, block_d=64, num_warps=4),
}


def neftune_config(d: int) -> NeftuneConfig:
    return NEFTUNE_CONFIGS["wide" if d >= 512 else "narrow"]


def compile_specs() -> list[CompileSpec]:
    specs = []
    for name in _DTYPES.values():
        for cfg in NEFTUNE_CONFIGS.values():
            # (GROUPS, d and pointers 16-aligned): d % 16 == 0, d % 8 == 0 only, other widths.
            for groups, aligned in ((True, True), (True, False), (False, False)):
                label = f"{name} {cfg.name} T{cfg.block_t}xD{cfg.block_d} w{cfg.num_warps}"
                label += " d%16" if aligned else (" d%8" if groups else " odd d")
                specs.append(CompileSpec(
                    kernel="neftune_embedding",
                    config=label,
                    fn=_neftune_embedding_kernel,
                    signature={
                        "ids_ptr": "*i64", "w_ptr": f"*{name}", "mag_ptr": "*fp32", "out_ptr": f"*{name}",
                        "T": "i32", "V": "i32", "d": "i32", "seed_ptr": "*i64",
                        "BLOCK_T": "constexpr", "BLOCK_D": "constexpr", "GROUPS": "constexpr", "INTERP": "constexpr",
                    },
                    constexprs={"BLOCK_T": cfg.block_t, "BLOCK_D": cfg.block_d, "GROUPS": groups, "INTERP": False},
                    aligned=("ids_ptr", "w_ptr", "mag_ptr", "out_ptr") + (("d",) if aligned else ()),
                    num_warps=cfg.num_warps,
                    options={"enable_fp_fusion": False},
                    forbid_ptx={"fp fma": FP_FMA_PTX},
                ))  # fmt: skip
    return specs


def _check_args(ids: torch.Tensor, weight: torch.Tensor, mag: torch.Tensor) -> int:
    if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64:
        raise TypeError(f"ids must be an int64 tensor, got {getattr(ids, 'dtype', type(ids).__name__)}")
    if not isinstance(weight, torch.Tensor) or weight.dtype not in _DTYPES:
        got = getattr(weight, "dtype", type(weight).__name__)
        raise TypeError(f"weight must be a float32, bfloat16 or float16 tensor, got {got}")
    if not isinstance(mag, torch.Tensor) or mag.dtype != torch.float32:
        raise TypeError(f"mag must be a float32 tensor, got {getattr(mag, 'dtype', type(mag).__name__)}")
    if ids.dim() != 1:
        raise ValueError(f"ids must be 1-D (T,) flat token ids, got shape {tuple(ids.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (V, d), got shape {tuple(weight.shape)}")
    if mag.shape != ids.shape:
        raise ValueError(f"mag must have the shape of ids {tuple(ids.shape)}, got {tuple(mag.shape)}")
    V, d = weight.shape
    if V >= 2**31 or d >= 2**31:
        raise ValueError(f"weight: each dimension must be < 2^31, got shape {tuple(weight.shape)}")
    T = ids.numel()
    if T >= 2**31:
        raise ValueError(f"ids: at most 2^31 - 1 tokens, got {T}")
    return T


def neftune_embedding(
    ids: torch.Tensor, weight: torch.Tensor, mag: torch.Tensor, seed: torch.Tensor, *, check_ids: bool = True
) -> torch.Tensor:
    """``weight[ids] + noise`` (T, d) in weight's dtype: see the module docstring for the exact rule.

    ids: int64 (T,) with 0 <= id < V; weight: (V, d) float32 / bfloat16 / float16; mag: float32 (T,) per-token
    noise magnitude (0: the row is the plain lookup); seed: int64 tensor with one element, value in [0, 2^63),
    read by the kernel at run time. All on one device (CUDA, or CPU under TRITON_INTERPRET=1); the seed may
    also be a CPU tensor (copied to the device, see ``_common.check_seed``). Raises TypeError / ValueError
    naming the argument on bad input; out-of-range ids are found with one ``aminmax`` on the device, read on
    the host after the launch (the one host sync, overlapped with the kernel); ``check_ids=False`` skips it for
    callers that validated the ids already, and it is skipped while a CUDA graph is being captured (no host read
    is possible then). The kernel never reads outside weight either way: bad ids give NaN rows."""
    T = _check_args(ids, weight, mag)
    fn = _neftune_embedding_kernel
    check_device(fn, ids.device, ids=ids, weight=weight, mag=mag)
    seed = check_seed(seed, ids.device)
    V, d = weight.shape
    out = torch.empty((T, d), dtype=weight.dtype, device=weight.device)
    if T == 0 or d == 0:
        return out
    if V == 0:
        raise ValueError("input_ids: out of range for an empty weight (V = 0)")
    bounds, bounds_ready = None, None
    if check_ids and not stream_capturing(ids.device):
        bounds = torch.stack(torch.aminmax(ids))
        if bounds.is_cuda:
            # Copied without blocking and read once the kernel is queued behind the copy: the GPU goes on with
            # the lookup while the host waits for two numbers (bad ids only give NaN rows of an output that is
            # then dropped with the error).
            bounds = bounds.to("cpu", non_blocking=True)
            bounds_ready = torch.cuda.Event()
            bounds_ready.record()
    w = weight.contiguous()
    ids_c = ids.contiguous()
    mag_c = mag.contiguous()
    cfg = neftune_config(d)
    grid = (triton.cdiv(T, cfg.block_t), triton.cdiv(d, cfg.block_d))
    fn[grid](
        ids_c, w, mag_c, out, T, V, d, seed,
        BLOCK_T=cfg.block_t, BLOCK_D=cfg.block_d, GROUPS=d % 8 == 0, INTERP=is_interpreted(fn),
        num_warps=cfg.num_warps, enable_fp_fusion=False,
    )  # fmt: skip
    if bounds is not None:
        if bounds_ready is not None:
            bounds_ready.synchronize()
        lo, hi = bounds.tolist()
        if lo < 0 or hi >= V:
            raise ValueError(f"input_ids must be in [0, {V}) (the rows of weight), got {lo if lo < 0 else hi}")
    return out
