"""fastlora's frozen 4-bit linear layer and :func:`quantize_linears`, which swaps a model's
``nn.Linear`` layers for it.

:class:`Linear4bit` holds a bitsandbytes-layout 4-bit weight (:mod:`fastlora.nf4`: NF4 / FP4,
double quant or not) and computes ``x·dequant(W)ᵀ + bias`` with :func:`fastlora.ops.linear_4bit`
in x's dtype. It needs no bitsandbytes and runs on the CPU.

- Frozen weight: the packed codes and their statistics are non-persistent BUFFERS, not parameters.
  ``model.parameters()`` shows only the bias (if any), so optimizers, ``requires_grad_(True)``,
  gradient checkpointing and PEFT's freezing never see a uint8 tensor (bitsandbytes exposes a
  ``Params4bit`` with requires_grad=False instead; PEFT's ``print_trainable_parameters`` therefore
  counts fewer total parameters for this layer than for a bitsandbytes one). ``module.weight`` is
  the packed codes, ``(ceil(N*K / (2*itemsize)), 1)`` of the quant_storage dtype, like bitsandbytes'.
- Casts do not touch the weight: ``model.to(torch.bfloat16)`` / ``.half()`` / ``.type(...)`` cast the
  bias only; ``.to(device)`` / ``.cuda()`` move everything (``_apply`` keeps the codes' and
  statistics' dtypes whatever the function does).
- ``state_dict()`` has exactly bitsandbytes ``Linear4bit``'s keys and formats (DESIGN.md §2):
  ``weight``, ``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``,
  ``weight.nested_quant_map`` (double quant), ``weight.quant_state.bitsandbytes__nf4|fp4`` and
  ``bias``; ``load_state_dict`` takes bitsandbytes' state dict of a quantized layer (a weight of
  another quant_type / blocksize / double quant is taken as it is; the shape must match).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import nf4
from ..ops.linear_4bit import linear_4bit
from . import _conv1d

# Buffer names of the weight's tensors (state_dict keys come from nf4.QuantizedWeight.state_dict).
_PACKED, _ABSMAX, _CODE = "weight", "weight_absmax", "weight_quant_map"
_NESTED = ("weight_nested_absmax", "weight_nested_quant_map", "weight_nested_offset")
_WEIGHT_BUFFERS = (_PACKED, _ABSMAX, _CODE, *_NESTED)


class Linear4bit(nn.Module):
    """A frozen 4-bit linear layer: ``y = x·dequant(W)ᵀ + bias`` in x's dtype.

    Args:
      qweight: the weight, logical shape (out_features, in_features).
      bias: (out_features,) parameter or None, kept as the same object (trainable if it was); cast
        to x's dtype in forward when it differs (differentiably; the parameter is not modified).
      backend: passed to :func:`fastlora.ops.linear_4bit`.

    Build one from an ``nn.Linear`` with :meth:`from_linear`.
    """

    def __init__(self, qweight: nf4.QuantizedWeight, bias: nn.Parameter | None = None, *, backend: str = "auto"):
        super().__init__()
        if not isinstance(qweight, nf4.QuantizedWeight):
            raise TypeError(f"qweight must be a fastlora.nf4.QuantizedWeight, got {type(qweight).__name__}")
        if len(qweight.shape) != 2:
            raise ValueError(f"qweight must be 2-D (out_features, in_features), got shape {tuple(qweight.shape)}")
        if bias is not None and not isinstance(bias, nn.Parameter):
            raise TypeError(f"bias must be an nn.Parameter or None, got {type(bias).__name__}")
        if bias is not None and tuple(bias.shape) != (qweight.shape[0],):
            raise ValueError(f"bias must have shape ({qweight.shape[0]},), got {tuple(bias.shape)}")
        self.backend = backend
        self._set_weight(qweight)
        self.bias = bias

    def _set_weight(self, q: nf4.QuantizedWeight) -> None:
        self.out_features, self.in_features = int(q.shape[0]), int(q.shape[1])
        self.quant_type, self.blocksize, self.weight_dtype = q.quant_type, q.blocksize, q.dtype
        self.nested_blocksize = None if q.nested is None else q.nested.blocksize
        self.register_buffer(_PACKED, q.packed, persistent=False)
        self.register_buffer(_ABSMAX, q.absmax, persistent=False)
        self.register_buffer(_CODE, q.code, persistent=False)
        nested = (None, None, None) if q.nested is None else (q.nested.absmax2, q.nested.code, q.nested.offset)
        for name, tensor in zip(_NESTED, nested, strict=True):
            self.register_buffer(name, tensor, persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                    backend: str = "auto") -> Linear4bit:
        """Quantize ``linear.weight`` (float32 / bfloat16 / float16, any shape) with
        :func:`fastlora.nf4.quantize` on its device; ``linear`` itself is not modified and the new layer
        takes its bias parameter (the same object). A transformers ``Conv1D`` (weight stored (in, out))
        is taken too: its weight is quantized transposed, as (out, in)."""
        if _conv1d.is_conv1d(linear):
            weight = linear.weight.detach().t().contiguous()
        elif isinstance(linear, nn.Linear):
            weight = linear.weight.detach()
        else:
            raise TypeError(f"linear must be a torch.nn.Linear or transformers Conv1D, got {type(linear).__name__}")
        q = nf4.quantize(weight, blocksize, quant_type, double_quant)
        return cls(q, linear.bias, backend=backend)

    def quantized_weight(self) -> nf4.QuantizedWeight:
        """The weight as a :class:`fastlora.nf4.QuantizedWeight` sharing this layer's buffers."""
        nested = None
        if self.nested_blocksize is not None:
            nested = nf4.NestedStats(absmax2=self.weight_nested_absmax, code=self.weight_nested_quant_map,
                                     offset=self.weight_nested_offset, blocksize=self.nested_blocksize)
        return nf4.QuantizedWeight(packed=self.weight, absmax=self.weight_absmax,
                                   shape=torch.Size((self.out_features, self.in_features)), dtype=self.weight_dtype,
                                   blocksize=self.blocksize, quant_type=self.quant_type, code=self.weight_quant_map,
                                   nested=nested)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias
        if bias is not None and isinstance(x, torch.Tensor) and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        return linear_4bit(x, self.quantized_weight(), bias, backend=self.backend)

    def _apply(self, fn, recurse=True):
        # A dtype cast (model.to(bf16), .half(), .type()) must not reinterpret codes or statistics:
        # keep each weight tensor's dtype and take only the device the function gave it.
        before = {name: self._buffers[name] for name in _WEIGHT_BUFFERS if self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key, value in self.quantized_weight().state_dict(prefix + "weight").items():
            destination[key] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        head = prefix + "weight"
        weight_keys = [k for k in state_dict if k == head or k.startswith(head + ".")]
        if head not in state_dict:
            missing_keys.append(head)
        else:
            try:
                q = nf4.from_state_dict({k[len(prefix):]: state_dict[k] for k in weight_keys}, "weight")
            except (ValueError, TypeError, KeyError) as exc:
                error_msgs.append(f"{head}: not a 4-bit weight in bitsandbytes' format: {exc}")
            else:
                want = (self.out_features, self.in_features)
                if tuple(q.shape) != want:
                    error_msgs.append(f"size mismatch for {head}: the checkpoint's 4-bit weight has shape "
                                      f"{tuple(q.shape)}, this layer is {want}")
                else:
                    self._set_weight(_copied(q, self.weight.device))
        rest = {k: v for k, v in state_dict.items() if k not in weight_keys}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.nested_blocksize is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"fastlora 4-bit {self.quant_type} (blocksize={self.blocksize}{dq})")


def _copied(q: nf4.QuantizedWeight, device: torch.device) -> nf4.QuantizedWeight:
    """``q`` with every tensor copied to ``device`` (loading must not alias the caller's tensors)."""
    def c(t):
        return t.detach().to(device, copy=True)

    nested = None
    if q.nested is not None:
        n = q.nested
        nested = nf4.NestedStats(absmax2=c(n.absmax2), code=c(n.code), offset=c(n.offset), blocksize=n.blocksize)
    return nf4.QuantizedWeight(packed=c(q.packed), absmax=c(q.absmax), shape=q.shape, dtype=q.dtype,
                               blocksize=q.blocksize, quant_type=q.quant_type, code=c(q.code), nested=nested)


def _matches(name: str, patterns) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def _skipped(name: str, skip) -> bool:
    """Whether ``name`` or a module containing it matches a ``skip`` suffix."""
    parts = name.split(".")
    return any(_matches(".".join(parts[:i]), skip) for i in range(1, len(parts) + 1))


def _is_adapter(name: str) -> bool:
    # PEFT keeps its LoRA matrices as nn.Linear children of lora_A / lora_B ModuleDicts: never quantize those.
    return any(part in ("lora_A", "lora_B") for part in name.split("."))


def quantize_linears(model: nn.Module, *, target_modules="all-linear", quant_type: str = "nf4", blocksize: int = 64,
                     double_quant: bool = True, skip=("lm_head",), backend: str = "auto") -> list[str]:
    """Replace ``model``'s ``nn.Linear`` layers by :class:`Linear4bit`, in place (the point of the
    call: the model is modified), keeping module names and bias parameters. Returns the replaced names.

    ``target_modules``: "all-linear" (every module whose type is exactly ``nn.Linear`` or transformers'
    ``Conv1D``, except PEFT adapter matrices) or a list of name suffixes ("q_proj" matches
    "model.layers.0.self_attn.q_proj"); every module a suffix matches must be one of those. ``skip``: name
    suffixes of modules left dense, with everything inside them (by default the output head,
    often tied to the embedding).
    Any weight shape works (bitsandbytes 0.50's native CPU dequantization is wrong for rows that are
    not a multiple of the blocksize, so its CPU layers disagree there; fastlora's does not).
    All-or-nothing: if any weight fails to quantize, nothing is replaced.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(skip, str):
        skip = (skip,)
    if target_modules == "all-linear":
        suffixes = None
    elif isinstance(target_modules, (list, tuple)) and target_modules and all(
            isinstance(s, str) and s for s in target_modules):
        suffixes = tuple(target_modules)
    else:
        raise ValueError(f"target_modules must be 'all-linear' or a non-empty list of module name suffixes, got "
                         f"{target_modules!r}")
    chosen: list[tuple[str, nn.Linear]] = []
    for name, module in model.named_modules():
        if not name or _skipped(name, skip) or _is_adapter(name):
            continue
        if suffixes is None:
            if type(module) is nn.Linear or _conv1d.is_conv1d(module):
                chosen.append((name, module))
        elif _matches(name, suffixes):
            if type(module) is not nn.Linear and not _conv1d.is_conv1d(module):
                raise TypeError(f"target_modules matched {name!r}, a {type(module).__module__}."
                                f"{type(module).__name__}; only torch.nn.Linear and transformers Conv1D layers "
                                f"can be quantized")
            chosen.append((name, module))
    if not chosen:
        raise ValueError(f"quantize_linears: no nn.Linear matched target_modules={target_modules!r} "
                         f"(skip={tuple(skip)!r})")
    replacements = []
    for name, linear in chosen:
        try:
            new = Linear4bit.from_linear(linear, quant_type=quant_type, blocksize=blocksize,
                                         double_quant=double_quant, backend=backend)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"quantize_linears: cannot quantize {name!r}: {exc}") from exc
        new.train(linear.training)
        parent_name, _, child = name.rpartition(".")
        replacements.append((model.get_submodule(parent_name) if parent_name else model, child, linear, new))
    done = []
    try:
        for parent, child, old, new in replacements:
            setattr(parent, child, new)
            done.append((parent, child, old))
    except BaseException:
        for parent, child, old in done:
            setattr(parent, child, old)
        raise
    return [name for name, _ in chosen]
