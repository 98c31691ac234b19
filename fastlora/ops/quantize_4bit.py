"""fastlora::quantize_4bit: float weight -> packed 4-bit codes + per-block absmax.

Input:   weight float32/bfloat16/float16, any shape (flattened row-major).
Output:  (packed uint8[ceil(numel/2)], absmax float32[ceil(numel/blocksize)]), byte-identical to
         bitsandbytes' quantize_4bit on the same device. CPU tensors: its CPU quantizer (scale by
         1/absmax per full block, by division in a trailing partial block, clamp to [-1, 1], nearest
         code with ties to the lower one; an odd element count's last nibble codes a padding zero).
         CUDA tensors: its CUDA kernel's rule (the GPU's approximate reciprocal for every block, FP4's
         sign bit and decimal thresholds; fastlora/reference.py).
Backends: cpp (CPU) and reference (any device; the CUDA rule, with the Triton reciprocal, for CUDA tensors).
"""

from __future__ import annotations

import torch

from .. import reference
from ._gpu_reciprocal import gpu_reciprocal
from ._registry import FLOAT_DTYPES, check_blocksize, check_quant_type, check_tensor, define_native, pick

SCHEMA = "(Tensor weight, int blocksize, str quant_type) -> (Tensor, Tensor)"
IMPLEMENTED = ("cpp", "reference")

define_native("quantize_4bit", SCHEMA, reference.quantize_4bit)


@torch.library.register_fake("fastlora::quantize_4bit")
def _fake(weight, blocksize, quant_type):
    n = weight.numel()
    return (weight.new_empty(((n + 1) // 2,), dtype=torch.uint8),
            weight.new_empty((-(-n // blocksize),), dtype=torch.float32))


@torch.library.custom_op("fastlora::quantize_4bit_reference", mutates_args=())
def _reference_op(weight: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    return reference.quantize_4bit(weight, blocksize, quant_type, gpu_reciprocal(weight.device))


_reference_op.register_fake(_fake)


def quantize_4bit(
    weight: torch.Tensor, blocksize: int, quant_type: str, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a float weight to 4-bit codes; see the module docstring."""
    check_tensor(weight, "weight", FLOAT_DTYPES)
    check_blocksize(blocksize)
    check_quant_type(quant_type)
    op = pick("quantize_4bit", backend, weight.device, IMPLEMENTED)
    return op(weight.contiguous(), blocksize, quant_type)
