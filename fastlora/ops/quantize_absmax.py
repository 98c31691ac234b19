"""fastlora::quantize_absmax: 8-bit blockwise quantization of the centred 4-bit statistics
(double quant).

Input:   values float32[n] (absmax - mean(absmax)), code float32[256] (sorted dynamic map).
Output:  (uint8[n] code entry of values[i] * (1 / absmax2[block]), absmax2 float32[ceil(n/blocksize)]),
          identical to bitsandbytes' quantize_blockwise (0.50) on the same device. CPU tensors: its CPU
          quantizer, which rounds the value to a uniform 65536-point grid over [-1, 1] and reads the
          entry from a per-code table, so within ~1.5e-5 of a midpoint between two entries it need not
          be the nearest one. CUDA tensors: its CUDA kernel's binary search with fp32 midpoint
          comparisons (ties go towards where the search stopped). The two disagree on ~0.2% of
          realistic statistics (fastlora/reference.py).
Backends: cpp (CPU) and reference (any device; the CUDA search for CUDA tensors).
"""

from __future__ import annotations

import torch

from .. import reference
from ._gpu_reciprocal import gpu_reciprocal
from ._registry import check_tensor, define_native, pick

SCHEMA = "(Tensor values, Tensor code, int blocksize) -> (Tensor, Tensor)"
IMPLEMENTED = ("cpp", "reference")

define_native("quantize_absmax", SCHEMA, reference.quantize_absmax)


@torch.library.register_fake("fastlora::quantize_absmax")
def _fake(values, code, blocksize):
    n = values.numel()
    return (values.new_empty((n,), dtype=torch.uint8), values.new_empty((-(-n // blocksize),), dtype=torch.float32))


@torch.library.custom_op("fastlora::quantize_absmax_reference", mutates_args=())
def _reference_op(values: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    return reference.quantize_absmax(values, code, blocksize, gpu_reciprocal(values.device))


_reference_op.register_fake(_fake)


def quantize_absmax(
    values: torch.Tensor, code: torch.Tensor, blocksize: int = 256, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization of the statistics; see the module docstring."""
    check_tensor(values, "values", (torch.float32,))
    check_tensor(code, "code", (torch.float32,))
    if code.numel() != 256:
        raise ValueError(f"code must have 256 entries, got {code.numel()}")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize <= 0:
        raise ValueError(f"blocksize must be a positive int, got {blocksize!r}")
    op = pick("quantize_absmax", backend, values.device, IMPLEMENTED)
    return op(values.reshape(-1).contiguous(), code.contiguous(), blocksize)
