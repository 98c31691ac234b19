"""fastlora::dequantize_4bit: packed 4-bit codes + per-block absmax -> dense weight.

Inputs:  packed  uint8[ceil(numel/2)]  (element i in byte i//2; even i in the high nibble)
         absmax  float32[ceil(numel/blocksize)]  (already resolved if double-quantized)
Output:  dtype[numel], w[i] = round_to_nearest_even(TABLE[code i] * absmax[i // blocksize]),
         bit-exact with bitsandbytes' dequantize_4bit. No autograd: the weight is frozen.
"""

from __future__ import annotations

import torch

from .. import backends, reference
from ._registry import check_float_dtype, check_packed_4bit, check_same_device, define_native, pick

SCHEMA = "(Tensor packed, Tensor absmax, int blocksize, str quant_type, int numel, ScalarType dtype) -> Tensor"

define_native("dequantize_4bit", SCHEMA, reference.dequantize_4bit)


@torch.library.register_fake("fastlora::dequantize_4bit")
def _fake(packed, absmax, blocksize, quant_type, numel, dtype):
    return packed.new_empty((numel,), dtype=dtype)


@torch.library.custom_op("fastlora::dequantize_4bit_reference", mutates_args=())
def _reference_op(
    packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str, numel: int, dtype: torch.dtype
) -> torch.Tensor:
    return reference.dequantize_4bit(packed, absmax, blocksize, quant_type, numel, dtype)


@torch.library.custom_op("fastlora::dequantize_4bit_triton", mutates_args=())
def _triton_op(
    packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str, numel: int, dtype: torch.dtype
) -> torch.Tensor:
    from ..kernels import dequantize_4bit as triton_kernels

    return triton_kernels.dequantize_4bit(packed, absmax, blocksize, quant_type, numel, dtype)


_reference_op.register_fake(_fake)
_triton_op.register_fake(_fake)


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    quant_type: str,
    numel: int,
    dtype: torch.dtype,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Dequantize a flat run of 4-bit codes; see the module docstring for shapes and dtypes.

    ``backend``: "auto", "cpp", "cuda", "triton" or "reference" (see fastlora.backends).
    """
    check_packed_4bit(packed, absmax, blocksize, quant_type, numel)
    check_float_dtype(dtype)
    check_same_device(packed=packed, absmax=absmax)
    op = pick("dequantize_4bit", backend, packed.device, gpu_order=backends.GPU_ORDER_CUDA_FIRST)
    return op(packed.reshape(-1), absmax.reshape(-1), blocksize, quant_type, numel, dtype)
