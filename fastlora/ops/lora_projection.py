"""One LoRA projection as the grouped ops take it, and the per-projection plumbing they share.

A grouped op (``lora_gated_mlp``, ``lora_qkv``) runs several projections inside one autograd node.
Each projection is the math of ``lora_linear`` (``y = x·Wᵀ + bias + scaling · (dropout(x)·Aᵀ)·Bᵀ``,
PEFT's rounding) and runs on the same per-backend custom ops ``fastlora::lora_linear_fwd`` /
``lora_linear_bwd``, so every backend that has those has the grouped ops too.

A projection with a ``compute_dtype`` (a bitsandbytes layer whose compute dtype is not x's, e.g. fp32
hidden states after ``prepare_model_for_kbit_training`` into bf16-compute layers) is computed as PEFT
computes it: the base product by ``fastlora::linear_4bit_fwd`` / ``_bwd`` on x cast to the compute dtype,
its output cast back to x's dtype, plus the LoRA term on the uncast x (:mod:`fastlora.ops.lora_branch`'s
math). It saves the same tensors (S, the seed, the weight's own tensors).

Inside a grouped autograd.Function a projection travels as a flat run of tensors (so that
``ctx.save_for_backward`` and saved-tensor hooks see them all): ``lora_A, lora_B, bias, seed,
*weight_tensors`` (the weight's own tensors: the dense weight, or packed codes + raw statistics),
with its metadata in a :class:`PreparedProjection`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .. import backends
from ._dropout_seed import call_site_of, consume_seed, draw_seed, no_seed
from ._registry import FLOAT_DTYPES, backend_op, check_tensor
from .lora_branch import branch_backward, branch_forward
from .lora_dropout import check_training
from .lora_linear import _backends, _WeightParts, check_projection


class LoraProjection(NamedTuple):
    """A frozen base weight with one LoRA adapter, as ``fastlora.ops.lora_linear`` takes it.

    weight: dense (out, in) of x's dtype, a ``fastlora.nf4.QuantizedWeight`` or a bitsandbytes
      ``Params4bit``. lora_A (r, in), lora_B (out, r): float32 or x's dtype. scaling: float.
    bias: (out,) of x's dtype (of compute_dtype when that is set) or None. dropout_p: LoRA dropout in
      [0, 1). rounding: None, "linear" or "linear4bit" (None: PEFT's choice for the weight kind).
    compute_dtype: None, or the dtype the base product of a 4-bit weight runs in when it is not x's
      (bitsandbytes' ``compute_dtype``); lora_A and lora_B then have x's dtype.
    """

    weight: object
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    bias: torch.Tensor | None = None
    dropout_p: float = 0.0
    rounding: str | None = None
    compute_dtype: torch.dtype | None = None


class PreparedProjection(NamedTuple):
    """Metadata of one validated projection of one call (no tensors, besides the call-site key)."""

    meta: tuple  # _WeightParts.meta()
    n_weight: int  # how many weight tensors follow lora_A, lora_B, bias, seed in the flat run
    fwd_backend: str
    bwd_backend: str
    out_features: int
    scaling: float
    dropout_p: float  # 0 when not training
    rounding: str
    call_site: torch.Tensor | None  # the user's lora_A: the key of the dropout seed stash (None: compiling)
    compute_dtype: torch.dtype | None = None  # base product in this dtype (see the module docstring)
    dropout_backend: str = "auto"  # compute_dtype set: the backend of the LoRA term's dropout mask

    @property
    def width(self) -> int:
        """Number of tensors in this projection's flat run."""
        return 4 + self.n_weight


def prepare(x: torch.Tensor, in_features: int, proj, name: str, training: bool, backend: str,
            input_desc: str = "x's last dimension") -> tuple[PreparedProjection, list]:
    """Validate ``proj`` (a :class:`LoraProjection`) for an input of x's dtype/device with
    ``in_features`` columns; return its metadata and flat tensor run, with seed 0 in the run until
    :func:`draw_seeds` (called once every projection of the call is valid) fills it in."""
    if not isinstance(proj, LoraProjection):
        raise TypeError(f"{name} must be a fastlora.ops.LoraProjection, got {type(proj).__name__}")
    compute = proj.compute_dtype if proj.compute_dtype != x.dtype else None
    parts, rounding = check_projection(x, in_features, proj.weight, proj.lora_A, proj.lora_B, proj.scaling,
                                       proj.bias if compute is None else None, proj.dropout_p, proj.rounding,
                                       prefix=f"{name}.", input_desc=input_desc)
    dropout_backend = "auto"
    if compute is None:
        fwd_backend, bwd_backend = _backends(backend, x, parts.dense is None, parts.shape[0])
    else:
        _check_compute_dtype(x, proj, parts, name)
        # the base on linear_4bit's choice of backend; the mask on lora_dropout's (which has no "cuda" kernel)
        fwd_backend = bwd_backend = backends.resolve(backend, x.device, backends.BACKENDS,
                                                     backends.GPU_ORDER_CUDA_FIRST)
        dropout_backend = "auto" if fwd_backend == "cuda" else fwd_backend
    weight_tensors = parts.tensors()
    check_training(training)
    p = float(proj.dropout_p) if training else 0.0
    prep = PreparedProjection(parts.meta(), len(weight_tensors), fwd_backend, bwd_backend, parts.shape[0],
                              float(proj.scaling), p, rounding, call_site_of(proj.lora_A), compute, dropout_backend)
    flat = [proj.lora_A.contiguous(), proj.lora_B.contiguous(), proj.bias, no_seed(x.device), *weight_tensors]
    return prep, flat


def _check_compute_dtype(x: torch.Tensor, proj, parts, name: str) -> None:
    if proj.compute_dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}.compute_dtype must be None or one of float32, bfloat16, float16, got "
                        f"{proj.compute_dtype}")
    if parts.dense is not None:
        raise ValueError(f"{name}.compute_dtype is only for 4-bit weights (a dense weight has x's dtype)")
    if x.dtype == torch.float64 or proj.lora_A.dtype != x.dtype:
        raise TypeError(f"{name}.lora_A must have x's dtype {x.dtype} when compute_dtype is set, got "
                        f"{proj.lora_A.dtype}")
    if proj.bias is not None:
        check_tensor(proj.bias, f"{name}.bias", (proj.compute_dtype,), ndim=1)
        if proj.bias.shape[0] != parts.shape[0] or proj.bias.device != x.device:
            raise ValueError(f"{name}.bias must have out_features={parts.shape[0]} elements on x's device, got "
                             f"shape {tuple(proj.bias.shape)} on {proj.bias.device}")


def draw_seeds(preps, flats) -> None:
    """Draw the dropout seed of every projection with dropout (call site: its own lora_A), in order."""
    for prep, flat in zip(preps, flats, strict=True):
        if prep.dropout_p > 0.0:
            flat[3] = draw_seed(prep.call_site, flat[0].device)


def seed_objects(preps, flat) -> list[torch.Tensor]:
    """The seed tensor of each projection in a call's flat run. A grouped op keeps these very objects
    on ctx and puts them back into the runs in backward, so the seed stash is consumed by identity
    even when saved-tensor hooks (checkpointing, save_on_cpu) hand backward copies."""
    return [run[3] for run in split_runs(flat, preps)]


def split_runs(flat, preps, seeds=None) -> list[list]:
    """The flat tensors of a call as one list per projection, with ``seeds`` (from
    :func:`seed_objects`) in the seed slots when given."""
    runs, at = [], 0
    for i, prep in enumerate(preps):
        run = list(flat[at:at + prep.width])
        if seeds is not None:
            run[3] = seeds[i]
        runs.append(run)
        at += prep.width
    return runs


def forward(prep: PreparedProjection, inp: torch.Tensor, flat) -> tuple[torch.Tensor, torch.Tensor]:
    """(y (M, out) of inp's dtype, S (M, r) of lora_A's dtype) of one projection of inp (M, in)."""
    lora_A, lora_B, bias, seed_t, *weight_tensors = flat
    weight, absmax = _WeightParts.kernel_args(prep.meta, weight_tensors)
    blocksize, quant_type = prep.meta[2:]
    if prep.compute_dtype is not None:
        base = backend_op("linear_4bit_fwd", prep.fwd_backend)(
            inp.to(prep.compute_dtype), weight, absmax, blocksize, quant_type, prep.out_features, bias)
        lora, S = branch_forward(inp, lora_A, lora_B, seed_t, prep.scaling, prep.dropout_p, prep.dropout_backend)
        return base.to(inp.dtype) + lora, S  # lora has inp's dtype: PEFT's two roundings coincide
    return backend_op("lora_linear_fwd", prep.fwd_backend)(
        inp, weight, absmax, blocksize, quant_type, prep.out_features, lora_A, lora_B, prep.scaling, bias,
        prep.dropout_p, seed_t, prep.rounding)


def backward(prep: PreparedProjection, grad_y: torch.Tensor, inp: torch.Tensor, S: torch.Tensor, flat,
             needs: tuple[bool, bool, bool, bool]):
    """(d inp, dA, dB, dbias) of one projection, each None where ``needs`` (inp, A, B, bias) is
    False; forgets the projection's dropout seed afterwards (its backward is done)."""
    lora_A, lora_B, bias, seed_t, *weight_tensors = flat
    need_dx, need_dA, need_dB, need_dbias = needs
    dx = dA = dB = dbias = None
    if prep.compute_dtype is not None:
        dx, dA, dB = _split_backward(prep, grad_y, inp, S, flat, need_dx, need_dA, need_dB)
    elif need_dx or need_dA or need_dB:
        weight, absmax = _WeightParts.kernel_args(prep.meta, weight_tensors)
        blocksize, quant_type = prep.meta[2:]
        gx, gA, gB = backend_op("lora_linear_bwd", prep.bwd_backend)(
            grad_y.contiguous(), inp, S, weight, absmax, blocksize, quant_type, prep.out_features, lora_A, lora_B,
            prep.scaling, prep.dropout_p, seed_t, need_dx, need_dA, need_dB)
        dx = gx if need_dx else None
        dA = gA if need_dA else None
        dB = gB if need_dB else None
    if need_dbias:
        wide = torch.float64 if grad_y.dtype == torch.float64 else torch.float32
        if prep.compute_dtype is not None:  # the bias entered the compute-dtype GEMM
            dbias = grad_y.to(prep.compute_dtype).sum(0, dtype=wide).to(prep.compute_dtype)
        else:
            dbias = grad_y.sum(0, dtype=wide).to(grad_y.dtype)
    if prep.dropout_p > 0.0:
        consume_seed(prep.call_site, seed_t)
    return dx, dA, dB, dbias


def _split_backward(prep: PreparedProjection, grad_y, inp, S, flat, need_dx: bool, need_dA: bool, need_dB: bool):
    """(d inp, dA, dB) of a compute-dtype projection: the base's dx through the cast, as autograd takes it
    through PEFT's ``base(x.to(compute)).to(x.dtype)``, plus the LoRA term's."""
    lora_A, lora_B, _, seed_t, *weight_tensors = flat
    dx_lora, dA, dB = branch_backward(grad_y, inp, S, lora_A, lora_B, seed_t, prep.scaling, prep.dropout_p,
                                      prep.dropout_backend, need_dx, need_dA, need_dB)
    dx = None
    if need_dx:
        weight, absmax = _WeightParts.kernel_args(prep.meta, weight_tensors)
        blocksize, quant_type = prep.meta[2:]
        dx_base = backend_op("linear_4bit_bwd", prep.bwd_backend)(
            grad_y.to(prep.compute_dtype).contiguous(), weight, absmax, blocksize, quant_type, inp.shape[-1])
        dx = dx_base.to(inp.dtype) + dx_lora
    return dx, dA, dB
