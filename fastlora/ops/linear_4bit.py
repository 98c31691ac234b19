"""fastlora::linear_4bit_fwd / linear_4bit_bwd and the autograd op ``linear_4bit``:
``y = x·dequant(W)ᵀ + bias`` over a FROZEN 4-bit weight W (no LoRA), e.g. the base layers of a
BitFit / prompt-tuning model or the linears a LoRA does not target.

Shapes and dtypes (K = in_features, N = out_features):
  x        (..., K)  float32 / bfloat16 / float16 (float64: reference backend only)
  weight   :class:`fastlora.nf4.QuantizedWeight` or a bitsandbytes ``Params4bit`` of logical shape
           (N, K); nf4 / fp4, double quant or not, any quant_storage
  bias     (N,) of x's dtype, or None
  returns  y (..., N) of x's dtype
The weight is decoded to x's dtype exactly as ``bitsandbytes.functional.dequantize_4bit`` does
(bit-exact, DESIGN.md §2), then one GEMM in x's dtype (``F.linear``), which is what bitsandbytes'
CPU / default ``gemm_4bit`` computes: on the CPU the outputs are bit-identical to it. float64 x
multiplies with the float32-decoded weight (exactly representable), like bitsandbytes would.

Saved for backward, through ``ctx.save_for_backward``: only the weight's own packed tensors
(references: codes, absmax, and for double quant the 8-bit code book, second-level absmax and
offset). Not x, not y, not the decoded weight: backward decodes W again and returns
dx = grad_y·W (if x requires grad) and dbias = grad_y summed over all leading dimensions (fp32
accumulation, if bias requires grad: BitFit trains the biases of frozen 4-bit linears). W never
receives a gradient.

Decoding writes into a workspace (``fastlora::dequantize_4bit_into``): on the CPU one buffer per
thread and dtype, grown to the largest weight seen and kept (a fresh buffer per call costs more in
page faults than the decode); on a GPU the caching allocator already reuses memory and a shared
buffer would race across streams, so each call takes a fresh one there.
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F

from .. import backends
from ._registry import FLOAT_DTYPES, backend_op, check_same_device, check_tensor, define_decode_ops
from .dequantize_absmax import dequantize_absmax

FWD_SCHEMA = ("(Tensor x, Tensor packed, Tensor absmax, int blocksize, str quant_type, int out_features, "
              "Tensor? bias) -> Tensor")
BWD_SCHEMA = "(Tensor grad_y, Tensor packed, Tensor absmax, int blocksize, str quant_type, int in_features) -> Tensor"
# The ops are defined here in Python (there is no C++ linear_4bit kernel): each decodes with the
# dequantize_4bit_into overload of the same suffix, and the GEMM is torch's in every backend.
_local = threading.local()


def _workspace(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if device.type != "cpu":
        return torch.empty(numel, dtype=dtype, device=device)
    buffers = _local.__dict__.setdefault("buffers", {})
    buf = buffers.get(dtype)
    if buf is None or buf.numel() < numel:
        buf = buffers[dtype] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def _decode(suffix: str, packed, absmax, blocksize: int, quant_type: str, n: int, k: int, dtype) -> torch.Tensor:
    """The (n, k) weight in ``dtype``, decoded into the workspace (valid until the next decode)."""
    decode_dtype = torch.float32 if dtype == torch.float64 else dtype
    w = _workspace(n * k, decode_dtype, packed.device)
    getattr(torch.ops.fastlora, "dequantize_4bit_into" + suffix).default(packed, absmax, blocksize, quant_type, w)
    w = w.view(n, k)
    return w.double() if dtype == torch.float64 else w


def _impls(suffix: str) -> dict:
    def fwd(x, packed, absmax, blocksize, quant_type, out_features, bias):
        w = _decode(suffix, packed, absmax, blocksize, quant_type, out_features, x.shape[-1], x.dtype)
        return F.linear(x, w, bias)

    def bwd(grad_y, packed, absmax, blocksize, quant_type, in_features):
        w = _decode(suffix, packed, absmax, blocksize, quant_type, grad_y.shape[-1], in_features, grad_y.dtype)
        return torch.matmul(grad_y, w)

    return {"linear_4bit_fwd": fwd, "linear_4bit_bwd": bwd}


def _fwd_fake(x, packed, absmax, blocksize, quant_type, out_features, bias):
    return x.new_empty((*x.shape[:-1], out_features))


def _bwd_fake(grad_y, packed, absmax, blocksize, quant_type, in_features):
    return grad_y.new_empty((*grad_y.shape[:-1], in_features))


define_decode_ops(_impls, {"linear_4bit_fwd": FWD_SCHEMA, "linear_4bit_bwd": BWD_SCHEMA},
                  {"linear_4bit_fwd": _fwd_fake, "linear_4bit_bwd": _bwd_fake})


def _resolve_absmax(meta: tuple, tensors, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed bytes, float32 absmax): double-quant statistics resolved bit-exactly."""
    nested_blocksize = meta[0]
    if nested_blocksize is None:
        return tensors[0], tensors[1]
    packed, qabsmax, code, absmax2, offset = tensors
    return packed, dequantize_absmax(qabsmax, code, absmax2, offset, nested_blocksize, backend=backend)


class _Linear4bitFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, meta, backend, *weight_tensors):
        _, blocksize, quant_type, (n, k) = meta
        packed, absmax = _resolve_absmax(meta, weight_tensors, backend)
        y = backend_op("linear_4bit_fwd", backend)(x, packed, absmax, blocksize, quant_type, n, bias)
        ctx.save_for_backward(*weight_tensors)
        ctx.meta, ctx.backend = meta, backend
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y):
        weight_tensors = ctx.saved_tensors
        _, blocksize, quant_type, (n, k) = ctx.meta
        need_dx, need_dbias = ctx.needs_input_grad[:2]
        dx = dbias = None
        if need_dx:
            packed, absmax = _resolve_absmax(ctx.meta, weight_tensors, ctx.backend)
            dx = backend_op("linear_4bit_bwd", ctx.backend)(grad_y, packed, absmax, blocksize, quant_type, k)
        if need_dbias:
            wide = torch.float64 if grad_y.dtype == torch.float64 else torch.float32
            dbias = grad_y.reshape(-1, n).sum(0, dtype=wide).to(ctx.bias_dtype)
        return dx, dbias, None, None, *([None] * len(weight_tensors))


def _as_quantized(weight):
    from .. import nf4

    if isinstance(weight, nf4.QuantizedWeight):
        return weight
    if hasattr(weight, "quant_state"):
        return nf4.from_bnb(weight)  # a bitsandbytes Params4bit, viewed without copying
    raise TypeError(f"weight must be a fastlora.nf4.QuantizedWeight or a bitsandbytes Params4bit, got "
                    f"{type(weight).__name__} (a dense weight needs no fastlora op: use torch.nn.functional.linear)")


def linear_4bit(x: torch.Tensor, weight, bias: torch.Tensor | None = None, *, backend: str = "auto") -> torch.Tensor:
    """``x·dequant(W)ᵀ + bias`` for a frozen 4-bit W; see the module docstring.

    Args:
      x: (..., in_features), float32 / bfloat16 / float16 (float64 runs the reference backend).
      weight: :class:`fastlora.nf4.QuantizedWeight` or bitsandbytes ``Params4bit``, logical shape
        (out_features, in_features); decoded to x's dtype. It never receives a gradient.
      bias: (out_features,) of x's dtype, or None.
      backend: "auto", "reference", "cpp", "triton" or "cuda" (see fastlora.backends): which
        kernel decodes the weight; the GEMMs are torch's.

    Returns: (..., out_features) in x's dtype.
    """
    check_tensor(x, "x", (*FLOAT_DTYPES, torch.float64))
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension (..., in_features), got a scalar")
    q = _as_quantized(weight)
    if len(q.shape) != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(q.shape)}")
    out_features, in_features = q.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"x's last dimension must be weight's in_features={in_features}, got x of shape "
                         f"{tuple(x.shape)}")
    if bias is not None:
        check_tensor(bias, "bias", ndim=1)
        if bias.dtype != x.dtype:
            raise TypeError(f"bias must have x's dtype {x.dtype}, got {bias.dtype}")
        if bias.shape[0] != out_features:
            raise ValueError(f"bias must have out_features={out_features} elements, got {bias.shape[0]}")
    tensors = dict(x=x, weight=q.packed)
    if bias is not None:
        tensors["bias"] = bias
    check_same_device(**tensors)
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    implemented = ("reference",) if x.dtype == torch.float64 else backends.BACKENDS
    chosen = backends.resolve(backend, x.device, implemented, backends.GPU_ORDER_CUDA_FIRST)

    nested = q.nested
    weight_tensors = [q.packed_bytes(), q.absmax]
    if nested is not None:
        weight_tensors += [nested.code, nested.absmax2, nested.offset.reshape(())]
    meta = (None if nested is None else nested.blocksize, q.blocksize, q.quant_type, (out_features, in_features))
    if math.prod(x.shape[:-1]) == 0:
        return F.linear(x, x.new_zeros(out_features, in_features), bias)
    return _Linear4bitFunction.apply(x, bias, meta, chosen, *(t.detach() for t in weight_tensors))
