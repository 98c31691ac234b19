"""fastlora::dequantize_4bit_into: fastlora::dequantize_4bit written into a caller-owned buffer.

Inputs as dequantize_4bit; ``out`` is a contiguous tensor of ``numel`` elements in float32 /
bfloat16 / float16 (its dtype is the output dtype), overwritten in place. Reusing one workspace per
layer avoids the page faults of a fresh allocation, which on the CPU cost more than the decode.
Backends: cpp (CPU), cuda, triton and reference (any device).
"""

from __future__ import annotations

import torch

from .. import backends, reference
from ._registry import FLOAT_DTYPES, check_packed_4bit, check_same_device, check_tensor, define_native, pick

SCHEMA = "(Tensor packed, Tensor absmax, int blocksize, str quant_type, Tensor(a!) out) -> ()"
IMPLEMENTED = ("cpp", "cuda", "triton", "reference")


def _reference_into(packed, absmax, blocksize, quant_type, out):
    out.copy_(reference.dequantize_4bit(packed, absmax, blocksize, quant_type, out.numel(), out.dtype).view_as(out))


define_native("dequantize_4bit_into", SCHEMA, _reference_into)


@torch.library.register_fake("fastlora::dequantize_4bit_into")
def _fake(packed, absmax, blocksize, quant_type, out):
    return None


@torch.library.custom_op("fastlora::dequantize_4bit_into_reference", mutates_args=("out",))
def _reference_op(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str,
                  out: torch.Tensor) -> None:
    _reference_into(packed, absmax, blocksize, quant_type, out)


@torch.library.custom_op("fastlora::dequantize_4bit_into_triton", mutates_args=("out",))
def _triton_op(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str,
               out: torch.Tensor) -> None:
    from ..kernels import dequantize_4bit as triton_kernels

    triton_kernels.dequantize_4bit(packed, absmax, blocksize, quant_type, out.numel(), out.dtype, out=out.view(-1))


_reference_op.register_fake(_fake)
_triton_op.register_fake(_fake)


def dequantize_4bit_into(
    packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str, out: torch.Tensor,
    *, backend: str = "auto",
) -> torch.Tensor:
    """Dequantize into ``out`` (contiguous, numel elements, float dtype); returns ``out``."""
    check_tensor(out, "out", FLOAT_DTYPES)
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    check_packed_4bit(packed, absmax, blocksize, quant_type, out.numel(), numel_from="out")
    check_same_device(packed=packed, absmax=absmax, out=out)
    op = pick("dequantize_4bit_into", backend, packed.device, IMPLEMENTED, backends.GPU_ORDER_CUDA_FIRST)
    op(packed.reshape(-1), absmax.reshape(-1), blocksize, quant_type, out)
    return out
