"""Running a fused LoRA op under ``torch.autocast`` as the layers it replaces would run.

Under autocast every ``F.linear`` of an unpatched layer (the base layer and PEFT's ``lora_A`` / ``lora_B``)
casts its float32 / bfloat16 / float16 inputs, weights and bias to the autocast dtype and returns that dtype;
float64 tensors are left alone. The fused path does the same once per call: x, a dense base weight, the bias and
lora_A / lora_B are cast to the autocast dtype (casts are differentiable, so float32 adapters get float32
gradients, as under autocast), a 4-bit weight is decoded straight to it, and the op runs with autocast turned off
for x's device so nothing inside it is cast again. A dense float32 base weight is thus cast on every call, which
is what autocast's own ``F.linear`` does for a frozen weight too (its cast cache keeps only leaves that require
grad); the cast copy is saved for backward in both cases.
"""

from __future__ import annotations

import torch

CASTABLE = (torch.float32, torch.bfloat16, torch.float16)


def compute_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast computes a linear layer on ``x`` in, or None when autocast is off for x's device.
    Raises nothing; a float64 x under autocast gives None too (the caller falls back)."""
    device = x.device.type
    if not torch.is_autocast_enabled(device) or x.dtype not in CASTABLE:
        return None
    return torch.get_autocast_dtype(device)


def enabled(x: torch.Tensor) -> bool:
    return torch.is_autocast_enabled(x.device.type)


def cast(t, dtype: torch.dtype):
    """``t`` in ``dtype`` (None and tensors already of it pass through)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def off(x: torch.Tensor):
    """Context that turns autocast off for x's device while the fused op runs."""
    return torch.autocast(x.device.type, enabled=False)


def run(op, x: torch.Tensor, dtype: torch.dtype, *args, **kwargs):
    """``op(x, *args, **kwargs)`` computed in ``dtype`` (the ``dtype`` of a ``call_args`` dict): called plainly
    when x already is ``dtype`` and autocast is off for x's device, else on x cast to ``dtype`` with autocast
    off (the other tensors in ``args`` / ``kwargs`` must come cast to ``dtype`` already)."""
    if x.dtype == dtype and not enabled(x):
        return op(x, *args, **kwargs)
    with off(x):
        return op(x.to(dtype), *args, **kwargs)
