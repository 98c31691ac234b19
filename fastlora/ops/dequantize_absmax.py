"""fastlora::dequantize_absmax: the double-quantized (nested) statistics -> fp32 absmax.

Inputs:  qabsmax uint8[n], code float32[256] (dynamic map), absmax2 float32[ceil(n/blocksize)],
         offset float32 scalar (the mean subtracted before quantizing; may live on the CPU).
Output:  float32[n] = fp32(fp32(code[q] * absmax2[i // blocksize]) + offset): two roundings, never
         a fused multiply-add, so it is bit-exact with bitsandbytes.
"""

from __future__ import annotations

import torch

from .. import backends, reference
from ._registry import check_same_device, check_tensor, define_native, pick

SCHEMA = "(Tensor qabsmax, Tensor code, Tensor absmax2, Tensor offset, int blocksize) -> Tensor"

define_native("dequantize_absmax", SCHEMA, reference.dequantize_absmax)


@torch.library.register_fake("fastlora::dequantize_absmax")
def _fake(qabsmax, code, absmax2, offset, blocksize):
    return qabsmax.new_empty((qabsmax.numel(),), dtype=torch.float32)


@torch.library.custom_op("fastlora::dequantize_absmax_reference", mutates_args=())
def _reference_op(
    qabsmax: torch.Tensor, code: torch.Tensor, absmax2: torch.Tensor, offset: torch.Tensor, blocksize: int
) -> torch.Tensor:
    return reference.dequantize_absmax(qabsmax, code, absmax2, offset, blocksize)


@torch.library.custom_op("fastlora::dequantize_absmax_triton", mutates_args=())
def _triton_op(
    qabsmax: torch.Tensor, code: torch.Tensor, absmax2: torch.Tensor, offset: torch.Tensor, blocksize: int
) -> torch.Tensor:
    from ..kernels import dequantize_4bit as triton_kernels

    return triton_kernels.dequantize_absmax(qabsmax, code, absmax2, offset, blocksize)


_reference_op.register_fake(_fake)
_triton_op.register_fake(_fake)


def dequantize_absmax(
    qabsmax: torch.Tensor,
    code: torch.Tensor,
    absmax2: torch.Tensor,
    offset: torch.Tensor,
    blocksize: int,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Resolve nested statistics to float32 absmax; see the module docstring."""
    check_tensor(qabsmax, "qabsmax", (torch.uint8,))
    check_tensor(code, "code", (torch.float32,))
    check_tensor(absmax2, "absmax2", (torch.float32,))
    check_tensor(offset, "offset", (torch.float32,))
    if code.numel() != 256:
        raise ValueError(f"code must have 256 entries, got {code.numel()}")
    if offset.numel() != 1:
        raise ValueError(f"offset must be a single value, got shape {tuple(offset.shape)}")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize <= 0:
        raise ValueError(f"blocksize (nested) must be a positive int, got {blocksize!r}")
    blocks = -(-qabsmax.numel() // blocksize)
    if absmax2.numel() != blocks:
        raise ValueError(f"absmax2 must hold ceil(len(qabsmax)/blocksize) = {blocks} values, got {absmax2.numel()}")
    check_same_device(qabsmax=qabsmax, code=code, absmax2=absmax2)
    op = pick("dequantize_absmax", backend, qabsmax.device, gpu_order=backends.GPU_ORDER_CUDA_FIRST)
    return op(qabsmax.reshape(-1), code.reshape(-1), absmax2.reshape(-1), offset.reshape(()), blocksize)
