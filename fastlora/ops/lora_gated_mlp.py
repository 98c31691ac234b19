"""``lora_gated_mlp``: a gated MLP block (Llama / Mistral / Qwen / Gemma / Phi-3) whose three LoRA
projections run in one autograd node: ``y = down(act(gate(x)) * up(x))``.

Each of gate / up / down is a PEFT LoRA linear (``x·Wᵀ + bias + scaling · (dropout(x)·Aᵀ)·Bᵀ`` over
a dense or 4-bit frozen weight, PEFT's rounding: see fastlora/reference_lora.py) computed by the
per-backend ops ``fastlora::lora_linear_fwd`` / ``lora_linear_bwd``. The activation and the
product run in x's dtype exactly as the unpatched Hugging Face module runs them (``F.silu`` or
``F.gelu(approximate="tanh")`` on the rounded gate output, product rounded to x's dtype), so the
result matches an unpatched PEFT model in bf16 too.

Shapes (M tokens, K hidden, I intermediate): x (..., K); gate, up: (I, K) projections, or a fused
gate_up (2I, K) projection with ``up=None`` (Phi-3: ``g, u = gate_up(x).chunk(2, dim=-1)``); down
(K_out, I). Returns (..., K_out) in x's dtype.

Saved for backward (``ctx.save_for_backward``): x, S = dropout(input)·Aᵀ of each projection
(M × r), g and u (the gate and up outputs, M × I each, x's dtype; one M × 2I tensor when fused), each
projection's lora_A, lora_B, bias, dropout seed (int64 0-dim tensor) and the weight's own tensors
(references, not copies). NOT saved: act(g), h = act(g)·u (the down projection's input), decoded
weights, dropout masks. Backward recomputes h from g and u, then runs the down projection's
backward, the activation's and product's backward (the same aten kernels autograd would call) and
the gate / up backward; the two contributions to dx are added in x's dtype, as autograd adds them
for the unpatched module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._leading_dims import as_input_grad, as_output, flatten_2d, flatten_grad
from ._registry import FLOAT_DTYPES, check_tensor
from .lora_projection import (
    LoraProjection,
    backward,
    draw_seeds,
    forward,
    prepare,
    seed_objects,
    split_runs,
)

ACTIVATIONS = ("silu", "gelu_tanh")


def _act(name: str, g: torch.Tensor) -> torch.Tensor:
    return F.silu(g) if name == "silu" else F.gelu(g, approximate="tanh")


def _act_backward(name: str, grad: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    # The kernels autograd runs for F.silu / F.gelu outside create_graph: same rounding as PEFT's backward.
    if name == "silu":
        return torch.ops.aten.silu_backward(grad, g)
    return torch.ops.aten.gelu_backward(grad, g, approximate="tanh")


class _LoraGatedMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, spec, *flat):
        activation, preps = spec  # (gate, up, down) or (gate_up, down)
        runs = split_runs(flat, preps)
        x2d = flatten_2d(x)
        if len(preps) == 2:
            gu, s_gu = forward(preps[0], x2d, runs[0])
            g, u = gu.chunk(2, dim=-1)
            kept, upstream_s = [gu], [s_gu]
        else:
            g, s_g = forward(preps[0], x2d, runs[0])
            u, s_u = forward(preps[1], x2d, runs[1])
            kept, upstream_s = [g, u], [s_g, s_u]
        h = (_act(activation, g) * u).contiguous()
        y, s_down = forward(preps[-1], h, runs[-1])
        ctx.save_for_backward(x2d, *upstream_s, s_down, *kept, *flat)
        ctx.spec, ctx.seeds, ctx.x_shape = spec, seed_objects(preps, flat), x.shape
        return as_output(y, x.shape[:-1])

    @staticmethod
    def backward(ctx, grad_y):
        activation, preps = ctx.spec
        grad_y = flatten_grad(grad_y)
        fused = len(preps) == 2
        n_up = 1 if fused else 2
        saved = ctx.saved_tensors
        x2d, upstream_s, s_down = saved[0], saved[1:1 + n_up], saved[1 + n_up]
        kept = saved[2 + n_up:2 + 2 * n_up]
        runs = split_runs(saved[2 + 2 * n_up:], preps, ctx.seeds)
        needs = ctx.needs_input_grad
        need_x = needs[0]
        param_needs, at = [], 2
        for prep in preps:
            param_needs.append(tuple(needs[at:at + 3]))  # lora_A, lora_B, bias
            at += prep.width
        upstream_needed = need_x or any(any(n) for n in param_needs[:-1])

        g, u = kept[0].chunk(2, dim=-1) if fused else kept
        a = _act(activation, g)
        h = (a * u).contiguous()
        dh, *d_down = backward(preps[-1], grad_y, h, s_down, runs[-1], (upstream_needed, *param_needs[-1]))
        del h
        grads_up: list = []
        dx = None
        if upstream_needed:
            dg = _act_backward(activation, dh * u, g)
            du = dh * a
            del a, dh
            grads = [torch.cat([dg, du], dim=-1)] if fused else [dg, du]
            for prep, run, s, grad, pn in zip(preps[:-1], runs[:-1], upstream_s, grads, param_needs[:-1],
                                              strict=True):
                gx, *d = backward(prep, grad, x2d, s, run, (need_x, *pn))
                grads_up.extend(d + [None] * (prep.width - 3))
                if gx is not None:
                    dx = gx if dx is None else dx + gx
        else:
            for prep, run in zip(preps[:-1], runs[:-1], strict=True):
                backward(prep, grad_y, x2d, None, run, (False, False, False, False))  # forgets the seed
                grads_up.extend([None] * prep.width)
        grads_down = list(d_down) + [None] * (preps[-1].width - 3)
        return as_input_grad(dx, ctx.x_shape), None, *grads_up, *grads_down


def lora_gated_mlp(
    x: torch.Tensor,
    gate: LoraProjection,
    up: LoraProjection | None,
    down: LoraProjection,
    *,
    activation: str = "silu",
    training: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """``down(act(gate(x)) * up(x))`` over three PEFT LoRA linears, in one autograd node.

    Args:
      x: (..., hidden), float32 / bfloat16 / float16 (float64 runs the reference backend).
      gate, up, down: :class:`fastlora.ops.LoraProjection` (weight, lora_A, lora_B, scaling, bias,
        dropout_p, rounding), each as ``fastlora.ops.lora_linear`` takes them. gate and up map hidden
        to intermediate; with ``up=None``, gate is a fused gate_up projection (2·intermediate
        outputs: gate first, then up, Phi-3's layout). down maps intermediate to its out_features.
      activation: "silu" (Llama, Mistral, Qwen, Phi-3) or "gelu_tanh" (Gemma's gelu_pytorch_tanh).
      training: LoRA dropout is active only when True.
      backend: "auto", "reference", "cpp", "triton" or "cuda" (see fastlora.backends).

    Returns: (..., down out_features) in x's dtype. Gradients flow to x and to every lora_A,
    lora_B and bias that requires them; weights never get gradients.
    """
    check_tensor(x, "x", (*FLOAT_DTYPES, torch.float64))
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension (..., hidden), got a scalar")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be 'silu' or 'gelu_tanh', got {activation!r}")
    hidden = x.shape[-1]
    if up is None:
        gate_prep, gate_flat = prepare(x, hidden, gate, "gate", training, backend)
        if gate_prep.out_features % 2:
            raise ValueError(f"gate (a fused gate_up projection, up=None) must have an even number of outputs, "
                             f"got {gate_prep.out_features}")
        intermediate = gate_prep.out_features // 2
        preps, flats = [gate_prep], [gate_flat]
    else:
        gate_prep, gate_flat = prepare(x, hidden, gate, "gate", training, backend)
        up_prep, up_flat = prepare(x, hidden, up, "up", training, backend)
        if up_prep.out_features != gate_prep.out_features:
            raise ValueError(f"gate and up must have the same out_features, got {gate_prep.out_features} and "
                             f"{up_prep.out_features}")
        intermediate = gate_prep.out_features
        preps, flats = [gate_prep, up_prep], [gate_flat, up_flat]
    down_prep, down_flat = prepare(x, intermediate, down, "down", training, backend,
                                   input_desc="the intermediate size (gate's out_features)")
    preps.append(down_prep)
    flats.append(down_flat)
    draw_seeds(preps, flats)
    flat = [t for run in flats for t in run]
    return _LoraGatedMLPFunction.apply(x, (activation, tuple(preps)), *flat)
