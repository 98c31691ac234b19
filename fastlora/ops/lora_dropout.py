"""fastlora::lora_dropout: the LoRA dropout mask applied to a tensor, regenerated from a seed.

Input:   x      any shape, float32 / bfloat16 / float16 (float64 on the reference backend)
         p      drop probability in [0, 1)
         seed   int64 tensor, one element, value in [0, 2^63), on x's device (or the CPU)
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

SCHEMA = "(Tensor x, float p, Tensor seed) -> Tensor"
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

define_native("lora_dropout", SCHEMA, reference_lora.lora_dropout)


@torch.library.register_fake("fastlora::lora_dropout")
def _fake(x, p, seed):
    return torch.empty_like(x)


@torch.library.custom_op("fastlora::lora_dropout_reference", mutates_args=())
def _reference_op(x: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    return reference_lora.lora_dropout(x, p, seed)


@torch.library.custom_op("fastlora::lora_dropout_triton", mutates_args=())
def _triton_op(x: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    from ..kernels import lora_dropout as triton_kernels

    return triton_kernels.lora_dropout(x, p, seed)


_reference_op.register_fake(_fake)
_triton_op.register_fake(_fake)


def _setup_context(ctx, inputs, output):
    ctx.p = inputs[1]
    ctx.save_for_backward(inputs[2])


def _make_backward(op_name: str):
    def backward(ctx, grad):
        (seed,) = ctx.saved_tensors
        return getattr(torch.ops.fastlora, op_name)(grad.contiguous(), ctx.p, seed), None, None

    return backward


for _name in ("lora_dropout", "lora_dropout_reference", "lora_dropout_triton"):
    torch.library.register_autograd(f"fastlora::{_name}", _make_backward(_name), setup_context=_setup_context)


def check_training(training) -> None:
    # A truthy non-bool ("yes", a tensor) would silently decide whether dropout runs.
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")


def check_dropout_p(p) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"dropout_p must be a float, got {type(p).__name__}")
    if not (0.0 <= p < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {p}")


def seed_tensor(seed, device: torch.device) -> torch.Tensor:
    """``seed`` as the ops take it: an int in [0, 2^63) becomes an int64 0-dim tensor on ``device``; a
    tensor must be int64 with one element, on ``device`` or the CPU (its value is checked only on the
    CPU: reading a GPU seed on the host would synchronize)."""
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64:
            raise TypeError(f"seed must be an int or an int64 tensor with one element, got dtype {seed.dtype}")
        if seed.numel() != 1:
            raise ValueError(f"seed must have one element, got shape {tuple(seed.shape)}")
        if seed.device.type != "cpu" and seed.device != device:
            raise ValueError(f"seed must be on the CPU or on the input's device {device}, got {seed.device}")
        if seed.device.type == "cpu" and not torch.compiler.is_compiling() and int(seed) < 0:
            raise ValueError(f"seed must be in [0, 2**63), got {int(seed)}")
        return seed.reshape(())
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or an int64 tensor with one element, got {type(seed).__name__}")
    if not (0 <= seed < 2**63):
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return torch.tensor(seed, dtype=torch.int64, device=device)


def lora_dropout(x: torch.Tensor, p: float, seed, *, backend: str = "auto") -> torch.Tensor:
    """Apply the LoRA dropout mask of ``seed`` (an int or a one-element int64 tensor, see
    :func:`seed_tensor`) to ``x``; see the module docstring."""
    check_tensor(x, "x", DTYPES)
    check_dropout_p(p)
    seed = seed_tensor(seed, x.device)
    check_same_device(x=x)
    implemented = ("reference",) if x.dtype == torch.float64 else ("reference", "cpp", "triton")
    op = pick("lora_dropout", backend, x.device, implemented)
    return op(x.contiguous(), float(p), seed)
