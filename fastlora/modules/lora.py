"""fastlora's own LoRA on one base linear, in place, without PEFT: :func:`attach_lora`, :func:`detach_lora`,
:func:`has_lora`, :func:`lora_settings`, :func:`fallback_calls`.

The base module (``nn.Linear``, bitsandbytes ``Linear4bit``, or any module with a callable
``quantized_weight()`` returning a :class:`fastlora.nf4.QuantizedWeight`, e.g. fastlora's own 4-bit linear)
keeps its class, parameters and state_dict keys; it gains two submodules ``lora_A = nn.Linear(in, r)`` and
``lora_B = nn.Linear(r, out)`` (no bias), so its state_dict adds ``lora_A.weight`` (r, in) and
``lora_B.weight`` (out, r) -- PEFT's names with the adapter name dropped, as PEFT writes them to disk.

Forward computes what PEFT computes for the same weights (DESIGN.md §3): ``y = base(x) + scaling *
B(A(dropout(x)))``, rounded like ``peft.tuners.lora.Linear`` for a dense base and like
``peft.tuners.lora.bnb.Linear4bit`` for a 4-bit base, through :func:`fastlora.ops.lora_linear` (which saves
only x, S = dropout(x)·Aᵀ, A, B, the weight's own tensors and the dropout seed for backward). A call the
fused op cannot compute exactly as PEFT would (adapters neither float32 nor x's dtype; a trainable base
weight; a 4-bit layer whose bitsandbytes compute dtype differs from x's, or whose weight bitsandbytes
repacked for its CPU kernel; r > 256; lora_A / lora_B replaced; under autocast: x float64 or a
``quantized_weight()`` base) runs PEFT's formula in plain torch instead and is counted by
:func:`fallback_calls`. A dense base whose weight or bias dtype differs from x's raises TypeError outside
autocast, as ``F.linear`` (and so PEFT) would. Under ``torch.autocast`` (the Trainer's ``bf16=True`` /
``fp16=True``) the fused op computes in the autocast dtype, as PEFT's layer does (every F.linear cast to it)
and as :mod:`fastlora.modules.peft_lora` does for PEFT layers (:mod:`fastlora.modules._autocast`): x, a dense
base weight (cast per call), the bias and lora_A / lora_B are cast to it, a bitsandbytes 4-bit weight is
decoded straight to it whatever its compute dtype, and the result is in it. Dropout is active in training
mode; its masks are fastlora's (Philox), not torch's, on the fused path.

The instance gets ``forward`` and ``extra_repr`` as bound methods in its ``__dict__`` (``copy.deepcopy``
rebinds them to the copy) and a small state object; the class is never modified.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..ops.lora_linear import MAX_RANK, lora_linear
from . import _autocast, _bnb, _conv1d, _instance

_STATE_ATTR = "_fastlora_lora"
_X_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
ADAPTER_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class LoraSettings:
    """The LoRA configuration of one module (read back with :func:`lora_settings`)."""

    r: int
    lora_alpha: float
    lora_dropout: float
    use_rslora: bool
    scaling: float  # lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA
    rounding: str  # "linear" (dense base) or "linear4bit" (4-bit base)
    backend: str


class _State:
    """Per-module state in ``module.__dict__`` (not a buffer, not saved); copies cleanly with deepcopy."""

    def __init__(self, settings: LoraSettings, conv1d: bool = False):
        self.settings = settings
        self.fallback_calls = 0
        self.transposed = _conv1d.TransposedWeight() if conv1d else None  # Conv1D: weight.T for the op


def base_kind(module) -> str | None:
    """"dense" (exactly ``nn.Linear``), "conv1d" (transformers ``Conv1D``, weight stored transposed),
    "bnb4bit" (bitsandbytes Linear4bit), "quantized" (a module with a callable ``quantized_weight``), or None
    when fastlora cannot put LoRA on it."""
    linear4bit = _bnb.linear4bit_class()
    if linear4bit is not None and isinstance(module, linear4bit):
        return "bnb4bit"
    if callable(getattr(module, "quantized_weight", None)):
        return "quantized"
    if type(module) is torch.nn.Linear:
        return "dense"
    if _conv1d.is_conv1d(module):
        return "conv1d"
    return None


def _base_device(module, kind: str) -> torch.device:
    if kind == "quantized":
        return module.quantized_weight().device
    return module.weight.device


def has_lora(module) -> bool:
    """Whether :func:`attach_lora` put LoRA on ``module``."""
    return isinstance(module, torch.nn.Module) and _STATE_ATTR in module.__dict__


def lora_settings(module) -> LoraSettings | None:
    """The :class:`LoraSettings` of a module with LoRA attached, else None."""
    state = module.__dict__.get(_STATE_ATTR) if isinstance(module, torch.nn.Module) else None
    return None if state is None else state.settings


def fallback_calls(module) -> int:
    """How many calls of this module ran PEFT's formula in plain torch instead of the fused op."""
    state = module.__dict__.get(_STATE_ATTR)
    if state is None:
        raise ValueError("module has no fastlora LoRA attached")
    return state.fallback_calls


def check_lora_args(r, lora_alpha, lora_dropout, use_rslora) -> None:
    """Validate LoRA hyper-parameters; errors name the argument."""
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"r must be a positive int, got {r!r}")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not math.isfinite(lora_alpha) \
            or lora_alpha <= 0:
        raise ValueError(f"lora_alpha must be a finite number > 0, got {lora_alpha!r}")
    if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, (int, float)) or not (0.0 <= lora_dropout < 1.0):
        raise ValueError(f"lora_dropout must be a number in [0, 1), got {lora_dropout!r}")
    if not isinstance(use_rslora, bool):
        raise TypeError(f"use_rslora must be a bool, got {type(use_rslora).__name__}")


def check_backend(backend) -> None:
    from .. import backends

    if not isinstance(backend, str) or (backend != "auto" and backend not in backends.BACKENDS):
        raise ValueError(f"backend must be 'auto' or one of {backends.BACKENDS}, got {backend!r}")


def attach_lora(module: torch.nn.Module, *, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                use_rslora: bool = False, dtype: torch.dtype = torch.float32, backend: str = "auto") -> None:
    """Add a LoRA adapter to the base linear ``module`` in place (see the module docstring).

    lora_A (r, in_features) and lora_B (out_features, r) are created in ``dtype`` on the base weight's
    device and initialised as PEFT does (A: kaiming-uniform with a=sqrt(5), B: zeros); the random draws
    are PEFT's, so the same torch seed gives PEFT's A. They require grad; the base module's parameters
    are left as they are (fastlora never computes a gradient for the base weight: a trainable one sends
    calls to the plain-torch path)."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    kind = base_kind(module)
    if kind is None:
        raise TypeError(f"module must be a torch.nn.Linear, a transformers Conv1D, a bitsandbytes Linear4bit or a "
                        f"module with quantized_weight(), got {type(module).__module__}.{type(module).__name__}")
    check_lora_args(r, lora_alpha, lora_dropout, use_rslora)
    if dtype not in ADAPTER_DTYPES:
        raise ValueError(f"dtype must be one of {ADAPTER_DTYPES}, got {dtype!r}")
    check_backend(backend)
    if has_lora(module):
        raise ValueError("module already has a fastlora LoRA adapter (detach_lora first)")
    for name in ("lora_A", "lora_B"):
        if hasattr(module, name):
            raise ValueError(f"module already has an attribute {name!r} (a PEFT layer? use fastlora.patch)")
    for name in ("forward", "extra_repr"):
        if name in module.__dict__:
            raise ValueError(f"module has its own instance {name!r} already (a hook or another patch); "
                             f"fastlora cannot add LoRA to it")
    if kind == "conv1d":
        in_features, out_features = _conv1d.features(module)
    else:
        in_features, out_features = int(module.in_features), int(module.out_features)
    device = _base_device(module, kind)
    # PEFT's draws, in PEFT's order (LoraLayer.update_layer + reset_lora_parameters): both nn.Linear
    # default inits on the CPU in float32, then A again with kaiming-uniform, B zeros; then moved.
    lora_A = torch.nn.Linear(in_features, r, bias=False)
    lora_B = torch.nn.Linear(r, out_features, bias=False)
    torch.nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5))
    torch.nn.init.zeros_(lora_B.weight)
    lora_A.to(device=device, dtype=dtype)
    lora_B.to(device=device, dtype=dtype)
    scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
    settings = LoraSettings(r=r, lora_alpha=lora_alpha, lora_dropout=float(lora_dropout), use_rslora=use_rslora,
                            scaling=float(scaling), rounding="linear" if kind in ("dense", "conv1d") else "linear4bit",
                            backend=backend)
    module.lora_A = lora_A
    module.lora_B = lora_B
    module.__dict__[_STATE_ATTR] = _State(settings, conv1d=kind == "conv1d")
    _instance.bind(module, "forward", _lora_forward)
    _instance.bind(module, "extra_repr", _lora_extra_repr)


def detach_lora(module: torch.nn.Module) -> None:
    """Remove what :func:`attach_lora` added; the module is then exactly as before."""
    if not has_lora(module):
        raise ValueError("module has no fastlora LoRA attached")
    del module.lora_A
    del module.lora_B
    for name in (_STATE_ATTR, "forward", "extra_repr"):
        module.__dict__.pop(name, None)


def _lora_extra_repr(self) -> str:
    s = self.__dict__[_STATE_ATTR].settings
    tag = f"lora(r={s.r}, alpha={s.lora_alpha}, dropout={s.lora_dropout}" + (", rslora" if s.use_rslora else "") + ")"
    own = type(self).extra_repr(self)
    return f"{own}, {tag}" if own else tag


def _fused_weight(self, kind: str, x: torch.Tensor, amp: torch.dtype | None):
    """The weight to hand lora_linear, or None when this call must take the plain-torch path. ``amp``: the
    autocast dtype (a dense weight is returned cast to it, a 4-bit one as it is: the op decodes it to it) or
    None when autocast is off."""
    if kind in ("dense", "conv1d"):
        weight, bias = self.weight, self.bias
        if amp is None and (weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype)):
            got = f"weight {weight.dtype}" + ("" if bias is None else f", bias {bias.dtype}")
            raise TypeError(f"LoRA linear: x has dtype {x.dtype} but the base layer has {got}; F.linear (and PEFT) "
                            f"need one dtype: cast the input or the model")
        if weight.requires_grad:
            return None
        if amp is not None and (weight.dtype not in _autocast.CASTABLE
                                or (bias is not None and bias.dtype not in _autocast.CASTABLE)):
            return None  # a float64 weight: autocast leaves it alone and F.linear raises; so does the fallback
        weight = self.__dict__[_STATE_ATTR].transposed.get(weight) if kind == "conv1d" else weight
        return weight if amp is None else _autocast.cast(weight, amp)
    if kind == "quantized":
        if self.bias is not None and self.bias.dtype != x.dtype:
            return None
        compute = getattr(self, "compute_dtype", None)
        return self.quantized_weight() if compute is None or compute == x.dtype else None
    weight = self.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None or getattr(quant_state, "packing_format_for_cpu", False) or weight.requires_grad:
        return None
    if not getattr(self, "compute_type_is_set", True):
        # bitsandbytes fixes its compute dtype on the first call; do the same so later calls agree with it.
        self.set_compute_type(x)
        self.compute_type_is_set = True
    compute = self.compute_dtype
    if self.bias is not None and self.bias.dtype != (compute or x.dtype):
        return None  # bitsandbytes casts the bias in place here: let its own forward do that
    # under autocast bitsandbytes' own F.linear is cast to the autocast dtype whatever its compute_dtype
    return weight if amp is not None or compute is None or compute == x.dtype else None


def call_args(module, x: torch.Tensor) -> dict | None:
    """What the fused LoRA op needs for this call of ``module`` (fastlora LoRA attached) on ``x`` — keys
    weight, lora_A, lora_B, scaling, bias, dropout_p, training, rounding, backend, dora (always None) and dtype
    (the dtype x must be cast to and the op computes in: the autocast dtype under autocast, else x's) — or
    None when the call must take the plain-torch path (see the module docstring). Under autocast the tensors
    returned are already cast to ``dtype`` and the op must run with autocast off (:func:`_autocast.run`)."""
    state = module.__dict__.get(_STATE_ATTR)
    if state is None:
        return None
    s = state.settings
    kind = base_kind(module)
    amp = _autocast.compute_dtype(x)
    if _autocast.enabled(x) and (amp is None or kind == "quantized"):
        return None  # float64 x, or fastlora's own 4-bit base under autocast: as for PEFT layers (peft_lora)
    lora_A, lora_B = module.lora_A, module.lora_B
    adapter_dtypes = (torch.float32, x.dtype) if amp is None else _autocast.CASTABLE
    adapters_ok = (type(lora_A) is torch.nn.Linear and type(lora_B) is torch.nn.Linear and lora_A.bias is None
                   and lora_B.bias is None and lora_A.weight.dtype == lora_B.weight.dtype
                   and lora_A.weight.dtype in adapter_dtypes and s.r <= MAX_RANK)
    weight = None
    if x.dtype in _X_DTYPES and x.dim() >= 1:
        weight = _fused_weight(module, kind, x, amp)
    if weight is None or not adapters_ok:
        return None
    dtype = amp or x.dtype
    lora_A, lora_B, bias = lora_A.weight, lora_B.weight, module.bias
    if amp is not None:  # casts are differentiable: float32 adapters get float32 gradients, as under autocast
        lora_A, lora_B, bias = _autocast.cast(lora_A, amp), _autocast.cast(lora_B, amp), _autocast.cast(bias, amp)
    return dict(weight=weight, lora_A=lora_A, lora_B=lora_B, scaling=s.scaling, bias=bias, dropout_p=s.lora_dropout,
                training=module.training, rounding=s.rounding, backend=s.backend, dora=None, dtype=dtype)


def _lora_forward(self, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"LoRA linear: x must be a Tensor, got {type(x).__name__}")
    grouped = _instance.grouped_output(self, x)
    if grouped is not None:  # computed with its siblings (fastlora.modules.grouped_qkv)
        return grouped
    args = call_args(self, x)
    if args is None:
        state = self.__dict__[_STATE_ATTR]
        state.fallback_calls += 1
        return _peft_formula(self, state.settings, x, four_bit=state.settings.rounding != "linear")
    return _autocast.run(lora_linear, x, args["dtype"], args["weight"], args["lora_A"], args["lora_B"],
                         args["scaling"], bias=args["bias"], dropout_p=args["dropout_p"], training=args["training"],
                         rounding=args["rounding"], backend=args["backend"])


def _peft_formula(self, s: LoraSettings, x: torch.Tensor, four_bit: bool) -> torch.Tensor:
    """PEFT's own forward (lora.Linear / lora.bnb.Linear4bit, one vanilla adapter) in plain torch."""
    result = type(self).forward(self, x)
    lora_A, lora_B = self.lora_A, self.lora_B
    p = s.lora_dropout if self.training else 0.0

    def dropout(t):  # PEFT's nn.Identity for p = 0 draws no random numbers
        return torch.nn.functional.dropout(t, p) if p > 0.0 else t

    if not four_bit:
        result_dtype = result.dtype
        xa = x.to(lora_A.weight.dtype)
        result = result + lora_B(lora_A(dropout(xa))) * s.scaling
        return result.to(result_dtype)
    result = result.clone()
    if torch.is_autocast_enabled():
        return result + lora_B(lora_A(dropout(x))) * s.scaling
    xa = x.to(lora_A.weight.dtype)
    return result + (lora_B(lora_A(dropout(xa))) * s.scaling).to(result.dtype)
