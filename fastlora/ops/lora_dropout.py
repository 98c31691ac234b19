"""fastlora::lora_dropout: the LoRA dropout mask applied to a tensor, regenerated from a seed.

Input:   x      any shape, float32 / bfloat16 / float16 (float64 on the reference backend)
         p      drop probability in [0, 1);  seed  int in [0, 2^63)
Output:  x's shape and dtype: round(x * scale) where Philox keeps the element, else 0
         (rule and constants: csrc/include/fastlora/philox.h; element order is row-major).
This is the mask that fastlora::lora_linear_fwd / _bwd apply inside their kernels; the op exists so
that tests and users can see it (e.g. to feed the same mask to PEFT). Differentiable: dropout is
linear, so its backward applies the same mask (and scale) to the incoming gradient.
"""

from __future__ import annotations

import torch

from .. import reference_lora
from ._registry import check_same_device, check_tensor, define_native, pick

SCHEMA = "(Tensor x, float p, int seed) -> Tensor"
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

define_native("lora_dropout", SCHEMA, reference_lora.lora_dropout)


@torch.library.register_fake("fastlora::lora_dropout")
def _fake(x, p, seed):
    return torch.empty_like(x)


@torch.library.custom_op("fastlora::lora_dropout_reference", mutates_args=())
def _reference_op(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    return reference_lora.lora_dropout(x, p, seed)


@torch.library.custom_op("fastlora::lora_dropout_triton", mutates_args=())
def _triton_op(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    from ..kernels import lora_dropout as triton_kernels

    return triton_kernels.lora_dropout(x, p, seed)


_reference_op.register_fake(_fake)
_triton_op.register_fake(_fake)


def _setup_context(ctx, inputs, output):
    ctx.p, ctx.seed = inputs[1], inputs[2]


def _make_backward(op_name: str):
    def backward(ctx, grad):
        return getattr(torch.ops.fastlora, op_name)(grad.contiguous(), ctx.p, ctx.seed), None, None

    return backward


for _name in ("lora_dropout", "lora_dropout_reference", "lora_dropout_triton"):
    torch.library.register_autograd(f"fastlora::{_name}", _make_backward(_name), setup_context=_setup_context)


def check_dropout_p(p) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"dropout_p must be a float, got {type(p).__name__}")
    if not (0.0 <= p < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {p}")


def check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not (0 <= seed < 2**63):
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")


def lora_dropout(x: torch.Tensor, p: float, seed: int, *, backend: str = "auto") -> torch.Tensor:
    """Apply the LoRA dropout mask of ``seed`` to ``x``; see the module docstring."""
    check_tensor(x, "x", DTYPES)
    check_dropout_p(p)
    check_seed(seed)
    check_same_device(x=x)
    implemented = ("reference",) if x.dtype == torch.float64 else ("reference", "cpp", "triton")
    op = pick("lora_dropout", backend, x.device, implemented)
    return op(x.contiguous(), float(p), seed)
