"""The fused-op arguments of sibling LoRA projections called on one input, for the modules that run several
projections as one op (:mod:`fastlora.modules.gated_mlp`, :mod:`fastlora.modules.grouped_qkv`)."""

from __future__ import annotations

import torch

from ..ops.lora_projection import LoraProjection
from . import lora, peft_lora


def _projection_reason(child) -> str | None:
    if lora.has_lora(child):
        return None
    if not peft_lora.claims(child):
        return "is not a LoRA layer"
    reason = peft_lora.skip_reason(child)
    if reason is None and peft_lora.is_dora(child):
        return "is a DoRA layer (DoRA projections run one by one)"
    return reason


def skip_reason(module, names) -> str | None:
    """Why the children ``names`` of ``module`` (None entries skipped) cannot run as one fused op: the first
    child that is not a LoRA layer fastlora accelerates on its own, or is DoRA, named; else None."""
    for name in names:
        if name is None:
            continue
        reason = _projection_reason(getattr(module, name))
        if reason is not None:
            return f"{name} {reason}" if reason.startswith("is ") else f"{name}: {reason}"
    return None


def call_args(child, x: torch.Tensor) -> dict | None:
    """What the fused op needs for one call of the LoRA projection ``child`` on ``x`` (the keys of
    :func:`fastlora.modules.peft_lora.call_args`, plus compute_dtype for a bitsandbytes base computing in
    another dtype), or None when that call would not be fused on its own."""
    if lora.has_lora(child):
        return lora.call_args(child, x)
    args = peft_lora.call_args(child, x)
    if args is None:  # a bitsandbytes base computing in another dtype than x's
        args = peft_lora.compute_dtype_args(child, x)
        if args is not None and args["lora_A"].dtype != x.dtype:
            return None  # PEFT casts x to the adapters' dtype there: left to the projection's own call
    return args


def projections(children, x: torch.Tensor):
    """(training, dtype the op runs in, one LoraProjection per child — None where the child is None) when every
    child's call is fused on its own, none is DoRA and they agree on training mode and dtype; else None."""
    calls = []
    for child in children:
        if child is None:
            calls.append(None)
            continue
        args = call_args(child, x)
        if args is None or args["dora"] is not None:
            return None
        calls.append(args)
    present = [c for c in calls if c is not None]
    if len({c["training"] for c in present}) != 1 or len({c.get("dtype", x.dtype) for c in present}) != 1:
        return None
    projs = tuple(None if c is None else LoraProjection(c["weight"], c["lora_A"], c["lora_B"], c["scaling"], c["bias"],
                                                       c["dropout_p"], c["rounding"], c.get("compute_dtype"))
                  for c in calls)
    return present[0]["training"], present[0].get("dtype", x.dtype), projs
