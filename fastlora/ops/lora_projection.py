"""One LoRA projection as the grouped ops take it, and the per-projection plumbing they share.

A grouped op (``lora_gated_mlp``, ``lora_qkv``) runs several projections inside one autograd node.
Each projection is the math of ``lora_linear`` (``y = x·Wᵀ + bias + scaling · (dropout(x)·Aᵀ)·Bᵀ``,
PEFT's rounding) and runs on the same per-backend custom ops ``fastlora::lora_linear_fwd`` /
``lora_linear_bwd``, so every backend that has those has the grouped ops too.

Inside a grouped autograd.Function a projection travels as a flat run of tensors (so that
``ctx.save_for_backward`` and saved-tensor hooks see them all): ``lora_A, lora_B, bias, seed,
*weight_tensors`` (the weight's own tensors: the dense weight, or packed codes + raw statistics),
with its metadata in a :class:`PreparedProjection`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._dropout_seed import call_site_of, consume_seed, draw_seed, no_seed
from .lora_linear import _backends, _op, _WeightParts, check_projection


class LoraProjection(NamedTuple):
    """A frozen base weight with one LoRA adapter, as ``fastlora.ops.lora_linear`` takes it.

    weight: dense (out, in) of x's dtype, a ``fastlora.nf4.QuantizedWeight`` or a bitsandbytes
      ``Params4bit``. lora_A (r, in), lora_B (out, r): float32 or x's dtype. scaling: float.
    bias: (out,) of x's dtype or None. dropout_p: LoRA dropout in [0, 1). rounding: None, "linear"
      or "linear4bit" (None: PEFT's choice for the weight kind).
    """

    weight: object
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    bias: torch.Tensor | None = None
    dropout_p: float = 0.0
    rounding: str | None = None


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
    parts, rounding = check_projection(x, in_features, proj.weight, proj.lora_A, proj.lora_B, proj.scaling,
                                       proj.bias, proj.dropout_p, proj.rounding, prefix=f"{name}.",
                                       input_desc=input_desc)
    fwd_backend, bwd_backend = _backends(backend, x, parts.dense is None)
    weight_tensors = parts.tensors()
    p = float(proj.dropout_p) if training else 0.0
    prep = PreparedProjection(parts.meta(), len(weight_tensors), fwd_backend, bwd_backend, parts.shape[0],
                              float(proj.scaling), p, rounding, call_site_of(proj.lora_A))
    flat = [proj.lora_A.contiguous(), proj.lora_B.contiguous(), proj.bias, no_seed(x.device), *weight_tensors]
    return prep, flat


def draw_seeds(preps, flats) -> None:
    """Draw the dropout seed of every projection with dropout (call site: its own lora_A), in order."""
    for prep, flat in zip(preps, flats, strict=True):
        if prep.dropout_p > 0.0:
            flat[3] = draw_seed(prep.call_site, flat[0].device)


def seed_objects(preps, flat) -> list[torch.Tensor]:
    """The seed tensor of each projection in a call's flat run. A grouped op keeps these very objects
    on ctx and puts them back into the runs in backward, so the seed stash is consumed by identity
    even when saved-tensor hooks (checkpointing, save_on_cpu) hand backward copies."""
    seeds, at = [], 0
    for prep in preps:
        seeds.append(flat[at + 3])
        at += prep.width
    return seeds


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
    return _op("lora_linear_fwd", prep.fwd_backend)(
        inp, weight, absmax, blocksize, quant_type, prep.out_features, lora_A, lora_B, prep.scaling, bias,
        prep.dropout_p, seed_t, prep.rounding)


def backward(prep: PreparedProjection, grad_y: torch.Tensor, inp: torch.Tensor, S: torch.Tensor, flat,
             needs: tuple[bool, bool, bool, bool]):
    """(d inp, dA, dB, dbias) of one projection, each None where ``needs`` (inp, A, B, bias) is
    False; forgets the projection's dropout seed afterwards (its backward is done)."""
    lora_A, lora_B, bias, seed_t, *weight_tensors = flat
    need_dx, need_dA, need_dB, need_dbias = needs
    dx = dA = dB = dbias = None
    if need_dx or need_dA or need_dB:
        weight, absmax = _WeightParts.kernel_args(prep.meta, weight_tensors)
        blocksize, quant_type = prep.meta[2:]
        gx, gA, gB = _op("lora_linear_bwd", prep.bwd_backend)(
            grad_y.contiguous(), inp, S, weight, absmax, blocksize, quant_type, prep.out_features, lora_A, lora_B,
            prep.scaling, prep.dropout_p, seed_t, need_dx, need_dA, need_dB)
        dx = gx if need_dx else None
        dA = gA if need_dA else None
        dB = gB if need_dB else None
    if need_dbias:
        wide = torch.float64 if grad_y.dtype == torch.float64 else torch.float32
        dbias = grad_y.sum(0, dtype=wide).to(grad_y.dtype)
    if prep.dropout_p > 0.0:
        consume_seed(prep.call_site, seed_t)
    return dx, dA, dB, dbias


def flatten_2d(x: torch.Tensor) -> torch.Tensor:
    x2d = x.reshape(-1, x.shape[-1])
    return x2d if x2d.is_contiguous() else x2d.contiguous()
