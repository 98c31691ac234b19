"""PEFT LoRA layers run through :func:`fastlora.ops.lora_linear`.

Accelerated: PEFT ``lora.Linear`` over ``nn.Linear`` (rounding "linear"), PEFT ``lora.bnb.Linear4bit`` over
bitsandbytes ``Linear4bit`` (rounding "linear4bit") and PEFT ``lora.Linear`` over a bitsandbytes ``Linear4bit``
(what PEFT builds when the model does not report ``is_loaded_in_4bit``; rounding "linear", as PEFT computes it
there) and PEFT ``lora.Linear`` over a transformers ``Conv1D`` (``fan_in_fan_out``, GPT-2 style), each with
exactly one active LoRA or DoRA adapter (no other lora variant, not merged, adapters enabled,
``lora_bias`` only without DoRA, ``lora_dropout`` an ``nn.Identity`` or ``nn.Dropout``, frozen base weight). DoRA runs
:func:`fastlora.ops.dora_linear`; while its dropout is active (training, p > 0) PEFT's forward runs.
:func:`skip_reason` says why any other LoRA layer is left alone.

A Conv1D base keeps a transposed copy of its frozen weight (:mod:`fastlora.modules._conv1d`).

Per call, the fused op runs only when the call is one PEFT would compute plainly in x's dtype; otherwise
the module's own (PEFT) forward runs for that call and ``fallback_calls`` counts it:
  - extra positional / keyword arguments (e.g. ``adapter_names=`` mixed batches);
  - not exactly one active adapter, or the active one is not plain LoRA (a patched layer follows
    ``set_adapter``: whichever single plain adapter is active is computed fused), merged, adapters disabled;
  - autocast is enabled for x's device and x is float64, the base is fastlora's own 4-bit linear, or the
    adapter is DoRA (a call under autocast is otherwise fused: see below);
  - dense base: x's dtype differs from the base weight's (PEFT would raise or promote in F.linear) or
    the bias's; 4-bit base: the bitsandbytes ``compute_dtype`` is set and differs from x's dtype, the bias
    dtype differs, the weight lost its ``quant_state`` or bitsandbytes repacked it for its CPU kernel;
  - lora_A / lora_B are neither float32 nor x's dtype;
  - the base weight was made trainable since patching.
Under ``torch.autocast`` (what the Trainer's ``bf16=True`` / ``fp16=True`` turn on) PEFT's layer runs every
``F.linear`` in the autocast dtype; the fused call does the same (:mod:`fastlora.modules._autocast`): x, a dense
base weight (cast per call, as autocast does), the bias and lora_A / lora_B are cast to the autocast dtype, a
bitsandbytes 4-bit weight is decoded straight to it (its ``compute_dtype`` is then irrelevant: autocast casts
bitsandbytes' own ``F.linear`` too), and the result is in the autocast dtype, as PEFT's is.
Dropout is active when the adapter's ``nn.Dropout`` module is in training mode (as in PEFT); its masks
are fastlora's (Philox, regenerated in backward), not torch's, so with dropout > 0 a patched run draws
other masks than an unpatched one.
"""

from __future__ import annotations

import copy
import warnings

import torch

from ..ops.dora_linear import dora_linear
from ..ops.linear_4bit import linear_4bit
from ..ops.lora_branch import lora_branch
from ..ops.lora_linear import lora_linear
from . import _autocast, _bnb, _conv1d, _instance

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _lora_classes() -> tuple[dict, type | None]:
    """({class: rounding} of the PEFT LoRA layers accelerated here, PEFT's LoraLayer base) — empty without PEFT."""
    try:
        from peft.tuners.lora import layer as lora_layer
    except ImportError:
        return {}, None
    classes = {lora_layer.Linear: "linear"}
    try:
        from peft.tuners.lora import bnb as lora_bnb

        if hasattr(lora_bnb, "Linear4bit"):
            classes[lora_bnb.Linear4bit] = "linear4bit"
    except ImportError:
        pass
    return classes, lora_layer.LoraLayer


def is_four_bit(base) -> bool:
    linear4bit = _bnb.linear4bit_class()
    return linear4bit is not None and isinstance(base, linear4bit)


def _is_fastlora_4bit(base) -> bool:
    """fastlora's own 4-bit linear (``quantize=``), or anything exposing its weight the same way."""
    return callable(getattr(base, "quantized_weight", None))


_is_conv1d = _conv1d.is_conv1d


class PeftLoraState(_instance.InstanceState):
    def __init__(self, backend: str, rounding: str, four_bit: bool, conv1d: bool, quantized: bool):
        super().__init__(backend)
        self.rounding, self.four_bit, self.conv1d, self.quantized = rounding, four_bit, conv1d, quantized
        # adapter -> (the modules judged, plain LoRA?); replaced, never mutated (shallow deepcopy)
        self.adapter_ok: dict = {}
        self.transposed = _conv1d.TransposedWeight() if conv1d else None
        self.bnb_view = _bnb.Params4bitView() if four_bit else None

    def __deepcopy__(self, memo):
        new = copy.copy(self)
        new.transposed = _conv1d.TransposedWeight() if self.conv1d else None
        new.bnb_view = _bnb.Params4bitView() if self.four_bit else None
        return new

    def base_weight(self, base):
        """The base layer's weight as the op takes it: (out_features, in_features) or 4-bit (a bitsandbytes
        weight as its cached :class:`fastlora.nf4.QuantizedWeight` view)."""
        if self.quantized:
            return base.quantized_weight()
        if self.four_bit:
            return self.bnb_view.get(base.weight)
        return self.transposed.get(base.weight) if self.conv1d else base.weight

    def describe(self) -> str:
        return f"fastlora(backend={self.backend!r}, rounding={self.rounding!r})"


def claims(module) -> bool:
    """Whether ``module`` is a PEFT LoRA layer (accelerated or reported as left alone)."""
    lora_base = _lora_classes()[1]
    return lora_base is not None and isinstance(module, lora_base)


def _active_here(module, lora_A=None) -> list[str]:
    """The active adapters this layer has weights for (PEFT's forward skips the others). ``lora_A``: the layer's
    lora_A ModuleDict when the caller has it already."""
    lora_A = module.lora_A if lora_A is None else lora_A
    return [name for name in module.active_adapters if name in lora_A]


def _is_dora(module, adapter: str) -> bool:
    variant = getattr(module, "lora_variant", {}).get(adapter)
    return type(variant).__name__ == "DoraLinearVariant"


def is_dora(module) -> bool:
    """Whether the single active adapter of the PEFT layer ``module`` is DoRA."""
    active = _active_here(module)
    return len(active) == 1 and _is_dora(module, active[0])


def _adapter_reason(module, adapter: str) -> str | None:
    """None when ``adapter`` of ``module`` is a plain LoRA adapter the fused op computes, else why not."""
    if _is_dora(module, adapter):
        if adapter not in getattr(module, "lora_magnitude_vector", {}):
            return "DoRA adapter without a lora_magnitude_vector"
    elif adapter in getattr(module, "lora_variant", {}):
        return f"LoRA variant {type(module.lora_variant[adapter]).__name__} (not accelerated yet)"
    lora_A, lora_B = module.lora_A[adapter], module.lora_B[adapter]
    if type(lora_A) is not torch.nn.Linear or type(lora_B) is not torch.nn.Linear:
        return "lora_A / lora_B are not nn.Linear"
    if lora_A.bias is not None:
        return "lora_A has a bias"
    if lora_B.bias is not None and _is_dora(module, adapter):
        return "DoRA with lora_bias=True (not accelerated yet)"
    if lora_A.weight.dtype != lora_B.weight.dtype:
        return "lora_A and lora_B have different dtypes"
    dropout = module.lora_dropout[adapter]
    if type(dropout) not in (torch.nn.Identity, torch.nn.Dropout):
        return f"lora_dropout is {type(dropout).__name__} (only nn.Identity / nn.Dropout)"
    scaling = module.scaling.get(adapter)
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        return "scaling is not a Python number"
    return None


def skip_reason(module) -> str | None:
    """None when :func:`install` may accelerate ``module`` (a PEFT LoraLayer), else why not. Judged on the
    adapter active now; a patched layer follows later ``set_adapter`` switches (see ``_call_ok``)."""
    rounding = _lora_classes()[0].get(type(module))
    if rounding is None:
        return f"{type(module).__module__}.{type(module).__name__} is not accelerated yet"
    conflict = _instance.conflict_reason(module)
    if conflict is not None:
        return conflict
    active = _active_here(module)
    if len(active) != 1:
        return f"{len(active)} active adapters (fastlora runs exactly one)"
    reason = _adapter_reason(module, active[0])
    if reason is not None:
        return reason
    if module.merged:
        return "adapter merged into the base weight"
    if module.disable_adapters:
        return "adapters disabled"
    base = module.get_base_layer()
    if getattr(module, "fan_in_fan_out", False) != _is_conv1d(base):
        return "fan_in_fan_out does not match the base layer (only a transformers Conv1D base is fan-in/fan-out)"
    four_bit = is_four_bit(base)
    if _is_fastlora_4bit(base):
        return None if rounding == "linear" else "PEFT's 4-bit LoRA class over a fastlora 4-bit base"
    if rounding == "linear" and type(base) is not torch.nn.Linear and not four_bit and not _is_conv1d(base):
        return (f"base layer is {type(base).__name__}, not nn.Linear, transformers Conv1D, bitsandbytes or fastlora "
                f"Linear4bit")
    if rounding == "linear4bit" and not four_bit:
        return f"base layer is {type(base).__name__}, not bitsandbytes Linear4bit"
    if four_bit and getattr(base.weight, "quant_state", None) is None:
        return "4-bit weight has no quant_state"
    if base.weight.requires_grad:
        return "base weight is trainable (fastlora keeps it frozen)"
    return None


def install(module, backend: str) -> None:
    """Accelerate ``module``; :func:`skip_reason` returned None for it."""
    rounding = _lora_classes()[0][type(module)]
    base = module.get_base_layer()
    state = PeftLoraState(backend, rounding, is_four_bit(base), _is_conv1d(base), _is_fastlora_4bit(base))
    _instance.install(module, _fast_forward, state)


def call_args(module, x) -> dict | None:
    """What the fused LoRA op needs for this call of the patched PEFT layer ``module`` on ``x`` — keys
    weight (out, in), lora_A, lora_B, scaling, bias, dropout_p, training, rounding, backend, dora (the
    magnitude vector or None) and dtype (the dtype x must be cast to and the op computes in: the autocast
    dtype under autocast, else x's) — or None when PEFT's own forward must run (see the module docstring).
    Under autocast the tensors returned are already cast to ``dtype`` and the op must run with autocast off."""
    state = _instance.state_of(module)
    if state is None or not isinstance(x, torch.Tensor):
        return None
    amp = _autocast.compute_dtype(x)
    if _autocast.enabled(x) and (amp is None or state.quantized):
        return None
    dtype = amp or x.dtype
    call = _call_adapter(module, state, x, dtype, amp is not None)
    if call is None:
        return None
    adapter, base, lora_A_layer, lora_B_layer, dropout = call
    p = float(dropout.p) if isinstance(dropout, torch.nn.Dropout) else 0.0
    scaling = float(module.scaling[adapter])
    dora = module.lora_magnitude_vector[adapter].weight if _is_dora(module, adapter) else None
    if dora is not None and (amp is not None or (p > 0.0 and dropout.training)):
        return None  # PEFT's DoRA then needs dropout(x)·Wᵀ: another GEMM, not fused; autocast: not handled
    bias = _autocast.cast(base.bias, dtype)
    lora_bias = lora_B_layer.bias
    if lora_bias is not None:  # lora_bias=True: B(z) = z·Bᵀ + b, scaled, is a bias s·b on the output
        scaled = (lora_bias * scaling).to(dtype)
        bias = scaled if bias is None else bias + scaled
    weight = state.base_weight(base)
    lora_A, lora_B = lora_A_layer.weight, lora_B_layer.weight
    if amp is not None:
        lora_A, lora_B = _autocast.cast(lora_A, amp), _autocast.cast(lora_B, amp)
        if not state.four_bit:
            weight = _autocast.cast(weight, amp)
    return dict(weight=weight, lora_A=lora_A, lora_B=lora_B, scaling=scaling, bias=bias, dropout_p=p,
                training=dropout.training, rounding=state.rounding, backend=state.backend, dora=dora, dtype=dtype)


WARNED_FALLBACKS: set[str] = set()  # each reason is warned about once per process


def unexpected_fallback(module, x) -> str | None:
    """Why a call of the patched layer ``module`` on ``x`` runs PEFT's forward, when that is a setup a user
    would not expect to be slow (a dtype mismatch, a repacked or trainable weight); None for the expected
    cases (adapters disabled / merged / several active, extra arguments, DoRA with active dropout)."""
    state = _instance.state_of(module)
    if state is None or not isinstance(x, torch.Tensor) or _autocast.enabled(x):
        return None
    active = _active_here(module)
    if module.merged or module.disable_adapters or len(active) != 1:
        return None
    lora_dtype = module.lora_A[active[0]].weight.dtype
    if lora_dtype not in (torch.float32, x.dtype):
        return f"the adapters are {lora_dtype}, neither float32 nor the input's {x.dtype}"
    base = module.get_base_layer()
    if state.quantized:
        return None
    if base.weight.requires_grad:
        return "the base weight is trainable"
    if not state.four_bit:
        if base.weight.dtype != x.dtype:
            return f"the input is {x.dtype}, the base weight {base.weight.dtype}"
        return None
    quant_state = getattr(base.weight, "quant_state", None)
    if quant_state is not None and getattr(quant_state, "packing_format_for_cpu", False):
        return ("bitsandbytes repacked the 4-bit weight for its CPU kernel (it does so in eval-mode forwards "
                "without grad on AVX512-BF16 CPUs)")
    if base.compute_dtype is not None and base.compute_dtype != x.dtype:
        return f"the input is {x.dtype} but bitsandbytes' compute_dtype is {base.compute_dtype}"
    return None


def compute_dtype_args(module, x) -> dict | None:
    """For a bitsandbytes base whose ``compute_dtype`` is not x's dtype (e.g. fp32 hidden states after
    ``prepare_model_for_kbit_training`` into bf16-compute layers), where PEFT runs the base on x cast to the
    compute dtype and the LoRA term on the uncast x: the keys of :func:`call_args` (dora None, dtype x's)
    plus compute_dtype, with the bias in the compute dtype. None when this is not such a call."""
    state = _instance.state_of(module)
    if state is None:
        return None
    if not state.four_bit or not isinstance(x, torch.Tensor) or _autocast.enabled(x):
        return None
    if x.dtype not in _autocast.CASTABLE or x.dim() < 1 or module.merged or module.disable_adapters:
        return None
    base = module.get_base_layer()
    compute = base.compute_dtype
    if compute is None or compute == x.dtype or compute not in _autocast.CASTABLE or base.weight.requires_grad:
        return None
    quant_state = getattr(base.weight, "quant_state", None)
    if quant_state is None or getattr(quant_state, "packing_format_for_cpu", False):
        return None
    active = _active_here(module)
    if len(active) != 1 or not _plain_adapter(module, state, active[0]) or _is_dora(module, active[0]):
        return None
    adapter = active[0]
    lora_A, lora_B = module.lora_A[adapter], module.lora_B[adapter]
    if lora_B.bias is not None or lora_A.weight.dtype not in _autocast.CASTABLE:
        return None
    dropout = module.lora_dropout[adapter]
    p = float(dropout.p) if isinstance(dropout, torch.nn.Dropout) else 0.0
    return dict(weight=base.weight, lora_A=lora_A.weight, lora_B=lora_B.weight, scaling=float(module.scaling[adapter]),
                bias=None if base.bias is None else base.bias.to(compute), dropout_p=p, training=dropout.training,
                rounding=state.rounding, backend=state.backend, dora=None, dtype=x.dtype, compute_dtype=compute)


def _compute_dtype_call(module, x):
    """:func:`compute_dtype_args`' calls, computed as PEFT does, as two ops: :func:`linear_4bit` (saves only
    the weight) and :func:`lora_branch` (saves x, S and the seed). None when this is not such a call."""
    args = compute_dtype_args(module, x)
    if args is None:
        return None
    base_out = linear_4bit(x.to(args["compute_dtype"]), args["weight"], args["bias"],
                           backend=args["backend"]).to(x.dtype)
    lora_A = args["lora_A"]
    lora = lora_branch(x.to(lora_A.dtype), lora_A, args["lora_B"], args["scaling"], dropout_p=args["dropout_p"],
                       training=args["training"], backend=args["backend"])
    if args["rounding"] == "linear4bit":  # PEFT's 4-bit class rounds the LoRA term to the result's dtype first
        return base_out + lora.to(base_out.dtype)
    return (base_out + lora).to(x.dtype)


def _fast_forward(self, x, *args, **kwargs):
    grouped = None if args or kwargs else _instance.grouped_output(self, x)
    if grouped is not None:  # computed with its siblings (fastlora.modules.grouped_qkv)
        return grouped
    args_ = None if args or kwargs else call_args(self, x)
    if args_ is None:
        split = None if args or kwargs else _compute_dtype_call(self, x)
        if split is not None:
            return split
        _instance.state_of(self).fallback_calls += 1
        reason = None if args or kwargs else unexpected_fallback(self, x)
        if reason is not None and reason not in WARNED_FALLBACKS:
            WARNED_FALLBACKS.add(reason)
            warnings.warn(f"fastlora: a patched PEFT layer runs PEFT's own forward because {reason}; such "
                          f"calls are counted in handle.report()['fallback_calls']", RuntimeWarning, stacklevel=2)
        return type(self).forward(self, x, *args, **kwargs)
    if args_["dora"] is not None:
        return dora_linear(x, args_["weight"], args_["lora_A"], args_["lora_B"], args_["scaling"], args_["dora"],
                           bias=args_["bias"], backend=args_["backend"])
    return _autocast.run(lora_linear, x, args_["dtype"], args_["weight"], args_["lora_A"], args_["lora_B"],
                         args_["scaling"], bias=args_["bias"], dropout_p=args_["dropout_p"],
                         training=args_["training"], rounding=args_["rounding"], backend=args_["backend"])


def _plain_adapter(module, state: PeftLoraState, adapter: str, layers: tuple | None = None) -> bool:
    """Whether ``adapter`` is plain LoRA; judged again only when its modules are replaced. ``layers``: its
    (lora_A, lora_B, lora_dropout) modules when the caller has them already."""
    lora_A, lora_B, dropout = layers or (module.lora_A[adapter], module.lora_B[adapter], module.lora_dropout[adapter])
    key = (id(lora_A), id(lora_B), id(dropout), adapter in getattr(module, "lora_variant", {}),
           getattr(module, "use_dora", {}).get(adapter, False), module.scaling.get(adapter))
    cached = state.adapter_ok.get(adapter)
    if cached is None or cached[0] != key:
        cached = (key, _adapter_reason(module, adapter) is None)
        state.adapter_ok = {**state.adapter_ok, adapter: cached}
    return cached[1]


def _call_adapter(module, state: PeftLoraState, x, dtype: torch.dtype, amp: bool) -> tuple | None:
    """(adapter, base layer, lora_A, lora_B, lora_dropout modules) of the adapter the fused op computes for
    this call (in ``dtype``; ``amp``: under autocast, where every float32 / bfloat16 / float16 tensor is cast
    to it), or None when PEFT's own forward must run. Each layer is looked up once: an ``nn.Module``
    attribute lookup costs about a microsecond of host time, and this runs on every call of every layer."""
    if x.dtype not in _FLOAT_DTYPES or x.dim() < 1:
        return None
    if module.merged or module.disable_adapters:
        return None
    lora_A_layers = module.lora_A
    active = _active_here(module, lora_A_layers)
    if len(active) != 1:
        return None
    adapter = active[0]
    layers = (lora_A_layers[adapter], module.lora_B[adapter], module.lora_dropout[adapter])
    if not _plain_adapter(module, state, adapter, layers):
        return None
    castable = _autocast.CASTABLE if amp else (dtype,)
    base = module.get_base_layer()
    call = (adapter, base, *layers)
    bias = base.bias
    if bias is not None and bias.dtype not in castable:
        return None
    a_dtype = layers[0].weight.dtype
    if layers[1].weight.dtype != a_dtype or a_dtype not in (torch.float32, dtype, *castable):
        return None
    if state.quantized:  # fastlora's 4-bit linear decodes to any x dtype and is always frozen
        return call
    weight = base.weight
    if weight.requires_grad:
        return None
    if not state.four_bit:
        return call if weight.dtype in castable else None
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None or getattr(quant_state, "packing_format_for_cpu", False):
        return None
    # under autocast bitsandbytes' own F.linear is cast to the autocast dtype whatever its compute_dtype
    return call if amp or base.compute_dtype is None or base.compute_dtype == dtype else None
