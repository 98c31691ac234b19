"""Triton kernel of ``fastlora::lora_dropout_triton``: the LoRA dropout mask applied to a tensor.

Bitwise identical to ``fastlora.reference_lora.lora_dropout`` (and the C++ / CUDA kernels): element i
(row-major) is kept iff ``(word >> 8) >= ceil(p * 2^24)`` with word ``i & 3`` of the Philox4x32-10
block ``i >> 2`` (stream 0, key = the seed); a kept element becomes ``dtype(fp32(x) * scale)`` with
``scale = (float)(1 / (1 - p))`` computed on the host, a dropped one +0. p = 0 returns a copy.

One Philox evaluation serves four consecutive elements (programs start at multiples of 4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import CompileSpec
from ._common import check_device, check_seed, is_interpreted, round_to, to_f32
from .philox import dropout_constants, keep_groups, load_key

__all__ = ["DROPOUT_CONFIG", "DropoutConfig", "compile_specs", "dropout_keep_mask", "lora_dropout"]

_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


# The seed is read through a pointer at run time (CUDA-graph replays see its current value); its
# alignment is irrelevant to an 8-byte scalar load, so it does not split the kernel cache either.
@triton.jit(do_not_specialize=["threshold"], do_not_specialize_on_alignment=["seed_ptr"])
def _lora_dropout_kernel(
    x_ptr,  # *fp32 | *bf16 | *fp16 [numel]
    out_ptr,  # same dtype [numel]
    numel,
    seed_ptr,  # *i64 [1]: the seed, Philox key (lo32, hi32)
    threshold,  # i32: ceil(p * 2^24)
    scale,  # fp32: (float)(1 / (1 - p))
    BLOCK: tl.constexpr,
    INTERP: tl.constexpr,
):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    x_ptr += start
    out_ptr += start
    offs = tl.arange(0, BLOCK)
    mask = offs < numel - start
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    k0, k1 = load_key(seed_ptr)
    n = (start >> 2) + tl.arange(0, BLOCK // 4).to(tl.int64)
    keep = tl.reshape(keep_groups(n[None, :], k0, k1, threshold, 1, BLOCK), (BLOCK,))
    v = round_to(to_f32(x, INTERP) * scale, out_ptr.dtype.element_ty, INTERP)
    tl.store(out_ptr + offs, tl.where(keep, v, 0.0), mask=mask)


@triton.jit(do_not_specialize=["threshold"], do_not_specialize_on_alignment=["seed_ptr"])
def _keep_mask_kernel(
    out_ptr,  # *u8 [numel] out: 1 where kept
    numel, seed_ptr, threshold,  # as in _lora_dropout_kernel
    BLOCK: tl.constexpr,
):  # fmt: skip
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = tl.arange(0, BLOCK)
    k0, k1 = load_key(seed_ptr)
    n = (start >> 2) + tl.arange(0, BLOCK // 4).to(tl.int64)
    keep = tl.reshape(keep_groups(n[None, :], k0, k1, threshold, 1, BLOCK), (BLOCK,))
    tl.store(out_ptr + start + offs, keep.to(tl.uint8), mask=offs < numel - start)


@dataclass(frozen=True)
class DropoutConfig:
    block: int
    num_warps: int


# 8 elements (two Philox evaluations) per thread.
DROPOUT_CONFIG = DropoutConfig(block=1024, num_warps=4)
# One multiplication per element (x * scale): no contraction, whatever Triton's default (3.10 changes it).
_OPTIONS = {"enable_fp_fusion": False}


def compile_specs() -> list[CompileSpec]:
    return [
        CompileSpec(
            kernel="lora_dropout",
            config=f"{name} B{DROPOUT_CONFIG.block} w{DROPOUT_CONFIG.num_warps}",
            fn=_lora_dropout_kernel,
            signature={
                "x_ptr": f"*{name}", "out_ptr": f"*{name}", "numel": "i32", "seed_ptr": "*i64", "threshold": "i32",
                "scale": "fp32", "BLOCK": "constexpr", "INTERP": "constexpr",
            },  # fmt: skip
            constexprs={"BLOCK": DROPOUT_CONFIG.block, "INTERP": False},
            aligned=("x_ptr", "out_ptr", "numel"),
            num_warps=DROPOUT_CONFIG.num_warps,
            options=_OPTIONS,
        )
        for name in _DTYPES.values()
    ] + [
        CompileSpec(
            kernel="lora_keep_mask",
            config=f"B{DROPOUT_CONFIG.block} w{DROPOUT_CONFIG.num_warps}",
            fn=_keep_mask_kernel,
            signature={"out_ptr": "*u8", "numel": "i32", "seed_ptr": "*i64", "threshold": "i32", "BLOCK": "constexpr"},
            constexprs={"BLOCK": DROPOUT_CONFIG.block},
            aligned=("out_ptr", "numel"),
            num_warps=DROPOUT_CONFIG.num_warps,
            options=_OPTIONS,
        )
    ]


def lora_dropout(x: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    """LoRA dropout of ``x`` (any shape; float32 / bfloat16 / float16) with probability ``p`` in
    [0, 1); ``seed``: int64 tensor with one element, value in [0, 2^63), on x's device or the CPU
    (see :func:`check_seed`; the kernel reads it at run time). See the module docstring. Returns a
    new tensor."""
    if x.dtype not in _DTYPES:
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    p = float(p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"p must be in [0, 1), got {p}")
    seed = check_seed(seed, x.device)
    if p == 0.0:
        return x.clone()
    fn = _lora_dropout_kernel
    check_device(fn, x.device, x=x)
    src = x.contiguous()
    out = torch.empty_like(src)
    numel = src.numel()
    if numel == 0:
        return out
    threshold, scale = dropout_constants(p)
    grid = (triton.cdiv(numel, DROPOUT_CONFIG.block),)
    fn[grid](
        src, out, numel, seed, threshold, scale,
        BLOCK=DROPOUT_CONFIG.block, INTERP=is_interpreted(fn), num_warps=DROPOUT_CONFIG.num_warps, **_OPTIONS,
    )  # fmt: skip
    return out


def dropout_keep_mask(numel: int, p: float, seed: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8[numel] on ``device``: 1 where LoRA dropout with probability ``p`` in (0, 1) keeps element i
    (row-major); ``seed`` as in :func:`lora_dropout` (on ``device`` or the CPU).

    Used by the LoRA GEMM kernels for tensors whose rows do not start at a multiple of 4 elements,
    where they cannot evaluate Philox once per four elements in a tile; generated per call, never kept."""
    fn = _keep_mask_kernel
    device = torch.device(device)
    check_device(fn, device)
    seed = check_seed(seed, device)
    out = torch.empty(numel, dtype=torch.uint8, device=device)
    if numel == 0:
        return out
    threshold, _ = dropout_constants(p)
    fn[(triton.cdiv(numel, DROPOUT_CONFIG.block),)](
        out, numel, seed, threshold, BLOCK=DROPOUT_CONFIG.block, num_warps=DROPOUT_CONFIG.num_warps, **_OPTIONS
    )
    return out
