"""fastlora.patch / fastlora.unpatch: run an existing PEFT LoRA model's linears through
:func:`fastlora.ops.lora_linear`, in place, without changing what the model computes or saves.

First slice of issue 5. Accelerated: PEFT ``lora.Linear`` over ``nn.Linear`` (rounding "linear"), PEFT
``lora.bnb.Linear4bit`` over bitsandbytes ``Linear4bit`` (rounding "linear4bit") and PEFT ``lora.Linear`` over
a bitsandbytes ``Linear4bit`` (what PEFT builds when the model does not report ``is_loaded_in_4bit``;
rounding "linear", as PEFT computes it there), each with exactly one active, plain LoRA adapter
(no DoRA / lora variant, not merged, adapters enabled, no ``fan_in_fan_out``, no ``lora_bias``,
``lora_dropout`` an ``nn.Identity`` or ``nn.Dropout``, frozen base weight). Every other LoRA layer is left
alone and listed in :meth:`PatchHandle.report` with the reason.

How: each accelerated module gets an instance attribute ``forward`` (a bound method, so ``copy.deepcopy``
rebinds it to the copy) and an instance ``extra_repr`` that adds ``fastlora(...)`` to ``repr``; the class,
PEFT and transformers are never modified, so a patched and an unpatched model live side by side. No
parameter, buffer or submodule is added, removed or replaced: ``state_dict`` keys and parameter objects stay.

Per call, the fused op runs only when the call is one PEFT would compute plainly in x's dtype; otherwise
the module's own (PEFT) forward runs for that call and ``report()["fallback_calls"]`` counts it:
  - extra positional / keyword arguments (e.g. ``adapter_names=`` mixed batches);
  - the adapter state changed since ``patch`` (other active adapter, merged, adapters disabled);
  - autocast is enabled for x's device;
  - dense base: x's dtype differs from the base weight's (PEFT would raise or promote in F.linear) or
    the bias's; 4-bit base: the bitsandbytes ``compute_dtype`` is set and differs from x's dtype, the bias
    dtype differs, the weight lost its ``quant_state`` or bitsandbytes repacked it for its CPU kernel;
  - lora_A / lora_B are neither float32 nor x's dtype;
  - the base weight was made trainable or the dropout module replaced since ``patch``.
Dropout is active when the adapter's ``nn.Dropout`` module is in training mode (as in PEFT); its masks
are fastlora's (Philox, regenerated in backward), not torch's, so with dropout > 0 a patched run draws
other masks than an unpatched one.
"""

from __future__ import annotations

import sys
import types

import torch

from .ops.lora_linear import lora_linear

_HANDLE_ATTR = "_fastlora_handle"
_STATE_ATTR = "_fastlora_patch_state"
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _lora_classes():
    """{class: rounding} of the PEFT LoRA layers this slice accelerates (empty without PEFT)."""
    classes = {}
    try:
        from peft.tuners.lora import layer as lora_layer
    except ImportError:
        return classes, None
    classes[lora_layer.Linear] = "linear"
    try:
        from peft.tuners.lora import bnb as lora_bnb

        if hasattr(lora_bnb, "Linear4bit"):
            classes[lora_bnb.Linear4bit] = "linear4bit"
    except ImportError:
        pass
    return classes, lora_layer.LoraLayer


def _bnb_linear4bit():
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    return bnb.nn.Linear4bit


class _State:
    """What a patched module needs per call; lives in the module's ``__dict__`` (not a buffer)."""

    def __init__(self, adapter: str, rounding: str, backend: str, had_extra_repr: bool, four_bit: bool):
        self.adapter, self.rounding, self.backend, self.four_bit = adapter, rounding, backend, four_bit
        self.had_extra_repr = had_extra_repr
        self.fallback_calls = 0

    def __deepcopy__(self, memo):
        new = _State(self.adapter, self.rounding, self.backend, self.had_extra_repr, self.four_bit)
        new.fallback_calls = self.fallback_calls
        return new


def _active_here(module) -> list[str]:
    """The active adapters this layer has weights for (PEFT's forward skips the others)."""
    return [name for name in module.active_adapters if name in module.lora_A]


def _skip_reason(module, rounding: str) -> tuple[str | None, str | None]:
    """(None, adapter) when ``module`` can be accelerated, else (reason, None)."""
    if _STATE_ATTR in module.__dict__:
        return "already patched by another fastlora.patch call (on an enclosing or inner model)", None
    if "forward" in module.__dict__:
        return "forward already overridden on the instance (e.g. an accelerate hook)", None
    if "extra_repr" in module.__dict__:
        return "extra_repr already overridden on the instance", None
    active = _active_here(module)
    if len(active) != 1:
        return f"{len(active)} active adapters (fastlora runs exactly one)", None
    adapter = active[0]
    variant = getattr(module, "lora_variant", {}).get(adapter)
    if variant is not None:
        name = type(variant).__name__
        return ("DoRA" if "dora" in name.lower() else f"LoRA variant {name}") + " (not accelerated yet)", None
    if getattr(module, "use_dora", {}).get(adapter, False):
        return "DoRA (not accelerated yet)", None
    if module.merged:
        return "adapter merged into the base weight", None
    if module.disable_adapters:
        return "adapters disabled", None
    if getattr(module, "fan_in_fan_out", False):
        return "fan_in_fan_out base (Conv1D layout, not accelerated yet)", None
    lora_A, lora_B = module.lora_A[adapter], module.lora_B[adapter]
    if type(lora_A) is not torch.nn.Linear or type(lora_B) is not torch.nn.Linear:
        return "lora_A / lora_B are not nn.Linear", None
    if lora_A.bias is not None or lora_B.bias is not None:
        return "lora_bias=True (not accelerated yet)", None
    if lora_A.weight.dtype != lora_B.weight.dtype:
        return "lora_A and lora_B have different dtypes", None
    dropout = module.lora_dropout[adapter]
    if type(dropout) not in (torch.nn.Identity, torch.nn.Dropout):
        return f"lora_dropout is {type(dropout).__name__} (only nn.Identity / nn.Dropout)", None
    scaling = module.scaling.get(adapter)
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        return "scaling is not a Python number", None
    base = module.get_base_layer()
    linear4bit = _bnb_linear4bit()
    four_bit = linear4bit is not None and isinstance(base, linear4bit)
    if rounding == "linear" and type(base) is not torch.nn.Linear and not four_bit:
        return f"base layer is {type(base).__name__}, not nn.Linear or bitsandbytes Linear4bit", None
    if rounding == "linear4bit" and not four_bit:
        return f"base layer is {type(base).__name__}, not bitsandbytes Linear4bit", None
    if four_bit and getattr(base.weight, "quant_state", None) is None:
        return "4-bit weight has no quant_state", None
    if base.weight.requires_grad:
        return "base weight is trainable (fastlora keeps it frozen)", None
    return None, adapter


def _fast_forward(self, x, *args, **kwargs):
    state = self.__dict__[_STATE_ATTR]
    if args or kwargs or not _call_ok(self, state, x):
        state.fallback_calls += 1
        return type(self).forward(self, x, *args, **kwargs)
    adapter = state.adapter
    base = self.get_base_layer()
    dropout = self.lora_dropout[adapter]
    p = float(dropout.p) if isinstance(dropout, torch.nn.Dropout) else 0.0
    return lora_linear(x, base.weight, self.lora_A[adapter].weight, self.lora_B[adapter].weight,
                       float(self.scaling[adapter]), bias=base.bias, dropout_p=p, training=dropout.training,
                       rounding=state.rounding, backend=state.backend)


def _call_ok(module, state: _State, x) -> bool:
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOAT_DTYPES or x.dim() < 1:
        return False
    if module.merged or module.disable_adapters or _active_here(module) != [state.adapter]:
        return False
    if state.adapter in getattr(module, "lora_variant", {}):
        return False
    if torch.is_autocast_enabled(x.device.type):
        return False
    base = module.get_base_layer()
    if base.bias is not None and base.bias.dtype != x.dtype:
        return False
    if base.weight.requires_grad or type(module.lora_dropout[state.adapter]) not in (torch.nn.Identity,
                                                                                  torch.nn.Dropout):
        return False
    a_dtype = module.lora_A[state.adapter].weight.dtype
    if a_dtype not in (torch.float32, x.dtype) or module.lora_B[state.adapter].weight.dtype != a_dtype:
        return False
    if not state.four_bit:
        return base.weight.dtype == x.dtype
    quant_state = getattr(base.weight, "quant_state", None)
    if quant_state is None or getattr(quant_state, "packing_format_for_cpu", False):
        return False
    return base.compute_dtype is None or base.compute_dtype == x.dtype


def _extra_repr(self):
    state = self.__dict__[_STATE_ATTR]
    own = type(self).extra_repr(self)
    tag = f"fastlora(backend={state.backend!r}, rounding={state.rounding!r})"
    return f"{own}, {tag}" if own else tag


class PatchHandle:
    """Returned by :func:`patch`: which LoRA layers run fastlora's fused op, which were left and why."""

    def __init__(self, model: torch.nn.Module, backend: str, patched: list[str], skipped: dict[str, str],
                 modules: dict[str, torch.nn.Module]):
        self.model, self.backend = model, backend
        self.patched, self.skipped = patched, skipped
        self._modules = modules
        self.active = True

    def report(self) -> dict:
        """Data: ``patched`` module names, ``skipped`` {name: reason}, ``fallback_calls`` {name: count}
        (calls a patched module handed to PEFT's forward, see the module docstring), ``backend``, ``active``."""
        fallbacks = {}
        for name, module in self._modules.items():
            state = module.__dict__.get(_STATE_ATTR)
            if state is not None and state.fallback_calls:
                fallbacks[name] = state.fallback_calls
        return {"patched": list(self.patched), "skipped": dict(self.skipped), "fallback_calls": fallbacks,
                "backend": self.backend, "active": self.active}

    def summary(self) -> str:
        """One line: how many LoRA layers were patched, which were left and why."""
        line = f"fastlora.patch: {len(self.patched)} LoRA layer(s) accelerated (backend={self.backend!r})"
        if self.skipped:
            by_reason: dict[str, list[str]] = {}
            for name, reason in self.skipped.items():
                by_reason.setdefault(reason, []).append(name)
            parts = [f"{reason}: {len(names)} ({names[0]}{', ...' if len(names) > 1 else ''})"
                     for reason, names in by_reason.items()]
            line += f"; {len(self.skipped)} left unpatched: " + "; ".join(parts)
        else:
            line += "; none left unpatched"
        return line

    def unpatch(self) -> None:
        """Restore every patched module's own forward and repr. Idempotent."""
        if not self.active:
            return
        _restore(self._modules.values())
        self.active = False
        if self.model.__dict__.get(_HANDLE_ATTR) is self:
            del self.model.__dict__[_HANDLE_ATTR]

    def __repr__(self) -> str:
        return f"PatchHandle({self.summary()!r}, active={self.active})"


def _restore(modules) -> None:
    for module in modules:
        state = module.__dict__.pop(_STATE_ATTR, None)
        module.__dict__.pop("forward", None)
        if state is not None and not state.had_extra_repr:
            module.__dict__.pop("extra_repr", None)


def patch(model, *, backend: str = "auto", verbose: bool = False) -> PatchHandle:
    """Accelerate the PEFT LoRA layers of ``model`` in place; returns a :class:`PatchHandle`.

    Patching a patched model with the same options returns the existing handle; with different options
    it raises ValueError (unpatch first). All-or-nothing: if anything fails, every module already patched
    is restored. ``verbose=True`` prints :meth:`PatchHandle.summary` to stderr."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    from . import backends as _backends

    if backend != "auto" and backend not in _backends.BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {_backends.BACKENDS}, got {backend!r}")
    existing = model.__dict__.get(_HANDLE_ATTR)
    if existing is not None and existing.active:
        if existing.backend != backend:
            raise ValueError(f"model is already patched with backend={existing.backend!r}; call unpatch() before "
                             f"patching with backend={backend!r}")
        return existing
    classes, lora_base = _lora_classes()
    patched: list[str] = []
    skipped: dict[str, str] = {}
    modules: dict[str, torch.nn.Module] = {}
    try:
        for name, module in model.named_modules():
            rounding = classes.get(type(module))
            if rounding is None:
                if lora_base is not None and isinstance(module, lora_base):
                    skipped[name] = f"{type(module).__module__}.{type(module).__name__} is not accelerated yet"
                continue
            reason, adapter = _skip_reason(module, rounding)
            if reason is not None:
                skipped[name] = reason
                continue
            had_extra_repr = "extra_repr" in module.__dict__
            linear4bit = _bnb_linear4bit()
            four_bit = linear4bit is not None and isinstance(module.get_base_layer(), linear4bit)
            module.__dict__[_STATE_ATTR] = _State(adapter, rounding, backend, had_extra_repr, four_bit)
            modules[name] = module
            module.__dict__["forward"] = types.MethodType(_fast_forward, module)
            module.__dict__["extra_repr"] = types.MethodType(_extra_repr, module)
            patched.append(name)
        if not patched and not skipped:
            raise ValueError("model has no PEFT LoRA layers to patch (this first slice of fastlora.patch accelerates "
                             "PEFT lora.Linear and lora.bnb.Linear4bit layers only)")
        handle = PatchHandle(model, backend, patched, skipped, modules)
        model.__dict__[_HANDLE_ATTR] = handle
    except BaseException:
        _restore(modules.values())
        raise
    if verbose:
        print(handle.summary(), file=sys.stderr)
    return handle


def unpatch(model) -> bool:
    """Undo :func:`patch` on ``model``; returns whether it was patched."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    handle = model.__dict__.get(_HANDLE_ATTR)
    if handle is None or not handle.active:
        return False
    handle.unpatch()
    return True


def patch_handle(model) -> PatchHandle | None:
    """The active handle of a patched model, else None."""
    handle = model.__dict__.get(_HANDLE_ATTR) if isinstance(model, torch.nn.Module) else None
    return handle if handle is not None and handle.active else None
