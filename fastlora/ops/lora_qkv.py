"""``lora_qkv``: several LoRA projections of the same input (attention's q / k / v, or any siblings)
in one autograd node that saves x once.

Each projection is the math of ``fastlora.ops.lora_linear`` (PEFT's rounding,
fastlora/reference_lora.py). A checkpoint with an already-fused projection (Phi-3's qkv_proj) is one
projection: split its output as the model does.

Shapes: x (M, K) after flattening its leading dimensions; projection i maps K to N_i with rank r_i.
Returns a tuple of (..., N_i) tensors in x's dtype.

Two paths compute the same math:

* Grouped (``fastlora::lora_qkv_grouped_fwd`` / ``_bwd``), taken when every projection allows it
  (:func:`grouped_applies`): LoRA dropout inactive for all (p == 0 or not training: one shared
  dropout(x) would correlate the masks PEFT draws independently), no ``compute_dtype``, x not
  float64, every weight of one kind (all dense, or all 4-bit with one blocksize and quant_type;
  double quant may differ per weight), one rounding and one adapter dtype for all; and not where
  the per-projection kernels are faster by design: the CUDA small-M 4-bit forward (it reads the
  packed codes directly, several times fewer bytes than decode + GEMM), and bf16 x on the C++ CPU
  backend when that runs its GEMMs in bf16 (a CPU with native bf16, or FASTLORA_CPU_BF16_GEMM=1).

  Forward: the weights are decoded (4-bit: ``fastlora::dequantize_4bit_into`` of the backend
  :func:`fastlora.ops.linear_4bit` would pick, to x's dtype, bitsandbytes' values) or copied
  (dense) into consecutive row blocks of one (sum N_i, K) workspace (on the CPU the thread's
  reusable decode workspace of :mod:`fastlora.ops.linear_4bit`; a single dense weight of the GEMM
  dtype is used as it is), then
  ONE GEMM x·W_catᵀ (+ the concatenated biases) for the base and ONE GEMM S_cat = x·A_catᵀ
  (M, sum r_i) in the adapter dtype; the up-projection S_i·B_iᵀ and the epilogue run per
  projection with reference_lora's roundings (base rounded to x's dtype, S and the LoRA term in the
  adapter dtype, times fp32 scaling, the "linear4bit" rounding, the final rounding). The big GEMMs
  multiply fp32 operands on the CPU (a bf16 / fp16 weight decoded to x's dtype, then widened: the
  C++ kernel's fp32 mode; bf16 GEMMs without native bf16 are hundreds of times slower) and x's
  dtype with an fp32 result on a GPU: the same values either way.
  Backward recomputes: decodes again, dx = g_cat·W_cat + dS_cat·A_cat as one fp32 sum rounded once
  to x's dtype (dS_i = scaling_i · g_i·B_i in fp32), dA_cat = dS_catᵀ·x split per projection, dB_i
  and dbias_i per projection, only those autograd asks for; an output without gradient is a zero
  block of g_cat. Saved for backward: x once, S_cat (M × sum r_i, adapter dtype), each
  projection's lora_A, lora_B, bias, seed and weight tensors (references), nothing else.
* Per projection, otherwise: each projection runs its own ``fastlora::lora_linear_fwd`` /
  ``lora_linear_bwd`` (or, with a compute_dtype, linear_4bit plus the LoRA term).
  Saved for backward: x once, S = dropout(x)·Aᵀ of each projection (M × r_i), each projection's
  lora_A, lora_B, bias, dropout seed (int64 0-dim tensor) and weight tensors (references). Backward
  adds the projections' contributions to dx in x's dtype, in order, as autograd adds them for
  separate PEFT layers.

Neither path saves the outputs, decoded weights or dropout masks.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from .. import backends
from ._leading_dims import as_input_grad, as_output, flatten_2d, flatten_grad
from ._registry import FLOAT_DTYPES, backend_op, check_tensor, define_decode_ops
from .linear_4bit import _workspace
from .lora_linear import _WeightParts
from .lora_projection import (
    LoraProjection,
    backward,
    draw_seeds,
    forward,
    prepare,
    seed_objects,
    split_runs,
)

GROUPED_FWD_SCHEMA = (
    "(Tensor x, Tensor[] weights, Tensor?[] absmax, int blocksize, str quant_type, Tensor[] lora_A, "
    "Tensor[] lora_B, float[] scaling, Tensor?[] bias, str rounding) -> (Tensor[], Tensor)"
)
GROUPED_BWD_SCHEMA = (
    "(Tensor?[] grad_ys, Tensor x, Tensor S, Tensor[] weights, Tensor?[] absmax, int blocksize, str quant_type, "
    "Tensor[] lora_A, Tensor[] lora_B, float[] scaling, bool need_dx, bool[] need_dA, bool[] need_dB) "
    "-> (Tensor, Tensor[], Tensor[])"
)


# ---------------------------------------------------------------------------------------------
# grouped path: the math (see the module docstring and fastlora/reference_lora.py)


def _mm32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a·b (fp32 accumulation) as an fp32 tensor: bf16 / fp16 operands on a GPU multiply in their
    dtype with an fp32 result; everywhere else the operands are widened to fp32 first."""
    if a.is_cuda and a.dtype == b.dtype and a.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def _rnd(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 ``t`` rounded to ``dtype`` (round to nearest even) and widened back to fp32."""
    return t if dtype == torch.float32 else t.to(dtype).float()


@functools.lru_cache(maxsize=256)  # a model has a handful of scalings; each call site asks on every step
def _scale32(scaling: float) -> float:
    """``scaling`` rounded to fp32 (exactly representable as a Python float), as the reference multiplies."""
    return torch.tensor(scaling, dtype=torch.float32).item()


def _weight_cat(suffix: str, weights, absmax, blocksize: int, quant_type: str, outs, in_features: int,
                x_dtype: torch.dtype, dtype: torch.dtype) -> torch.Tensor:
    """The (sum outs, K) concatenated weights in ``dtype``, in the decode workspace (valid until the
    next decode on this thread). 4-bit weights are decoded to x's dtype (bitsandbytes' values), each
    into its row block, then widened when ``dtype`` is wider."""
    n_total, k = sum(outs), in_features
    device = weights[0].device
    if absmax[0] is None:  # dense, of x's dtype
        if len(weights) == 1 and weights[0].dtype == dtype:
            return weights[0]  # nothing to concatenate or widen: the weight itself
        cat = _workspace(n_total * k, dtype, device).view(n_total, k)
        row = 0
        for w, n in zip(weights, outs, strict=True):
            cat[row:row + n].copy_(w)
            row += n
        return cat
    decoded = _workspace(n_total * k, x_dtype, device)
    into = getattr(torch.ops.fastlora, "dequantize_4bit_into" + suffix).default
    at = 0
    for packed, am, n in zip(weights, absmax, outs, strict=True):
        into(packed.reshape(-1), am.reshape(-1), blocksize, quant_type, decoded[at:at + n * k])
        at += n * k
    if dtype == x_dtype:
        return decoded.view(n_total, k)
    wide = _workspace(n_total * k, dtype, device)
    wide.copy_(decoded)
    return wide.view(n_total, k)


def _gemm_dtype(x: torch.Tensor) -> torch.dtype:
    """Operand dtype of the big GEMMs (x·W_catᵀ, g_cat·W_cat): fp32 on the CPU, x's dtype on a GPU."""
    return torch.float32 if x.device.type == "cpu" else x.dtype


def _grouped_fwd(suffix, x, weights, absmax, blocksize, quant_type, lora_A, lora_B, scaling, bias, rounding):
    xdt, adt = x.dtype, lora_A[0].dtype
    outs = [b.shape[0] for b in lora_B]
    gdt = _gemm_dtype(x)
    w_cat = _weight_cat(suffix, weights, absmax, blocksize, quant_type, outs, x.shape[1], xdt, gdt)
    xg = x.to(gdt)
    base = _mm32(xg, w_cat.t())  # (M, sum N_i) fp32
    del w_cat  # the workspace may be reused from here on
    col = 0
    for b, n in zip(bias, outs, strict=True):
        if b is not None:
            base[:, col:col + n] += b.float()
        col += n
    base = _rnd(base, xdt)  # PEFT's base layer output, rounded to x's dtype
    a_cat = lora_A[0] if len(lora_A) == 1 else torch.cat(lora_A)
    S = _mm32(xg if gdt == torch.float32 else x.to(adt), a_cat.t()).to(adt)  # (M, sum r_i)
    ys, col, rc = [], 0, 0
    for b_i, s_i, n in zip(lora_B, scaling, outs, strict=True):
        r = b_i.shape[1]
        lora = _rnd(_mm32(S[:, rc:rc + r], b_i.t()), adt)
        lora = _rnd(lora.mul_(_scale32(s_i)), adt)
        if rounding == "linear4bit":
            lora = _rnd(lora, xdt)
        ys.append(lora.add_(base[:, col:col + n]).to(xdt))
        col += n
        rc += r
    return ys, S


def _grouped_bwd(suffix, grad_ys, x, S, weights, absmax, blocksize, quant_type, lora_A, lora_B, scaling,
                 need_dx, need_dA, need_dB):
    xdt, adt = x.dtype, lora_A[0].dtype
    outs = [b.shape[0] for b in lora_B]
    ranks = [a.shape[0] for a in lora_A]
    m = x.shape[0]
    g32 = [None if g is None else g.float() for g in grad_ys]
    dS = x.new_zeros((m, sum(ranks)), dtype=torch.float32)
    rc = 0
    for g, b_i, s_i, r in zip(g32, lora_B, scaling, ranks, strict=True):
        if g is not None:
            dS[:, rc:rc + r] = torch.mm(g, b_i.float()).mul_(_scale32(s_i))
        rc += r
    dx = x.new_empty((0,))
    if need_dx:
        gdt = _gemm_dtype(x)
        g_cat = torch.cat([x.new_zeros((m, n), dtype=gdt) if g is None else g.to(gdt)
                           for g, n in zip(grad_ys, outs, strict=True)], dim=1)
        w_cat = _weight_cat(suffix, weights, absmax, blocksize, quant_type, outs, x.shape[1], xdt, gdt)
        dx32 = _mm32(g_cat, w_cat)
        del w_cat
        a_cat = lora_A[0] if len(lora_A) == 1 else torch.cat(lora_A)
        dx = dx32.addmm_(dS, a_cat.float()).to(xdt)  # one fp32 sum, rounded once
    dA = [a.new_empty((0,)) for a in lora_A]
    if any(need_dA):
        dA_cat = dS.t() @ x.to(adt).float()  # (sum r_i, K)
        rc = 0
        for i, r in enumerate(ranks):
            if need_dA[i]:
                dA[i] = dA_cat[rc:rc + r].to(adt, copy=True)  # own storage: op outputs may not alias
            rc += r
    dB = [b.new_empty((0,)) for b in lora_B]
    rc = 0
    for i, (g, s_i, r) in enumerate(zip(g32, scaling, ranks, strict=True)):
        if need_dB[i] and g is not None:
            dB[i] = (g.t() @ S[:, rc:rc + r].float()).mul_(_scale32(s_i)).to(adt)
        rc += r
    return dx, dA, dB


def _grouped_impls(suffix: str) -> dict:
    def fwd(x, weights, absmax, blocksize, quant_type, lora_A, lora_B, scaling, bias, rounding):
        return _grouped_fwd(suffix, x, weights, absmax, blocksize, quant_type, lora_A, lora_B, scaling, bias,
                            rounding)

    def bwd(grad_ys, x, S, weights, absmax, blocksize, quant_type, lora_A, lora_B, scaling, need_dx, need_dA,
            need_dB):
        return _grouped_bwd(suffix, grad_ys, x, S, weights, absmax, blocksize, quant_type, lora_A, lora_B, scaling,
                            need_dx, need_dA, need_dB)

    return {"lora_qkv_grouped_fwd": fwd, "lora_qkv_grouped_bwd": bwd}


def _grouped_fwd_fake(x, weights, absmax, blocksize, quant_type, lora_A, lora_B, scaling, bias, rounding):
    ys = [x.new_empty((x.shape[0], b.shape[0])) for b in lora_B]
    return ys, lora_A[0].new_empty((x.shape[0], sum(a.shape[0] for a in lora_A)))


def _grouped_bwd_fake(grad_ys, x, S, weights, absmax, blocksize, quant_type, lora_A, lora_B, scaling, need_dx,
                      need_dA, need_dB):
    dx = x.new_empty(x.shape if need_dx else (0,))
    dA = [a.new_empty(a.shape if need else (0,)) for a, need in zip(lora_A, need_dA, strict=True)]
    dB = [b.new_empty(b.shape if need else (0,)) for b, need in zip(lora_B, need_dB, strict=True)]
    return dx, dA, dB


# One op per decode backend, like fastlora::linear_4bit_fwd; the GEMMs are torch's in every backend.
define_decode_ops(_grouped_impls,
                  {"lora_qkv_grouped_fwd": GROUPED_FWD_SCHEMA, "lora_qkv_grouped_bwd": GROUPED_BWD_SCHEMA},
                  {"lora_qkv_grouped_fwd": _grouped_fwd_fake, "lora_qkv_grouped_bwd": _grouped_bwd_fake})


def grouped_applies(x: torch.Tensor, preps, flats) -> bool:
    """Whether a call runs the grouped path (the conditions are in the module docstring)."""
    if x.dtype == torch.float64:
        return False
    first = preps[0]
    if x.dtype == torch.bfloat16 and first.fwd_backend == "cpp" and backends.cpu_bf16_gemms():
        return False  # its native bf16 GEMMs beat the grouped fp32 ones (~3x at M = K = 1024)
    for prep, run in zip(preps, flats, strict=True):
        if prep.dropout_p > 0.0 or prep.compute_dtype is not None or prep.fwd_backend == "cuda":
            return False
        # (dense?, blocksize, quant_type): double quant (meta[1]) may differ, each absmax is resolved alone
        if (prep.meta[0], *prep.meta[2:]) != (first.meta[0], *first.meta[2:]):
            return False
        if prep.rounding != first.rounding or run[0].dtype != flats[0][0].dtype:
            return False
    return True


def _grouped_args(preps, runs) -> tuple[list, list, list, list, list]:
    """(weights, absmax, lora_A, lora_B, scaling) lists as the grouped ops take them."""
    weights, absmax = [], []
    for prep, run in zip(preps, runs, strict=True):
        w, am = _WeightParts.kernel_args(prep.meta, run[4:])
        weights.append(w)
        absmax.append(am)
    return weights, absmax, [r[0] for r in runs], [r[1] for r in runs], [p.scaling for p in preps]


class _GroupedQKVFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, spec, *flat):
        preps, decode_backend = spec
        runs = split_runs(flat, preps)
        weights, absmax, lora_A, lora_B, scaling = _grouped_args(preps, runs)
        blocksize, quant_type = preps[0].meta[2:]
        x2d = flatten_2d(x)
        ys, S = backend_op("lora_qkv_grouped_fwd", decode_backend)(
            x2d, weights, absmax, blocksize, quant_type, lora_A, lora_B, scaling, [r[2] for r in runs],
            preps[0].rounding)
        ctx.save_for_backward(x2d, S, *flat)
        ctx.spec, ctx.x_shape = spec, x.shape
        ctx.set_materialize_grads(False)
        return tuple(as_output(y, x.shape[:-1]) for y in ys)

    @staticmethod
    def backward(ctx, *grad_ys):
        preps, decode_backend = ctx.spec
        x2d, S, *flat = ctx.saved_tensors
        grad_ys = [flatten_grad(g) for g in grad_ys]
        runs = split_runs(flat, preps)
        needs = ctx.needs_input_grad
        need_dA, need_dB, need_dbias, at = [], [], [], 2
        for prep, grad_y in zip(preps, grad_ys, strict=True):
            used = grad_y is not None
            need_dA.append(used and needs[at])
            need_dB.append(used and needs[at + 1])
            need_dbias.append(used and needs[at + 2])
            at += prep.width
        dx, dA, dB = None, [None] * len(preps), [None] * len(preps)
        if needs[0] or any(need_dA) or any(need_dB):
            weights, absmax, lora_A, lora_B, scaling = _grouped_args(preps, runs)
            blocksize, quant_type = preps[0].meta[2:]
            grads = [None if g is None else g.contiguous() for g in grad_ys]
            gx, gA, gB = backend_op("lora_qkv_grouped_bwd", decode_backend)(
                grads, x2d, S, weights, absmax, blocksize, quant_type, lora_A, lora_B, scaling, needs[0], need_dA,
                need_dB)
            dx = as_input_grad(gx, ctx.x_shape) if needs[0] else None
            dA = [a if need else None for a, need in zip(gA, need_dA, strict=True)]
            dB = [b if need else None for b, need in zip(gB, need_dB, strict=True)]
        grads = []
        for i, (prep, grad_y) in enumerate(zip(preps, grad_ys, strict=True)):
            dbias = grad_y.sum(0, dtype=torch.float32).to(grad_y.dtype) if need_dbias[i] else None
            grads.extend([dA[i], dB[i], dbias] + [None] * (prep.width - 3))
        return dx, None, *grads


class _LoraQKVFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, preps, *flat):
        x2d = flatten_2d(x)
        ys, ss = [], []
        for prep, run in zip(preps, split_runs(flat, preps), strict=True):
            y, s = forward(prep, x2d, run)
            ys.append(as_output(y, x.shape[:-1]))
            ss.append(s)
        ctx.save_for_backward(x2d, *ss, *flat)
        ctx.preps, ctx.seeds, ctx.x_shape = preps, seed_objects(preps, flat), x.shape
        ctx.set_materialize_grads(False)
        return tuple(ys)

    @staticmethod
    def backward(ctx, *grad_ys):
        preps = ctx.preps
        saved = ctx.saved_tensors
        x2d, ss, flat = saved[0], saved[1:1 + len(preps)], saved[1 + len(preps):]
        grad_ys = [flatten_grad(g) for g in grad_ys]
        needs = ctx.needs_input_grad
        dx, grads, at = None, [], 0
        for prep, s, grad_y, run in zip(preps, ss, grad_ys, split_runs(flat, preps, ctx.seeds), strict=True):
            pn = tuple(needs[2 + at:2 + at + 3])  # lora_A, lora_B, bias
            at += prep.width
            if grad_y is None:  # this output is unused: nothing flows back, but its seed is done with
                backward(prep, None, x2d, s, run, (False, False, False, False))
                grads.extend([None] * prep.width)
                continue
            gx, *d = backward(prep, grad_y, x2d, s, run, (needs[0], *pn))
            grads.extend(d + [None] * (prep.width - 3))
            if gx is not None:
                dx = gx if dx is None else dx + gx
        if needs[0] and dx is None:
            dx = torch.zeros_like(x2d)
        return as_input_grad(dx, ctx.x_shape), None, *grads


def lora_qkv(
    x: torch.Tensor,
    projections: Sequence[LoraProjection],
    *,
    training: bool = True,
    backend: str = "auto",
) -> tuple[torch.Tensor, ...]:
    """``tuple(proj(x) for proj in projections)``, each a PEFT LoRA linear, in one autograd node.

    Runs the grouped path (one decode, one base GEMM, one S GEMM for all projections) when
    :func:`grouped_applies` (no active dropout, no compute_dtype, one weight kind, rounding and
    adapter dtype), else one fused op per projection; the module docstring has both, and what each saves.

    Args:
      x: (..., in_features), float32 / bfloat16 / float16 (float64 runs the reference backend).
      projections: one or more :class:`fastlora.ops.LoraProjection` reading x (e.g. q, k, v), each as
        ``fastlora.ops.lora_linear`` takes them (its own weight kind, rank, scaling, bias, dropout).
      training: LoRA dropout is active only when True.
      backend: "auto", "reference", "cpp", "triton" or "cuda" (see fastlora.backends).

    Returns: a tuple with one (..., out_features_i) tensor of x's dtype per projection.
    """
    check_tensor(x, "x", (*FLOAT_DTYPES, torch.float64))
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension (..., in_features), got a scalar")
    if isinstance(projections, (LoraProjection, str)) or not isinstance(projections, Sequence) or not projections:
        raise TypeError("projections must be a non-empty sequence of fastlora.ops.LoraProjection")
    preps, flats = [], []
    for i, proj in enumerate(projections):
        prep, run = prepare(x, x.shape[-1], proj, f"projections[{i}]", training, backend)
        preps.append(prep)
        flats.append(run)
    draw_seeds(preps, flats)
    flat = [t for run in flats for t in run]
    if grouped_applies(x, preps, flats):
        # the 4-bit decode on linear_4bit's choice of kernel (on a GPU the CUDA one is the fastest)
        decode_backend = backends.resolve(backend, x.device, backends.BACKENDS, backends.GPU_ORDER_CUDA_FIRST)
        return tuple(_GroupedQKVFunction.apply(x, (tuple(preps), decode_backend), *flat))
    return tuple(_LoraQKVFunction.apply(x, tuple(preps), *flat))
