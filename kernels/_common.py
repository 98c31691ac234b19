"""``@triton.jit`` helpers shared by the LoRA kernels (no kernels, no compile specs).

* :func:`round_to`: fp32 -> dtype, round to nearest even, also under the interpreter (which truncates
  fp32 -> bf16: the same integer RNE as kernels/dequantize_4bit.py and quant4.h is used there);
* :func:`to_f32` / :func:`convert`: exact widening (the interpreter's bf16 -> fp32 conversion loses
  subnormals: there it is done on the bits);
* :func:`mma`: ``acc + a @ b`` with fp32 accumulation; fp32 operands use ``input_precision="ieee"``
  (no TF32), 16-bit operands the tensor cores; under the interpreter bf16 operands are widened first
  (its ``dot`` would multiply the raw bf16 bit patterns);
* :func:`mul_rn`: an fp32 product rounded on its own (``mul.rn.f32``), so that ptxas cannot contract it
  with a following add into an FMA where the reference rounds twice;
* :func:`load_w4_tile`: a tile of a bitsandbytes 4-bit weight decoded to the GEMM's dtype;
* host side: :func:`is_interpreted`, :func:`check_device`, :func:`check_seed`, :func:`next_pow2`,
  :func:`stream_capturing`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backends import stream_capturing  # one definition for the reference and the launchers

__all__ = ["check_device", "check_seed", "convert", "is_interpreted", "load_w4_tile", "mma", "mul_rn", "next_pow2",
           "round_to", "stream_capturing", "to_f32"]


def is_interpreted(fn) -> bool:
    """True when ``fn`` was defined under TRITON_INTERPRET=1 (an InterpretedFunction, not a JITFunction)."""
    while hasattr(fn, "fn") and not isinstance(fn, triton.runtime.JITFunction):  # unwrap an Autotuner
        fn = fn.fn
    return not isinstance(fn, triton.runtime.JITFunction)


def check_device(fn, device: torch.device, **tensors: torch.Tensor | None) -> None:
    """All tensors on ``device``; CPU tensors only when the kernels run under the interpreter."""
    for name, t in tensors.items():
        if t is None:
            continue
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, expected {device} (the device of x)")
    if device.type != "cuda" and not is_interpreted(fn):
        raise ValueError(
            f"Triton kernels need CUDA tensors (got {device}); set TRITON_INTERPRET=1 before importing "
            "fastlora.kernels to run them on the CPU"
        )


def check_seed(seed: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The dropout / NEFTune seed as the kernels take it: an int64 tensor with one element on ``device``
    (the inputs' device), whose 64 bits are the Philox key; the kernels load it at run time (``seed_ptr``),
    so a CUDA graph replays whatever value the tensor holds then.

    ``seed`` must be an int64 tensor with one element (0-dim or (1,)) on ``device`` or on the CPU. A CPU
    seed given with GPU inputs is copied to the device (``non_blocking``): convenient, but that copy reads
    host memory when it is issued, so it is not CUDA-graph safe. Its value must be in [0, 2^63); that is
    checked only for a CPU seed, whose value is free to read (reading a GPU seed would synchronize).
    Raises TypeError / ValueError naming ``seed``."""
    if not isinstance(seed, torch.Tensor):
        raise TypeError(f"seed must be a torch.Tensor (int64, one element), got {type(seed).__name__}")
    if seed.dtype != torch.int64:
        raise TypeError(f"seed must be an int64 tensor (one element), got dtype {seed.dtype}")
    if seed.numel() != 1:
        raise ValueError(f"seed must have exactly one element, got shape {tuple(seed.shape)}")
    device = torch.device(device)
    if seed.device.type == "cpu":
        if seed.item() < 0:
            raise ValueError(f"seed must be in [0, 2^63), got {seed.item()}")
        if device.type != "cpu":
            seed = seed.to(device, non_blocking=True)
    elif seed.device != device:
        where = "cpu" if device.type == "cpu" else f"the CPU or {device}"
        raise ValueError(f"seed is on {seed.device}, expected {where} (the inputs are on {device})")
    return seed


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@triton.jit
def round_to(v, dtype: tl.constexpr, INTERP: tl.constexpr):
    """fp32 tile -> ``dtype`` (fp32 / bf16 / fp16), round to nearest even."""
    if dtype == tl.float32:
        return v
    elif INTERP and dtype == tl.bfloat16:
        # The interpreter truncates fp32 -> bf16; on a GPU the cast is cvt.rn.bf16.f32 (RNE).
        u = v.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = tl.where((u & 0x7FFFFFFF) > 0x7F800000, (u >> 16) | 0x40, r)  # NaN stays (quiet) NaN
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(dtype)


@triton.jit
def to_f32(v, INTERP: tl.constexpr):
    """Exact widening of an fp32 / bf16 / fp16 tile to fp32."""
    if INTERP and v.dtype == tl.bfloat16:
        return (v.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return v.to(tl.float32)


@triton.jit
def convert(v, dtype: tl.constexpr, INTERP: tl.constexpr):
    """v -> dtype: exact widening to fp32, or RNE rounding of fp32 (or no-op for the same dtype)."""
    if v.dtype == dtype:
        return v
    elif dtype == tl.float32:
        return to_f32(v, INTERP)
    else:
        return round_to(to_f32(v, INTERP), dtype, INTERP)


@triton.jit
def mma(a, b, acc, INTERP: tl.constexpr):
    """``acc + a @ b`` (fp32 acc); a and b of one dtype."""
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee")
    elif INTERP:
        return tl.dot(to_f32(a, INTERP), to_f32(b, INTERP), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def mul_rn(a, b, INTERP: tl.constexpr):
    """fp32 ``a * b`` (b a scalar or a tile of a's shape), rounded once and never fused with an add."""
    if INTERP:
        return a * b
    else:
        return tl.inline_asm_elementwise(
            "mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, tl.broadcast_to(b, a.shape)],
            dtype=tl.float32, is_pure=True, pack=1,
        )  # fmt: skip


@triton.jit
def load_w4_tile(
    w_ptr,  # *u8 packed codes of the (rows, K) weight, element e = row * K + col in byte e // 2
    absmax_ptr,  # *fp32 per-block scales, element e uses absmax[e >> log2_bs]
    table_ptr,  # *fp32 [16] code -> value
    rows,  # int32 [R] row indices (masked by rows < n_rows)
    col0,  # first column of the tile, a multiple of COLS
    n_rows,
    K,  # a multiple of the blocksize
    log2_bs,  # log2(blocksize); blocksize >= COLS
    COLS: tl.constexpr,
    dtype: tl.constexpr,
    INTERP: tl.constexpr,
):
    """[R, COLS] tile ``W[rows, col0:col0+COLS]`` of a 4-bit weight, decoded like bitsandbytes:
    ``dtype(fp32(TABLE[code] * absmax))`` (one RNE cast); zero outside the weight.

    Needs K % blocksize == 0 and COLS <= blocksize: each row of the tile then lies in one quantization
    block (one absmax load per row) and starts on a byte boundary (K even); bytes decode in pairs,
    the high nibble first."""
    HALF: tl.constexpr = COLS // 2
    row_ok = rows < n_rows
    row64 = rows.to(tl.int64)
    j = tl.arange(0, HALF)
    mask = row_ok[:, None] & (col0 + 2 * j < K)[None, :]
    b = tl.load(w_ptr + (row64[:, None] * (K // 2) + (col0 // 2 + j)[None, :]), mask=mask, other=0).to(tl.int32)
    scale = tl.load(absmax_ptr + ((row64 * K + col0) >> log2_bs), mask=row_ok, other=0.0)[:, None]
    scale = tl.where(mask, scale, 0.0)  # exact zeros outside the weight
    hi = tl.load(table_ptr + (b >> 4)) * scale
    lo = tl.load(table_ptr + (b & 15)) * scale
    return round_to(tl.interleave(hi, lo), dtype, INTERP)  # element 2j from the high nibble of byte j
