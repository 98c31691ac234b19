"""``dora_linear``: a DoRA layer (weight-decomposed LoRA, arXiv 2402.09353) on top of :func:`lora_linear`.

PEFT's DoRA output without dropout (``peft.tuners.lora.dora.DoraLinearLayer``) is
``base(x) + (m/‖W + s·BA‖ − 1)·(base(x) − bias) + m/‖W + s·BA‖ · s·B(A(x))``, which is
``bias + m/‖W + s·BA‖ ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ)``: the fused LoRA linear without its bias, scaled per output
feature. The row norm ‖W + s·BA‖ is a constant for autograd (DoRA §4.3, as PEFT does); it is computed
under no_grad from the decoded weight, like PEFT computes it on every forward.

Shapes and dtypes: x (..., K); weight dense (N, K) of x's dtype or 4-bit (see :func:`lora_linear`);
lora_A (r, K), lora_B (N, r) float32 or x's dtype; magnitude (N,) of lora_A's dtype (PEFT's
``lora_magnitude_vector``); bias (N,) of x's dtype or None. Returns (..., N) in x's dtype.

Saved for backward: what :func:`lora_linear` saves (x, S, seed, references to the weight), plus, for the
magnitude's gradient, the LoRA linear's output (tokens × N) and the (N,) scale. Dropout is not part of
this op: PEFT's DoRA recomputes the base product on dropout(x), a different GEMM; callers fall back.
"""

from __future__ import annotations

import torch

from ._registry import check_tensor
from .lora_linear import lora_linear


def dora_weight_norm(weight, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                     dtype: torch.dtype) -> torch.Tensor:
    """‖W + scaling·(B·A)‖₂ per output row, (N,), computed in ``dtype`` without autograd."""
    from .. import nf4

    with torch.no_grad():
        if hasattr(weight, "quant_state") and not isinstance(weight, nf4.QuantizedWeight):
            weight = nf4.from_bnb(weight)
        dense = nf4.dequantize(weight, dtype) if isinstance(weight, nf4.QuantizedWeight) else weight.to(dtype)
        delta = (lora_B.to(dtype) @ lora_A.to(dtype)).mul_(scaling)
        return torch.linalg.norm(dense + delta, dim=1)


def dora_linear(
    x: torch.Tensor,
    weight,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    magnitude: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """DoRA forward ``bias + (magnitude / ‖W + s·BA‖) ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ)`` (see the module docstring).
    Gradients reach x, lora_A, lora_B, magnitude and bias; never the weight."""
    check_tensor(magnitude, "magnitude", (torch.float32, torch.bfloat16, torch.float16, torch.float64), ndim=1)
    if magnitude.dtype != lora_A.dtype:
        raise TypeError(f"magnitude must have lora_A's dtype {lora_A.dtype}, got {magnitude.dtype}")
    if magnitude.shape[0] != lora_B.shape[0]:
        raise ValueError(f"magnitude must have out_features={lora_B.shape[0]} elements (lora_B's rows), "
                         f"got {magnitude.shape[0]}")
    out = lora_linear(x, weight, lora_A, lora_B, scaling, bias=None, rounding="linear", backend=backend)
    norm_dtype = torch.promote_types(x.dtype, lora_A.dtype)
    norm = dora_weight_norm(weight, lora_A.detach(), lora_B.detach(), float(scaling), norm_dtype)
    scale = magnitude / norm.to(magnitude.dtype)
    result = (out * scale).to(x.dtype)
    return result if bias is None else result + bias
