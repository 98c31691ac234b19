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

import types

import torch

from .. import backends
from ..ops.linear_4bit import linear_4bit

_STATE_ATTR = "_fastlora_linear4bit_state"
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class _State:
    """Per-module data of an accelerated layer; lives in the module's ``__dict__`` (not a buffer)."""

    def __init__(self, backend: str, installed_extra_repr: bool):
        self.backend, self.installed_extra_repr = backend, installed_extra_repr
        self.fallback_calls = 0


def _linear4bit_class():
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    return bnb.nn.Linear4bit


def can_accelerate(module) -> str | None:
    """None when :func:`accelerate` can take ``module``, else the reason it cannot."""
    cls = _linear4bit_class()
    if cls is None:
        return "bitsandbytes is not installed"
    if not isinstance(module, cls):
        return f"{type(module).__name__} is not a bitsandbytes Linear4bit"
    if _STATE_ATTR in module.__dict__:
        return "already accelerated by fastlora"
    if "forward" in module.__dict__:
        return "forward already overridden on the instance (e.g. an accelerate hook)"
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


def _fast_forward(self, x, *args, **kwargs):
    state = self.__dict__[_STATE_ATTR]
    if args or kwargs or not _plain_call(self, x):
        state.fallback_calls += 1
        return type(self).forward(self, x, *args, **kwargs)
    return linear_4bit(x, self.weight, self.bias, backend=state.backend)


def _extra_repr(self):
    state = self.__dict__[_STATE_ATTR]
    own = type(self).extra_repr(self)
    tag = f"fastlora(backend={state.backend!r})"
    return f"{own}, {tag}" if own else tag


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
    install_repr = "extra_repr" not in module.__dict__
    module.__dict__[_STATE_ATTR] = _State(backend, install_repr)
    module.__dict__["forward"] = types.MethodType(_fast_forward, module)
    if install_repr:
        module.__dict__["extra_repr"] = types.MethodType(_extra_repr, module)


def is_accelerated(module) -> bool:
    return _STATE_ATTR in getattr(module, "__dict__", {})


def fallback_calls(module) -> int:
    """How many calls of an accelerated ``module`` ran bitsandbytes' own forward."""
    state = module.__dict__.get(_STATE_ATTR)
    if state is None:
        raise ValueError("module is not accelerated by fastlora")
    return state.fallback_calls


def restore(module) -> bool:
    """Undo :func:`accelerate` (the module's ``__dict__`` is as before); returns whether it was accelerated."""
    state = module.__dict__.pop(_STATE_ATTR, None)
    if state is None:
        return False
    module.__dict__.pop("forward", None)
    if state.installed_extra_repr:
        module.__dict__.pop("extra_repr", None)
    return True
