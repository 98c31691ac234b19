"""bitsandbytes-compatible 4-bit weights (NF4 / FP4, optional double quant).

A :class:`QuantizedWeight` holds exactly what a bitsandbytes ``Params4bit`` + ``QuantState`` hold,
in the same layout (DESIGN.md §2), so weights move between the two without copying and bytes,
statistics and dequantized values are identical:

``packed``      codes, shape ``(ceil(numel / (2 * itemsize)), 1)`` in ``quant_storage`` dtype
                (uint8 by default); byte j = (code[2j] << 4) | code[2j+1]
``absmax``      float32[blocks], or uint8[blocks] when double-quantized (``nested`` is then set)
``shape``       logical ``(out_features, in_features)`` (any shape works)
``dtype``       dtype of the weight before quantization (the default dequantization dtype)
``nested``      :class:`NestedStats`: absmax2 float32[ceil(blocks/256)], code float32[256],
                blocksize 256, offset float32 scalar

Functions: :func:`quantize`, :func:`dequantize`, :func:`from_bnb`, :func:`to_bnb`,
:func:`from_state_dict`, and :meth:`QuantizedWeight.state_dict`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

from . import ops, reference
from .ops._registry import FLOAT_DTYPES, check_blocksize, check_float_dtype, check_quant_type, check_tensor

NESTED_BLOCKSIZE = 256
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass(frozen=True)
class NestedStats:
    """Second-level statistics of a double-quantized weight (uint8 absmax codes)."""

    absmax2: torch.Tensor  # float32[ceil(blocks / blocksize)]
    code: torch.Tensor  # float32[256]
    offset: torch.Tensor  # float32 scalar: mean of the first-level absmax
    blocksize: int = NESTED_BLOCKSIZE

    def __post_init__(self):
        # Checked here rather than in _validate so that no way of building a double-quant weight skips it.
        check_blocksize(self.blocksize, "nested blocksize")


@dataclass(frozen=True)
class QuantizedWeight:
    """A 4-bit weight in bitsandbytes' layout; see the module docstring for each field."""

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    code: torch.Tensor  # float32[16] code book (index -> value)
    nested: NestedStats | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def double_quant(self) -> bool:
        return self.nested is not None

    @property
    def quant_storage(self) -> torch.dtype:
        return self.packed.dtype

    def packed_bytes(self) -> torch.Tensor:
        """The codes as a flat uint8 view (no copy): uint8[ceil(numel / 2)]."""
        flat = self.packed.reshape(-1)
        if flat.dtype != torch.uint8:
            flat = flat.view(torch.uint8)
        return flat[: (self.numel + 1) // 2]

    def absmax_float(self, *, backend: str = "auto") -> torch.Tensor:
        """float32[blocks] absmax, resolving double quant (bit-exact with bitsandbytes)."""
        if self.nested is None:
            return self.absmax
        n = self.nested
        return ops.dequantize_absmax(self.absmax, n.code, n.absmax2, n.offset, n.blocksize, backend=backend)

    def to(self, device: torch.device | str) -> QuantizedWeight:
        """A copy on ``device`` (the same object when it is already there)."""
        device = torch.device(device)
        if self.packed.device == device:
            return self
        nested = None
        if self.nested is not None:
            nested = replace(self.nested, absmax2=self.nested.absmax2.to(device), code=self.nested.code.to(device),
                             offset=self.nested.offset.to(device))
        return replace(self, packed=self.packed.to(device), absmax=self.absmax.to(device),
                       code=self.code.to(device), nested=nested)

    def state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        """The entries a bitsandbytes ``Linear4bit`` saves for its weight: ``{prefix}`` (packed),
        ``{prefix}.absmax``, ``{prefix}.quant_map``, ``{prefix}.nested_absmax``,
        ``{prefix}.nested_quant_map`` and ``{prefix}.quant_state.bitsandbytes__{quant_type}``."""
        meta = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": _DTYPE_NAMES[self.dtype],
            "shape": list(self.shape),
        }
        out = {prefix: self.packed, f"{prefix}.absmax": self.absmax, f"{prefix}.quant_map": self.code}
        if self.nested is not None:
            out[f"{prefix}.nested_absmax"] = self.nested.absmax2
            out[f"{prefix}.nested_quant_map"] = self.nested.code.clone()
            meta.update(nested_blocksize=self.nested.blocksize, nested_dtype="float32",
                        nested_offset=float(self.nested.offset.item()))
        blob = torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
        out[f"{prefix}.quant_state.bitsandbytes__{self.quant_type}"] = blob
        return out

    def __repr__(self) -> str:
        dq = ", double_quant" if self.nested is not None else ""
        return (f"QuantizedWeight({self.quant_type}, shape={tuple(self.shape)}, blocksize={self.blocksize}{dq}, "
                f"dtype={_DTYPE_NAMES.get(self.dtype, self.dtype)}, device={self.device})")


def quantize(
    weight: torch.Tensor,
    blocksize: int = 64,
    quant_type: str = "nf4",
    double_quant: bool = True,
    *,
    quant_storage: torch.dtype = torch.uint8,
    backend: str = "auto",
) -> QuantizedWeight:
    """Quantize ``weight`` (float32 / bfloat16 / float16, finite) to 4 bits, byte-identical to
    ``bitsandbytes.functional.quantize_4bit(weight, blocksize, compress_statistics=double_quant,
    quant_type=quant_type, quant_storage=quant_storage)`` on the CPU. The input is not modified.

    With ``double_quant`` the 8-bit codes of the statistics follow bitsandbytes' kernel for the
    weight's device: its CPU quantizer for CPU tensors, its CUDA kernel for CUDA tensors (the two
    differ on ~0.2% of codes), so a weight quantized on a GPU matches bitsandbytes run on that GPU."""
    check_tensor(weight, "weight", FLOAT_DTYPES)
    check_blocksize(blocksize)
    check_quant_type(quant_type)
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be a bool, got {type(double_quant).__name__}")
    if not isinstance(quant_storage, torch.dtype) or quant_storage.is_complex:
        raise TypeError(f"quant_storage must be a real torch.dtype, got {quant_storage!r}")
    if weight.numel() and not bool(torch.isfinite(weight).all()):
        raise ValueError("weight must be finite: it contains NaN or Inf")
    packed, absmax = ops.quantize_4bit(weight, blocksize, quant_type, backend=backend)
    itemsize = quant_storage.itemsize
    if quant_storage != torch.uint8:
        if packed.numel() % itemsize:
            raise ValueError(f"quant_storage={quant_storage} needs the packed byte count ({packed.numel()}) to be a "
                             f"multiple of {itemsize}")
        packed = packed.view(quant_storage)
    packed = packed.unsqueeze(1)
    nested = None
    if double_quant and absmax.numel():
        offset = absmax.mean()
        code = reference.dynamic_map(absmax.device)
        qabsmax, absmax2 = ops.quantize_absmax(absmax - offset, code, NESTED_BLOCKSIZE, backend=backend)
        nested = NestedStats(absmax2=absmax2, code=code, offset=offset)
        absmax = qabsmax
    return QuantizedWeight(packed=packed, absmax=absmax, shape=torch.Size(weight.shape), dtype=weight.dtype,
                           blocksize=blocksize, quant_type=quant_type,
                           code=reference.code_table(quant_type, weight.device), nested=nested)


def dequantize(qweight: QuantizedWeight, dtype: torch.dtype | None = None, *, out: torch.Tensor | None = None,
               backend: str = "auto") -> torch.Tensor:
    """The dense weight, shape ``qweight.shape``, in ``dtype`` (default: the original dtype, or
    ``out``'s); bit-exact with ``bitsandbytes.functional.dequantize_4bit``. With ``out`` (a
    contiguous float tensor of ``qweight.numel`` elements, e.g. a reused workspace) the result is
    written there and ``out`` is returned viewed as ``qweight.shape`` (CPU backends)."""
    if not isinstance(qweight, QuantizedWeight):
        raise TypeError(f"qweight must be a fastlora.nf4.QuantizedWeight, got {type(qweight).__name__}")
    if out is not None:
        check_tensor(out, "out", FLOAT_DTYPES)
        if dtype is not None and dtype != out.dtype:
            raise ValueError(f"dtype={dtype} disagrees with out.dtype={out.dtype}")
        if out.numel() != qweight.numel:
            raise ValueError(f"out must have {qweight.numel} elements for shape {tuple(qweight.shape)}, "
                             f"got {out.numel()}")
        ops.dequantize_4bit_into(qweight.packed_bytes(), qweight.absmax_float(backend=backend), qweight.blocksize,
                                 qweight.quant_type, out, backend=backend)
        return out.view(qweight.shape)
    dtype = qweight.dtype if dtype is None else dtype
    check_float_dtype(dtype)
    absmax = qweight.absmax_float(backend=backend)
    flat = ops.dequantize_4bit(qweight.packed_bytes(), absmax, qweight.blocksize, qweight.quant_type,
                               qweight.numel, dtype, backend=backend)
    return flat.view(qweight.shape)


def _validate(qweight: QuantizedWeight) -> QuantizedWeight:
    """Check that the pieces of a weight fit together (used on everything that comes from outside)."""
    check_blocksize(qweight.blocksize, "quant_state.blocksize")
    check_quant_type(qweight.quant_type)
    check_float_dtype(qweight.dtype, "quant_state.dtype")
    numel = qweight.numel
    if qweight.packed.numel() * qweight.packed.element_size() < (numel + 1) // 2:
        raise ValueError(f"packed weight holds {qweight.packed.numel() * qweight.packed.element_size()} bytes, "
                         f"shape {tuple(qweight.shape)} needs {(numel + 1) // 2}")
    blocks = -(-numel // qweight.blocksize)
    if qweight.absmax.numel() != blocks:
        raise ValueError(f"absmax has {qweight.absmax.numel()} values, shape {tuple(qweight.shape)} with blocksize "
                         f"{qweight.blocksize} needs {blocks}")
    want_absmax = torch.uint8 if qweight.nested is not None else torch.float32
    check_tensor(qweight.absmax, "absmax (nested: uint8 codes)" if qweight.nested else "absmax", (want_absmax,))
    devices = {qweight.packed.device, qweight.absmax.device}
    if qweight.nested is not None:
        devices.add(qweight.nested.absmax2.device)
    if len(devices) > 1:
        raise ValueError(f"packed weight and statistics must be on one device, got {sorted(map(str, devices))}")
    return qweight


def from_bnb(param) -> QuantizedWeight:
    """View a bitsandbytes ``Params4bit`` (quantized, with its ``quant_state``) as a QuantizedWeight.

    Nothing is copied: ``packed`` is ``param.data`` and the statistics are the quant state's own
    tensors. A weight that bitsandbytes repacked for its AVX512-BF16 CPU path
    (``quant_state.packing_format_for_cpu``) is not in the standard layout and is refused."""
    state = getattr(param, "quant_state", None)
    if state is None:
        raise ValueError("param must be a quantized bitsandbytes Params4bit with a quant_state "
                         "(move it to its device or call .quantize first)")
    if getattr(state, "packing_format_for_cpu", False):
        raise ValueError("param is in bitsandbytes' CPU-repacked layout (quant_state.packing_format_for_cpu=True, "
                         "set by Linear4bit.forward in eval mode on AVX512-BF16 CPUs); convert it back with "
                         "bitsandbytes before viewing it, or quantize the dense weight with fastlora")
    data = param.data if isinstance(param, torch.nn.Parameter) else param
    nested = None
    if getattr(state, "nested", False):
        s2 = state.state2
        check_blocksize(s2.blocksize, "quant_state.state2.blocksize")
        offset = state.offset if isinstance(state.offset, torch.Tensor) else torch.tensor(float(state.offset))
        nested = NestedStats(absmax2=s2.absmax, code=s2.code, offset=offset.float(), blocksize=int(s2.blocksize))
    code = state.code if state.code is not None else reference.code_table(state.quant_type, data.device)
    qweight = QuantizedWeight(packed=data, absmax=state.absmax, shape=torch.Size(state.shape), dtype=state.dtype,
                              blocksize=int(state.blocksize), quant_type=state.quant_type, code=code, nested=nested)
    return _validate(qweight)


def to_bnb(qweight: QuantizedWeight, *, requires_grad: bool = False):
    """A bitsandbytes ``Params4bit`` sharing ``qweight``'s tensors (needs bitsandbytes)."""
    if not isinstance(qweight, QuantizedWeight):
        raise TypeError(f"qweight must be a fastlora.nf4.QuantizedWeight (see fastlora.nf4.quantize / from_bnb), "
                        f"got {type(qweight).__name__}")
    if not isinstance(requires_grad, bool):
        raise TypeError(f"requires_grad must be a bool, got {type(requires_grad).__name__}")
    try:
        import bitsandbytes as bnb
        from bitsandbytes.functional import QuantState
    except ImportError as exc:
        raise ImportError("fastlora.nf4.to_bnb needs bitsandbytes (pip install bitsandbytes)") from exc
    state2 = offset = None
    if qweight.nested is not None:
        n = qweight.nested
        state2 = QuantState(absmax=n.absmax2, code=n.code, blocksize=n.blocksize, dtype=torch.float32)
        offset = n.offset
    state = QuantState(absmax=qweight.absmax, shape=qweight.shape, code=qweight.code, blocksize=qweight.blocksize,
                       quant_type=qweight.quant_type, dtype=qweight.dtype, offset=offset, state2=state2)
    return bnb.nn.Params4bit(data=qweight.packed, requires_grad=requires_grad, quant_state=state,
                             blocksize=qweight.blocksize, compress_statistics=qweight.nested is not None,
                             quant_type=qweight.quant_type, quant_storage=qweight.packed.dtype, bnb_quantized=True)


def _tensor_entry(state_dict: Mapping, key: str) -> torch.Tensor:
    value = state_dict[key]
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"state_dict['{key}'] must be a torch.Tensor, got {type(value).__name__}")
    return value


def _quant_state_meta(state_dict: Mapping, key: str, nested: bool) -> tuple[dict, bool]:
    """The JSON settings bitsandbytes packs into ``state_dict[key]``, checked to hold every key this module
    reads, and whether they describe a double-quantized weight (also true when ``nested`` is: the state dict
    holds nested tensors)."""
    blob = _tensor_entry(state_dict, key)
    try:
        meta = json.loads(bytes(blob.to(torch.uint8).reshape(-1).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"state_dict['{key}'] must hold bitsandbytes' quant state as UTF-8 JSON bytes; "
                         f"it does not parse ({exc})") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"state_dict['{key}'] must hold a JSON object, got a JSON {type(meta).__name__}")
    nested = nested or any(k in meta for k in ("nested_offset", "nested_blocksize", "nested_absmax"))
    required = ["quant_type", "blocksize", "dtype", "shape"] + (["nested_blocksize", "nested_offset"] if nested else [])
    missing = [k for k in required if k not in meta]
    if missing:
        raise ValueError(f"state_dict['{key}'] (the quant state) is missing {', '.join(map(repr, missing))}"
                         f"{' of a double-quantized weight' if nested else ''}")
    if meta["dtype"] not in _DTYPE_NAMES.values():
        raise ValueError(f"'dtype' in state_dict['{key}'] must be one of {', '.join(_DTYPE_NAMES.values())}, "
                         f"got {meta['dtype']!r}")
    shape = meta["shape"]
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise ValueError(f"'shape' in state_dict['{key}'] must be a list of non-negative ints, got {shape!r}")
    check_blocksize(meta["blocksize"], f"'blocksize' in state_dict['{key}']")
    if nested:
        check_blocksize(meta["nested_blocksize"], f"'nested_blocksize' in state_dict['{key}']")
        offset = meta["nested_offset"]
        if isinstance(offset, bool) or not isinstance(offset, (int, float)):
            raise ValueError(f"'nested_offset' in state_dict['{key}'] must be a number, got {offset!r}")
    return meta, nested


def from_state_dict(state_dict: dict[str, torch.Tensor], prefix: str = "weight") -> QuantizedWeight:
    """Rebuild a weight from the entries a bitsandbytes ``Linear4bit`` saved (``{prefix}``,
    ``{prefix}.absmax``, ``{prefix}.quant_map``, ``{prefix}.nested_*``,
    ``{prefix}.quant_state.bitsandbytes__nf4|fp4``)."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
    blob_keys = [k for k in state_dict if isinstance(k, str) and k.startswith(f"{prefix}.quant_state.bitsandbytes__")]
    if len(blob_keys) != 1:
        raise ValueError(f"state_dict must hold exactly one '{prefix}.quant_state.bitsandbytes__<nf4|fp4>' entry, "
                         f"found {blob_keys}")
    for key in (prefix, f"{prefix}.absmax"):
        if key not in state_dict:
            raise ValueError(f"state_dict is missing '{key}'")
    meta, nested_meta = _quant_state_meta(state_dict, blob_keys[0], f"{prefix}.nested_absmax" in state_dict)
    quant_type = meta["quant_type"]
    check_quant_type(quant_type)
    packed = _tensor_entry(state_dict, prefix)
    nested = None
    if nested_meta:
        for key in (f"{prefix}.nested_absmax", f"{prefix}.nested_quant_map"):
            if key not in state_dict:
                raise ValueError(f"state_dict is missing '{key}' of a double-quantized weight")
        nested = NestedStats(absmax2=_tensor_entry(state_dict, f"{prefix}.nested_absmax").float(),
                             code=_tensor_entry(state_dict, f"{prefix}.nested_quant_map").float(),
                             offset=torch.tensor(float(meta["nested_offset"]), dtype=torch.float32),
                             blocksize=meta["nested_blocksize"])
    code_key = f"{prefix}.quant_map"
    code = reference.code_table(quant_type, packed.device) if code_key not in state_dict else \
        _tensor_entry(state_dict, code_key).float()
    qweight = QuantizedWeight(packed=packed, absmax=_tensor_entry(state_dict, f"{prefix}.absmax"),
                              shape=torch.Size(meta["shape"]), dtype=getattr(torch, meta["dtype"]),
                              blocksize=meta["blocksize"], quant_type=quant_type, code=code, nested=nested)
    return _validate(qweight)
