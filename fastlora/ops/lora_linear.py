"""fastlora::lora_linear_fwd / lora_linear_bwd and the autograd op ``lora_linear``:
``y = x·Wᵀ + bias + scaling · (dropout(x)·Aᵀ)·Bᵀ`` over a frozen dense or 4-bit weight W.

Shapes and dtypes (M tokens, K = in_features, N = out_features, r = rank):
  x        (M, K)   float32 / bfloat16 / float16 (float64: reference backend)
  weight   dense (N, K) of x's dtype, or 4-bit: uint8[ceil(N*K/2)] codes with ``absmax``
           float32[ceil(N*K/blocksize)] (resolved); decoded to x's dtype, like bitsandbytes does
  lora_A   (r, K), lora_B (N, r): float32, or x's dtype
  bias     (N,) of x's dtype, or None
  returns  y (M, N) of x's dtype and S = dropout(x)·Aᵀ (M, r) of lora_A's dtype
Rounding follows PEFT exactly (fastlora/reference_lora.py has the formulas): ``"linear"`` is
``peft.tuners.lora.Linear``, ``"linear4bit"`` is ``peft.tuners.lora.bnb.Linear4bit``.

Saved for backward, all through ``ctx.save_for_backward``: x, S, lora_A, lora_B, the weight's own
tensors (references, no copies: dense weight, or packed codes + raw statistics) and the dropout
seed (an int64 0-dim tensor on x's device, see fastlora/ops/_dropout_seed.py). Never the decoded
weight, the dropout mask, dropout(x) or y: backward decodes the weight again and regenerates the
mask from the seed with Philox. The seed is a tensor argument of the ops (``Tensor seed``) and is
never read on the host here, so torch.compile traces the op without a graph break.
"""

from __future__ import annotations

import math

import torch

from .. import backends, reference_lora, tuning
from ._dropout_seed import call_site_of, consume_seed, draw_seed, no_seed
from ._leading_dims import as_input_grad, as_output, flatten_2d, flatten_grad
from ._registry import FLOAT_DTYPES, backend_op, check_same_device, check_tensor, define_native
from .dequantize_absmax import dequantize_absmax
from .lora_dropout import check_dropout_p, check_training

FWD_SCHEMA = (
    "(Tensor x, Tensor weight, Tensor? absmax, int blocksize, str quant_type, int out_features, "
    "Tensor lora_A, Tensor lora_B, float scaling, Tensor? bias, float dropout_p, Tensor seed, str rounding) "
    "-> (Tensor, Tensor)"
)
BWD_SCHEMA = (
    "(Tensor grad_y, Tensor x, Tensor S, Tensor weight, Tensor? absmax, int blocksize, str quant_type, "
    "int out_features, Tensor lora_A, Tensor lora_B, float scaling, float dropout_p, Tensor seed, "
    "bool need_dx, bool need_dA, bool need_dB) -> (Tensor, Tensor, Tensor)"
)
MAX_RANK = 256
CUDA_MAX_ROWS = 16  # the CUDA forward kernel's M limit (csrc/cuda/lora_linear.h, kLoraMaxRows)

define_native("lora_linear_fwd", FWD_SCHEMA, reference_lora.lora_linear_fwd)
define_native("lora_linear_bwd", BWD_SCHEMA, reference_lora.lora_linear_bwd)


# ---------------------------------------------------------------------------------------------
# forward op


def _fake_fwd(x, weight, absmax, blocksize, quant_type, out_features, lora_A, lora_B, scaling, bias, dropout_p,
              seed, rounding):
    return x.new_empty((x.shape[0], out_features)), lora_A.new_empty((x.shape[0], lora_A.shape[0]))


torch.library.register_fake("fastlora::lora_linear_fwd")(_fake_fwd)


@torch.library.custom_op("fastlora::lora_linear_fwd_reference", mutates_args=())
def _fwd_reference(
    x: torch.Tensor, weight: torch.Tensor, absmax: torch.Tensor | None, blocksize: int, quant_type: str,
    out_features: int, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, bias: torch.Tensor | None,
    dropout_p: float, seed: torch.Tensor, rounding: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return reference_lora.lora_linear_fwd(x, weight, absmax, blocksize, quant_type, out_features, lora_A, lora_B,
                                          scaling, bias, dropout_p, seed, rounding)


@torch.library.custom_op("fastlora::lora_linear_fwd_triton", mutates_args=())
def _fwd_triton(
    x: torch.Tensor, weight: torch.Tensor, absmax: torch.Tensor | None, blocksize: int, quant_type: str,
    out_features: int, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, bias: torch.Tensor | None,
    dropout_p: float, seed: torch.Tensor, rounding: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels import lora_linear as triton_kernels

    return triton_kernels.lora_linear_fwd(x, weight, absmax, blocksize, quant_type, out_features, lora_A, lora_B,
                                          scaling, bias, dropout_p, seed, rounding)


_fwd_reference.register_fake(_fake_fwd)
_fwd_triton.register_fake(_fake_fwd)


# ---------------------------------------------------------------------------------------------
# backward op


def _fake_bwd(grad_y, x, S, weight, absmax, blocksize, quant_type, out_features, lora_A, lora_B, scaling,
              dropout_p, seed, need_dx, need_dA, need_dB):
    dx = x.new_empty(x.shape if need_dx else (0,))
    dA = lora_A.new_empty(lora_A.shape if need_dA else (0,))
    dB = lora_B.new_empty(lora_B.shape if need_dB else (0,))
    return dx, dA, dB


torch.library.register_fake("fastlora::lora_linear_bwd")(_fake_bwd)


@torch.library.custom_op("fastlora::lora_linear_bwd_reference", mutates_args=())
def _bwd_reference(
    grad_y: torch.Tensor, x: torch.Tensor, S: torch.Tensor, weight: torch.Tensor, absmax: torch.Tensor | None,
    blocksize: int, quant_type: str, out_features: int, lora_A: torch.Tensor, lora_B: torch.Tensor,
    scaling: float, dropout_p: float, seed: torch.Tensor, need_dx: bool, need_dA: bool, need_dB: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return reference_lora.lora_linear_bwd(grad_y, x, S, weight, absmax, blocksize, quant_type, out_features,
                                          lora_A, lora_B, scaling, dropout_p, seed, need_dx, need_dA, need_dB)


@torch.library.custom_op("fastlora::lora_linear_bwd_triton", mutates_args=())
def _bwd_triton(
    grad_y: torch.Tensor, x: torch.Tensor, S: torch.Tensor, weight: torch.Tensor, absmax: torch.Tensor | None,
    blocksize: int, quant_type: str, out_features: int, lora_A: torch.Tensor, lora_B: torch.Tensor,
    scaling: float, dropout_p: float, seed: torch.Tensor, need_dx: bool, need_dA: bool, need_dB: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels import lora_linear as triton_kernels

    return triton_kernels.lora_linear_bwd(grad_y, x, S, weight, absmax, blocksize, quant_type, out_features,
                                          lora_A, lora_B, scaling, dropout_p, seed, need_dx, need_dA, need_dB)


_bwd_reference.register_fake(_fake_bwd)
_bwd_triton.register_fake(_fake_bwd)


# ---------------------------------------------------------------------------------------------
# autograd


@torch.compiler.assume_constant_result  # a file read once: a constant to torch.compile, not a graph break
def _tuned_cuda_rows(device_index: int, k: int, n: int) -> int:
    return tuning.cuda_max_rows(tuning.key_of(torch.device("cuda", device_index)), k, n, CUDA_MAX_ROWS)


def _backends(backend: str, x: torch.Tensor, four_bit: bool, out_features: int) -> tuple[str, str]:
    """(forward backend, backward backend) for a call. float64 runs on the reference backend; the
    CUDA backend has only the small-M 4-bit forward (M <= CUDA_MAX_ROWS rows of x): backend "cuda"
    runs a dense weight's or a larger M's forward on Triton, and every backward on Triton.

    "auto" on a GPU takes the CUDA forward wherever it exists (on an H100, bench/bench_lora_gpu.py, nf4
    double quant, bf16, r=16, it ran M <= 16 forwards of 4096x4096 / 4096x14336 in 65-115 us against
    585-925 us for the Triton in-loop-decode kernel), up to the crossover saved for this GPU and shape by
    ``python -m fastlora bench --suite kernels --crossover --save-tuned`` (fastlora/tuning.py) where there is one."""
    if x.dtype == torch.float64:
        if backend not in ("auto", "reference"):
            if backend not in backends.BACKENDS:
                backends.resolve(backend, x.device)  # an unknown name is reported as such
            raise ValueError(f"backend {backend!r} has no float64 kernels: float64 x runs on backend 'reference' "
                             "(or 'auto')")
        chosen = backends.resolve(backend, x.device, ("reference",))
        return chosen, chosen
    rows = math.prod(x.shape[:-1])
    cuda_fits = (backend in ("cuda", "auto") and x.is_cuda and four_bit and rows <= CUDA_MAX_ROWS
                 and backends.available("cuda")["cuda"])
    if cuda_fits and backend == "auto":
        index = x.device.index if x.device.index is not None else torch.cuda.current_device()
        cuda_fits = rows <= _tuned_cuda_rows(index, x.shape[-1], out_features)
    if cuda_fits:
        fwd = "cuda"
    elif backend == "cuda" and x.is_cuda:
        fwd = backends.resolve("triton", x.device, _FULL_OPS)
    else:
        fwd = backends.resolve(backend, x.device, _FULL_OPS)
    if fwd != "cuda" and backend != "cuda":
        return fwd, fwd  # the backward's request is the forward's: resolved once (host time on every call)
    return fwd, backends.resolve("auto" if backend == "cuda" else backend, x.device, _FULL_OPS)


_FULL_OPS = ("reference", "cpp", "triton")  # backends with both the forward and the backward op


class _WeightParts:
    """The frozen weight as the kernels take it. Holds only metadata between forward and backward:
    the tensors themselves travel through ``ctx.save_for_backward``."""

    def __init__(self, shape, dense=None, packed=None, absmax=None, nested=None, blocksize=64, quant_type="nf4"):
        self.dense, self.packed, self.absmax, self.nested = dense, packed, absmax, nested
        self.blocksize, self.quant_type, self.shape = blocksize, quant_type, shape

    def tensors(self) -> list[torch.Tensor]:
        if self.dense is not None:
            return [self.dense]
        nested = [] if self.nested is None else [self.nested.code, self.nested.absmax2, self.nested.offset]
        return [self.packed, self.absmax, *nested]

    def meta(self) -> tuple:
        nested_blocksize = None if self.nested is None else self.nested.blocksize
        return (self.dense is not None, nested_blocksize, self.blocksize, self.quant_type)

    @staticmethod
    def kernel_args(meta: tuple, tensors) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, absmax) as the ops take them: absmax resolved to float32 when double-quantized."""
        dense, nested_blocksize = meta[:2]
        if dense:
            return tensors[0], None
        if nested_blocksize is None:
            return tensors[0], tensors[1]
        packed, qabsmax, code, absmax2, offset = tensors
        return packed, dequantize_absmax(qabsmax, code, absmax2, offset, nested_blocksize)


class _LoraLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lora_A, lora_B, bias, seed_t, call_site, meta, cfg, *weight_tensors):
        fwd_backend, bwd_backend, out_features, scaling, dropout_p, rounding = cfg
        blocksize, quant_type = meta[2:]
        weight, absmax = _WeightParts.kernel_args(meta, weight_tensors)
        x2d = flatten_2d(x)  # here, not in the caller: see fastlora/ops/_leading_dims.py
        y, S = backend_op("lora_linear_fwd", fwd_backend)(
            x2d, weight, absmax, blocksize, quant_type, out_features, lora_A, lora_B, scaling, bias,
            dropout_p, seed_t, rounding)
        ctx.save_for_backward(x2d, S, lora_A, lora_B, seed_t, *weight_tensors)
        ctx.meta, ctx.cfg, ctx.call_site, ctx.x_shape = meta, cfg, call_site, x.shape
        ctx.seed_entry = seed_t  # the stashed object itself: backward consumes it by identity
        return as_output(y, x.shape[:-1])

    @staticmethod
    def backward(ctx, grad_y):
        x2d, S, lora_A, lora_B, seed_t, *weight_tensors = ctx.saved_tensors
        grad_y = flatten_grad(grad_y)
        fwd_backend, bwd_backend, out_features, scaling, dropout_p, rounding = ctx.cfg
        blocksize, quant_type = ctx.meta[2:]
        need_dx, need_dA, need_dB, need_dbias = ctx.needs_input_grad[:4]
        dx = dA = dB = dbias = None
        if need_dx or need_dA or need_dB:
            weight, absmax = _WeightParts.kernel_args(ctx.meta, weight_tensors)
            gx, gA, gB = backend_op("lora_linear_bwd", bwd_backend)(
                grad_y.contiguous(), x2d, S, weight, absmax, blocksize, quant_type, out_features,
                lora_A, lora_B, scaling, dropout_p, seed_t, need_dx, need_dA, need_dB)
            dx = as_input_grad(gx, ctx.x_shape) if need_dx else None
            dA = gA if need_dA else None
            dB = gB if need_dB else None
        if need_dbias:
            wide = torch.float64 if grad_y.dtype == torch.float64 else torch.float32
            dbias = grad_y.sum(0, dtype=wide).to(grad_y.dtype)
        if dropout_p > 0.0:
            consume_seed(ctx.call_site, ctx.seed_entry)
        return dx, dA, dB, dbias, None, None, None, None, *([None] * len(weight_tensors))


# ---------------------------------------------------------------------------------------------
# public entry point


def _weight_parts(weight, x: torch.Tensor, prefix: str = "") -> _WeightParts:
    from .. import nf4

    if hasattr(weight, "quant_state") and not isinstance(weight, nf4.QuantizedWeight):
        weight = nf4.from_bnb(weight)  # a bitsandbytes Params4bit, viewed without copying
    if isinstance(weight, nf4.QuantizedWeight):
        if len(weight.shape) != 2:
            raise ValueError(f"{prefix}weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
        return _WeightParts(packed=weight.packed_bytes(), absmax=weight.absmax, nested=weight.nested,
                            blocksize=weight.blocksize, quant_type=weight.quant_type, shape=tuple(weight.shape))
    check_tensor(weight, f"{prefix}weight", (*FLOAT_DTYPES, torch.float64), ndim=2)
    if weight.dtype != x.dtype:
        raise TypeError(f"{prefix}weight must have x's dtype {x.dtype} (like F.linear), got {weight.dtype}")
    return _WeightParts(dense=weight.contiguous(), shape=tuple(weight.shape))


def check_projection(x: torch.Tensor, in_features: int, weight, lora_A, lora_B, scaling, bias, dropout_p,
                     rounding, prefix: str = "", input_desc: str = "x's last dimension") -> tuple[_WeightParts, str]:
    """Validate one LoRA projection applied to an input of x's dtype and device with ``in_features``
    columns; return its weight parts and the resolved rounding. Errors name the argument as
    ``prefix + name`` (e.g. "gate.lora_A") and the input as ``input_desc``."""
    parts = _weight_parts(weight, x, prefix)
    out_features, w_in = parts.shape
    if w_in != in_features:
        raise ValueError(f"{prefix}weight has in_features={w_in} but {input_desc} is {in_features}")
    check_tensor(lora_A, f"{prefix}lora_A", (torch.float32, x.dtype), ndim=2)
    check_tensor(lora_B, f"{prefix}lora_B", (torch.float32, x.dtype), ndim=2)
    if lora_A.dtype != lora_B.dtype:
        raise TypeError(f"{prefix}lora_A and {prefix}lora_B must have one dtype, got {lora_A.dtype} and "
                        f"{lora_B.dtype}")
    rank = lora_A.shape[0]
    if not (1 <= rank <= MAX_RANK):
        raise ValueError(f"{prefix}lora_A must have 1 to {MAX_RANK} rows (the rank), got {rank}")
    if lora_A.shape[1] != in_features:
        raise ValueError(f"{prefix}lora_A must be (r, in_features={in_features}), got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (out_features, rank):
        raise ValueError(f"{prefix}lora_B must be (out_features, r) = ({out_features}, {rank}), "
                         f"got {tuple(lora_B.shape)}")
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise TypeError(f"{prefix}scaling must be a float, got {type(scaling).__name__}")
    if not math.isfinite(scaling):
        raise ValueError(f"{prefix}scaling must be finite, got {scaling}")
    if bias is not None:
        check_tensor(bias, f"{prefix}bias", (x.dtype,), ndim=1)
        if bias.shape[0] != out_features:
            raise ValueError(f"{prefix}bias must have out_features={out_features} elements, got {bias.shape[0]}")
    try:
        check_dropout_p(dropout_p)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{prefix}{exc}") from None
    if rounding is None:
        rounding = "linear" if parts.dense is not None else "linear4bit"
    if rounding not in reference_lora.ROUNDINGS:
        raise ValueError(f"{prefix}rounding must be None, 'linear' or 'linear4bit', got {rounding!r}")
    devices = {"x": x, f"{prefix}weight": parts.tensors()[0], f"{prefix}lora_A": lora_A, f"{prefix}lora_B": lora_B}
    if bias is not None:
        devices[f"{prefix}bias"] = bias
    check_same_device(**devices)
    return parts, rounding


def lora_linear(
    x: torch.Tensor,
    weight,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    *,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
    rounding: str | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``x·Wᵀ + bias + scaling · (dropout(x)·Aᵀ)·Bᵀ`` with a backward that recomputes.

    Args:
      x: (..., in_features), float32 / bfloat16 / float16 (float64 runs the reference backend).
      weight: frozen base weight: a dense (out_features, in_features) tensor of x's dtype, a
        :class:`fastlora.nf4.QuantizedWeight` (nf4 / fp4, double quant or not) or a bitsandbytes
        ``Params4bit``; a 4-bit weight is decoded to x's dtype. It never receives a gradient.
      lora_A: (r, in_features), 1 <= r <= 256. lora_B: (out_features, r). Both float32 or both
        x's dtype; their gradients are computed in float32 and returned in their dtype.
      scaling: finite float, lora_alpha / r (or / sqrt(r) for rsLoRA).
      bias: (out_features,) of x's dtype, or None.
      dropout_p: LoRA dropout probability in [0, 1), active only when ``training``.
      rounding: "linear" (PEFT lora.Linear) or "linear4bit" (PEFT lora.bnb.Linear4bit); None
        picks what PEFT uses for this weight: "linear4bit" for 4-bit weights, else "linear".
      backend: "auto", "reference", "cpp", "triton" or "cuda" (see fastlora.backends).

    Returns: (..., out_features) in x's dtype.
    """
    check_tensor(x, "x", (*FLOAT_DTYPES, torch.float64))
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension (..., in_features), got a scalar")
    in_features = x.shape[-1]
    parts, rounding = check_projection(x, in_features, weight, lora_A, lora_B, scaling, bias, dropout_p, rounding)
    out_features = parts.shape[0]

    check_training(training)
    p = float(dropout_p) if training else 0.0
    call_site = call_site_of(lora_A)
    seed_t = draw_seed(call_site, x.device) if p > 0.0 else no_seed(x.device)
    fwd_backend, bwd_backend = _backends(backend, x, parts.dense is None, out_features)
    cfg = (fwd_backend, bwd_backend, out_features, float(scaling), p, rounding)
    return _LoraLinearFunction.apply(x, lora_A.contiguous(), lora_B.contiguous(), bias, seed_t, call_site,
                                     parts.meta(), cfg, *parts.tensors())

