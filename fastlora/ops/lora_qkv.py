"""``lora_qkv``: several LoRA projections of the same input (attention's q / k / v, or any siblings)
in one autograd node that saves x once.

Each projection is the math of ``fastlora.ops.lora_linear`` (PEFT's rounding) on the per-backend ops
``fastlora::lora_linear_fwd`` / ``lora_linear_bwd``. A checkpoint with an already-fused projection
(Phi-3's qkv_proj) is one projection: split its output as the model does.

Shapes: x (..., K); projection i maps K to N_i. Returns a tuple of (..., N_i) tensors in x's dtype.
Saved for backward (``ctx.save_for_backward``): x once, S = dropout(x)·Aᵀ of each projection
(M × r_i), each projection's lora_A, lora_B, bias, dropout seed (int64 0-dim tensor) and weight tensors
(references). Not saved: the outputs, decoded weights, dropout masks. Backward adds the projections'
contributions to dx in x's dtype, in order, as autograd adds them for separate PEFT layers;
an output that gets no gradient costs no backward work.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._registry import FLOAT_DTYPES, check_tensor
from .lora_projection import (
    LoraProjection,
    backward,
    draw_seeds,
    flatten_2d,
    forward,
    prepare,
    seed_objects,
    split_runs,
)


class _LoraQKVFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, preps, *flat):
        ys, ss = [], []
        for prep, run in zip(preps, split_runs(flat, preps), strict=True):
            y, s = forward(prep, x2d, run)
            ys.append(y)
            ss.append(s)
        ctx.save_for_backward(x2d, *ss, *flat)
        ctx.preps, ctx.seeds = preps, seed_objects(preps, flat)
        ctx.set_materialize_grads(False)
        return tuple(ys)

    @staticmethod
    def backward(ctx, *grad_ys):
        preps = ctx.preps
        saved = ctx.saved_tensors
        x2d, ss, flat = saved[0], saved[1:1 + len(preps)], saved[1 + len(preps):]
        needs = ctx.needs_input_grad
        dx, grads, at = None, [], 0
        for prep, s, grad_y, run in zip(preps, ss, grad_ys, split_runs(flat, preps, ctx.seeds), strict=True):
            pn = tuple(needs[2 + at:2 + at + 3])  # lora_A, lora_B, bias
            at += prep.width
            if grad_y is None:  # this output is unused: nothing flows back, but its seed is done with
                backward(prep, None, x2d, s, run, (False, False, False, False))
                grads.extend([None] * prep.width)
                continue
            gx, *d = backward(prep, grad_y, x2d, s, run, (needs[0], *pn))
            grads.extend(d + [None] * (prep.width - 3))
            if gx is not None:
                dx = gx if dx is None else dx + gx
        if needs[0] and dx is None:
            dx = torch.zeros_like(x2d)
        return dx, None, *grads


def lora_qkv(
    x: torch.Tensor,
    projections: Sequence[LoraProjection],
    *,
    training: bool = True,
    backend: str = "auto",
) -> tuple[torch.Tensor, ...]:
    """``tuple(proj(x) for proj in projections)``, each a PEFT LoRA linear, in one autograd node.

    Args:
      x: (..., in_features), float32 / bfloat16 / float16 (float64 runs the reference backend).
      projections: one or more :class:`fastlora.ops.LoraProjection` reading x (e.g. q, k, v), each as
        ``fastlora.ops.lora_linear`` takes them (its own weight kind, rank, scaling, bias, dropout).
      training: LoRA dropout is active only when True.
      backend: "auto", "reference", "cpp", "triton" or "cuda" (see fastlora.backends).

    Returns: a tuple with one (..., out_features_i) tensor of x's dtype per projection.
    """
    check_tensor(x, "x", (*FLOAT_DTYPES, torch.float64))
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension (..., in_features), got a scalar")
    if isinstance(projections, (LoraProjection, str)) or not isinstance(projections, Sequence) or not projections:
        raise TypeError("projections must be a non-empty sequence of fastlora.ops.LoraProjection")
    preps, flats = [], []
    for i, proj in enumerate(projections):
        prep, run = prepare(x, x.shape[-1], proj, f"projections[{i}]", training, backend)
        preps.append(prep)
        flats.append(run)
    draw_seeds(preps, flats)
    lead = x.shape[:-1]
    ys = _LoraQKVFunction.apply(flatten_2d(x), tuple(preps), *[t for run in flats for t in run])
    return tuple(y.reshape(*lead, prep.out_features) for y, prep in zip(ys, preps, strict=True))
