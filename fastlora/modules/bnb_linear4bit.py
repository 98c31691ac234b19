"""Acceleration of an existing bitsandbytes ``Linear4bit`` used WITHOUT LoRA (the frozen 4-bit base
layers of BitFit / prompt-tuning models, or linears a LoRA does not target).

:func:`accelerate` installs an instance ``forward`` (a bound method in the module's ``__dict__``, so
``copy.deepcopy`` rebinds it to the copy; the class is not modified) that runs
:func:`fastlora.ops.linear_4bit` whenever the call is one bitsandbytes computes plainly:
  - one positional tensor argument, float32 / bfloat16 / float16, non-empty, on the weight's device;
  - no autocast for x's device;
  - ``compute_dtype`` is None or x's dtype (bitsandbytes would cast x and the output otherwise), and
    the bias is None or of x's dtype (bitsandbytes would overwrite ``bias.data`` with a cast);
  - the weight still has its ``quant_state``, in the standard layout (not repacked for bitsandbytes'
    AVX512-BF16 CPU kernel), is frozen, and its shape is (out_features, in_features).
Any other call runs the class's own forward and is counted (:func:`fallback_calls`). Like
bitsandbytes, the first call sets ``compute_dtype`` from x when it was not set (``set_compute_type``).

Numerics: the weight is decoded bit-exactly and multiplied in x's dtype, as bitsandbytes' CPU and
default ``gemm_4bit`` do, so outputs and dx match it bit for bit on the CPU; the bias gradient is
accumulated in fp32 (bitsandbytes sums in the bias dtype). One deliberate difference: in eval mode
without grad, on CPUs with AVX512-BF16, bitsandbytes repacks the weight in place and computes in
bf16; the accelerated forward neither repacks nor rounds x to bf16.
"""

from __future__ import annotations

import torch

from .. import backends
from ..ops.linear_4bit import linear_4bit
from . import _bnb, _instance

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def can_accelerate(module) -> str | None:
    """None when :func:`accelerate` can take ``module``, else the reason it cannot."""
    cls = _bnb.linear4bit_class()
    if cls is None or not isinstance(module, cls):
        return f"{type(module).__name__} is not a bitsandbytes Linear4bit"
    conflict = _instance.conflict_reason(module)
    if conflict is not None:
        return conflict
    weight = module.weight
    state = getattr(weight, "quant_state", None)
    if state is None:
        return "weight has no quant_state (not quantized yet, or lost it in a conversion)"
    if getattr(state, "packing_format_for_cpu", False):
        return ("weight is repacked for bitsandbytes' AVX512-BF16 CPU kernel (quant_state.packing_format_for_cpu; "
                "bitsandbytes does this in eval-mode forwards without grad)")
    if weight.requires_grad:
        return "weight is trainable (fastlora keeps 4-bit weights frozen)"
    shape = tuple(state.shape)
    if shape != (module.out_features, module.in_features):
        return f"quant_state.shape {shape} is not (out_features, in_features) = " \
               f"{(module.out_features, module.in_features)}"
    from .. import nf4

    try:
        nf4.from_bnb(weight)
    except ValueError as exc:
        return f"weight does not fit fastlora's 4-bit format: {exc}"
    return None


def _plain_call(module, x) -> bool:
    if not isinstance(x, torch.Tensor) or x.dtype not in _DTYPES or x.dim() < 1 or x.numel() == 0:
        return False
    if torch.is_autocast_enabled(x.device.type):
        return False
    weight = module.weight
    state = getattr(weight, "quant_state", None)
    if state is None or getattr(state, "packing_format_for_cpu", False) or weight.requires_grad:
        return False
    if tuple(state.shape) != (module.out_features, module.in_features) or x.shape[-1] != module.in_features:
        return False
    if x.device != weight.device:
        return False
    if not module.compute_type_is_set:  # what bitsandbytes' forward does on its first call
        module.set_compute_type(x)
        module.compute_type_is_set = True
    if module.compute_dtype is not None and module.compute_dtype != x.dtype:
        return False
    return module.bias is None or module.bias.dtype == x.dtype


class Bnb4bitState(_instance.InstanceState):
    """Per-layer state: the weight's fastlora view, kept between calls (:class:`._bnb.Params4bitView`)."""

    def __init__(self, backend: str):
        super().__init__(backend)
        self.view = _bnb.Params4bitView()

    def __deepcopy__(self, memo):
        new = super().__deepcopy__(memo)
        new.view = _bnb.Params4bitView()
        return new


def _fast_forward(self, x, *args, **kwargs):
    state = _instance.state_of(self)
    if args or kwargs or not _plain_call(self, x):
        state.fallback_calls += 1
        return type(self).forward(self, x, *args, **kwargs)
    return linear_4bit(x, state.view.get(self.weight), self.bias, backend=state.backend)


def claims(module) -> bool:
    """Whether ``module`` is a bitsandbytes Linear4bit (fastlora.patch offers it only when no LoRA layer wraps it)."""
    cls = _bnb.linear4bit_class()
    return cls is not None and isinstance(module, cls)


skip_reason = can_accelerate


def install(module, backend: str) -> None:
    _instance.install(module, _fast_forward, Bnb4bitState(backend))


def accelerate(module, backend: str = "auto") -> None:
    """Make ``module`` (a bitsandbytes ``Linear4bit``) run :func:`fastlora.ops.linear_4bit` on plain
    calls; see the module docstring. Raises ValueError with :func:`can_accelerate`'s reason."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend != "auto" and backend not in backends.BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {backends.BACKENDS}, got {backend!r}")
    reason = can_accelerate(module)
    if reason is not None:
        raise ValueError(f"cannot accelerate this layer: {reason}")
    install(module, backend)


def is_accelerated(module) -> bool:
    return _instance.state_of(module) is not None


def fallback_calls(module) -> int:
    """How many calls of an accelerated ``module`` ran bitsandbytes' own forward."""
    state = _instance.state_of(module)
    if state is None:
        raise ValueError("module is not accelerated by fastlora")
    return state.fallback_calls


def restore(module) -> bool:
    """Undo :func:`accelerate` (the module's ``__dict__`` is as before); returns whether it was accelerated."""
    accelerated = is_accelerated(module)
    _instance.restore(module)
    return accelerated
