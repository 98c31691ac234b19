"""``frozen_linear``: ``y = x·Wᵀ + b`` for a frozen bf16 dense weight on the CPU, computed in fp32 tiles.

Why: on CPUs without native bf16 GEMMs (no AVX512-BF16 / AMX, or torch's oneDNN off) torch runs bf16 matrix
products on a portable path at ~0.15 GFLOP/s against ~65 for fp32, so in a bf16 training step the frozen layers
fastlora has no LoRA to fuse into — a model's lm_head above all — take most of the time. Here the weight is
widened to fp32 a block of rows at a time (at most ``backends.cpu_tile_bytes()`` of fp32, 8 MiB unless
FASTLORA_CPU_TILE_BYTES says otherwise, as in the C++ kernels: no fp32 copy of a large weight is ever whole),
and x once:

    y    = rnd_bf16(x32 · W32[rows]ᵀ + b32[rows])        per block of rows of W = columns of y
    dx   = rnd_bf16(Σ_blocks g32[:, rows] · W32[rows])    accumulated in fp32 over the blocks, rounded once
    dbias = rnd_b(Σ_tokens g32)                           only when the bias requires grad

which is what torch's bf16 linear computes (fp32 accumulation, one rounding per output) up to the order of the
fp32 sums. The weight must be frozen: it gets no gradient here, and a trainable one is refused. Saved for
backward: the weight and bias (the caller's own tensors, no copies); x is not needed.

Shapes and dtypes: x (..., K) bfloat16 on the CPU; weight (N, K) bfloat16; bias (N,) bfloat16 or None.
Returns (..., N) bfloat16.
"""

from __future__ import annotations

import torch

from .. import backends
from ._registry import check_tensor


def torch_bf16_gemms_slow() -> bool:
    """Whether torch's own bf16 GEMMs on this CPU take the slow path (fastlora computes them in fp32 then):
    fastlora's bf16 GEMM mode is off (no native bf16, or FASTLORA_CPU_BF16_GEMM=0), or torch's oneDNN is off."""
    return not (backends.cpu_bf16_gemms() and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


def _rows_per_block(n: int, k: int) -> int:
    return max(1, min(n, backends.cpu_tile_bytes() // (4 * max(k, 1))))


class _FrozenLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, weight, bias):
        n, k = weight.shape
        x32 = x2d.float()
        y = x2d.new_empty((x2d.shape[0], n))
        step = _rows_per_block(n, k)
        for r0 in range(0, n, step):
            block = weight[r0:r0 + step].float()
            out = x32 @ block.T
            if bias is not None:
                out += bias[r0:r0 + step].float()
            y[:, r0:r0 + step] = out  # the one rounding to bf16
        ctx.save_for_backward(weight, bias)
        return y

    @staticmethod
    def backward(ctx, grad):
        weight, bias = ctx.saved_tensors
        n, k = weight.shape
        grad_x = grad_bias = None
        g32 = grad.float()
        if ctx.needs_input_grad[0]:
            acc = g32.new_zeros((grad.shape[0], k))
            step = _rows_per_block(n, k)
            for r0 in range(0, n, step):
                acc.addmm_(g32[:, r0:r0 + step], weight[r0:r0 + step].float())
            grad_x = acc.to(grad.dtype)
        if bias is not None and ctx.needs_input_grad[2]:
            grad_bias = g32.sum(0).to(bias.dtype)
        return grad_x, None, grad_bias


def frozen_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x·Wᵀ + b`` in bf16 with fp32 GEMMs over blocks of W's rows (see the module docstring).

    Args:
      x: (..., K) bfloat16 CPU tensor.
      weight: (N, K) bfloat16, frozen (requires_grad False).
      bias: (N,) bfloat16 or None; may require grad.

    Returns: (..., N) bfloat16."""
    check_tensor(x, "x", (torch.bfloat16,))
    check_tensor(weight, "weight", (torch.bfloat16,), ndim=2)
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x must be (..., in_features={weight.shape[1]}), got shape {tuple(x.shape)}")
    if weight.requires_grad:
        raise ValueError("weight requires grad: frozen_linear computes no weight gradient (it is for frozen layers)")
    if bias is not None:
        check_tensor(bias, "bias", (torch.bfloat16,), ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must be (out_features={weight.shape[0]},), got shape {tuple(bias.shape)}")
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and t.device.type != "cpu":
            raise ValueError(f"{name} must be on the CPU (frozen_linear is the CPU's fp32 path), got {t.device}")
    x2d = x.reshape(-1, x.shape[-1])
    y = _FrozenLinearFunction.apply(x2d, weight, bias)
    return y.reshape(*x.shape[:-1], weight.shape[0])
