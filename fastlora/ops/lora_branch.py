"""``lora_branch``: the LoRA term alone, ``scaling · (dropout(x)·Aᵀ)·Bᵀ``, with a backward that recomputes.

For layers whose base product runs apart from the LoRA term — a bitsandbytes layer that casts x to its
``compute_dtype`` (e.g. fp32 hidden states after ``prepare_model_for_kbit_training`` into bf16-compute
layers: PEFT computes the base in bf16 and the LoRA term in fp32 on the uncast x). The base then runs on
:func:`fastlora.ops.linear_4bit` (which saves nothing but the weight) and this op adds the LoRA term.

Shapes and dtypes: x (..., K) of lora_A's dtype; lora_A (r, K), lora_B (N, r) of one float dtype.
Returns (..., N) in that dtype, computed like PEFT's ``lora_B(lora_A(dropout(x))) * scaling``.
Saved for backward: x, S = dropout(x)·Aᵀ (M, r), lora_A, lora_B and the dropout seed (an int64 0-dim tensor);
the mask is regenerated from the seed (Philox, :func:`fastlora.ops.lora_dropout`), never stored.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._dropout_seed import call_site_of, consume_seed, draw_seed, no_seed
from ._registry import check_tensor
from .lora_dropout import check_dropout_p, check_training, lora_dropout


def branch_forward(x2d, lora_A, lora_B, seed_t, scaling: float, p: float, backend: str):
    """(y (M, N), S (M, r)) of the LoRA term on x2d (M, K); all of lora_A's dtype."""
    dropped = lora_dropout(x2d, p, seed_t, backend=backend) if p > 0.0 else x2d
    S = F.linear(dropped, lora_A)
    return F.linear(S, lora_B) * scaling, S


def branch_backward(grad, x2d, S, lora_A, lora_B, seed_t, scaling: float, p: float, backend: str,
                    need_dx: bool, need_dA: bool, need_dB: bool):
    """(dx, dA, dB) of :func:`branch_forward`, each None where not needed; the mask comes again from the seed."""
    scaled = grad * scaling
    dS = scaled @ lora_B
    dx = dA = dB = None
    if need_dB:
        dB = scaled.t() @ S
    if need_dA:
        dropped = lora_dropout(x2d, p, seed_t, backend=backend) if p > 0.0 else x2d
        dA = dS.t() @ dropped
    if need_dx:
        dx = dS @ lora_A
        if p > 0.0:
            dx = lora_dropout(dx.contiguous(), p, seed_t, backend=backend)
    return dx, dA, dB


class _LoraBranchFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, lora_A, lora_B, seed_t, call_site, scaling, p, backend):
        y, S = branch_forward(x2d, lora_A, lora_B, seed_t, scaling, p, backend)
        ctx.save_for_backward(x2d, S, lora_A, lora_B, seed_t)
        ctx.scaling, ctx.p, ctx.backend, ctx.call_site = scaling, p, backend, call_site
        ctx.seed_entry = seed_t  # the stashed object itself: backward consumes it by identity
        return y

    @staticmethod
    def backward(ctx, grad):
        x2d, S, lora_A, lora_B, seed_t = ctx.saved_tensors
        dx, dA, dB = branch_backward(grad, x2d, S, lora_A, lora_B, seed_t, ctx.scaling, ctx.p, ctx.backend,
                                     *ctx.needs_input_grad[:3])
        if ctx.p > 0.0:
            consume_seed(ctx.call_site, ctx.seed_entry)
        return dx, dA, dB, None, None, None, None, None


def lora_branch(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, *,
                dropout_p: float = 0.0, training: bool = True, backend: str = "auto") -> torch.Tensor:
    """``scaling · (dropout(x)·Aᵀ)·Bᵀ`` (see the module docstring); dropout only when ``training``."""
    check_tensor(lora_A, "lora_A", (torch.float32, torch.bfloat16, torch.float16, torch.float64), ndim=2)
    check_tensor(lora_B, "lora_B", (lora_A.dtype,), ndim=2)
    check_tensor(x, "x", (lora_A.dtype,))
    if x.dim() < 1 or x.shape[-1] != lora_A.shape[1]:
        raise ValueError(f"x must be (..., in_features={lora_A.shape[1]}), got shape {tuple(x.shape)}")
    if lora_B.shape[1] != lora_A.shape[0]:
        raise ValueError(f"lora_B must be (out_features, r={lora_A.shape[0]}), got {tuple(lora_B.shape)}")
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        raise ValueError(f"scaling must be a finite float, got {scaling!r}")
    check_dropout_p(dropout_p)
    check_training(training)
    p = float(dropout_p) if training else 0.0
    call_site = call_site_of(lora_A)
    seed_t = draw_seed(call_site, x.device) if p > 0.0 else no_seed(x.device)
    x2d = x.reshape(-1, x.shape[-1]).contiguous()
    y = _LoraBranchFunction.apply(x2d, lora_A, lora_B, seed_t, call_site, float(scaling), p, backend)
    return y.reshape(*x.shape[:-1], lora_B.shape[0])
