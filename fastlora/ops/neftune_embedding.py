"""fastlora::neftune_embedding and the autograd op ``neftune_embedding``: NEFTune's noisy embedding
lookup (arXiv 2310.05914) in one pass, ``weight[input_ids] + noise`` with noise uniform in [-mag, mag].

The op (the contract every backend meets bit for bit; formulas in fastlora/reference_neftune.py):
  ids     int64 (T,) flat token ids in [0, V)
  weight  (V, d) float32 / bfloat16 / float16
  mag     float32 (T,) noise magnitude per token (0: that row is an exact copy of weight[id])
  seed    int64 tensor with one element, value in [0, 2^63) (CPU for the CPU kernel, the weight's device
          for GPU kernels, which read it at run time): the noise is Philox4x32-10 on stream 1 keyed by the
          seed and the element index t*d + j, generated inside the kernel; no noise tensor exists.
  returns (T, d) of weight's dtype.
Backends: ``fastlora::neftune_embedding`` (C++ CPU; CUDA where built), ``..._triton``
(fastlora.kernels.neftune_embedding) and ``..._reference``; each with a fake implementation.

The public :func:`neftune_embedding` computes ``mag`` (padded or per-sequence lengths), draws the
seed from torch's generator (so ``torch.manual_seed`` reproduces a run and a checkpoint recompute
sees the same noise, see fastlora/ops/_dropout_seed.py) and gives the weight, when it is trainable,
the usual dense scatter-add gradient (the noise is additive: nothing is saved but the ids).
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from .. import reference_neftune
from ._dropout_seed import call_site_of, consume_seed, draw_seed, in_backward
from ._registry import FLOAT_DTYPES, check_same_device, check_tensor, define_native, pick

SCHEMA = "(Tensor ids, Tensor weight, Tensor mag, Tensor seed) -> Tensor"
MODES = reference_neftune.MODES
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)

define_native("neftune_embedding", SCHEMA, reference_neftune.neftune_embedding)


def _fake(ids, weight, mag, seed):
    return weight.new_empty((ids.shape[0], weight.shape[1]))


torch.library.register_fake("fastlora::neftune_embedding")(_fake)


@torch.library.custom_op("fastlora::neftune_embedding_reference", mutates_args=())
def _reference_op(ids: torch.Tensor, weight: torch.Tensor, mag: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    return reference_neftune.neftune_embedding(ids, weight, mag, seed)


@torch.library.custom_op("fastlora::neftune_embedding_triton", mutates_args=())
def _triton_op(ids: torch.Tensor, weight: torch.Tensor, mag: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    from ..kernels import neftune_embedding as triton_kernels

    return triton_kernels.neftune_embedding(ids, weight, mag, seed)


_reference_op.register_fake(_fake)
_triton_op.register_fake(_fake)


def triton_kernel_available() -> bool:
    """Whether fastlora.kernels.neftune_embedding exists (the Triton kernel of this op)."""
    import importlib.util

    try:
        return importlib.util.find_spec("fastlora.kernels.neftune_embedding") is not None
    except ImportError:
        return False


# ---------------------------------------------------------------------------------------------
# autograd


class _NeftuneFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, mag, seed_t, call_site, op, padding_idx):
        out = op(ids, weight, mag, seed_t)
        ctx.save_for_backward(ids)
        ctx.vocab, ctx.padding_idx, ctx.call_site, ctx.seed = weight.shape[0], padding_idx, call_site, seed_t
        return out

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        grad_weight = None
        if ctx.needs_input_grad[1]:
            # What F.embedding's backward computes (dense scatter-add; padding_idx rows get none).
            grad_weight = torch.ops.aten.embedding_dense_backward(grad.contiguous(), ids, ctx.vocab, ctx.padding_idx,
                                                                  False)
        consume_seed(ctx.call_site, ctx.seed)
        return None, grad_weight, None, None, None, None, None


# ---------------------------------------------------------------------------------------------
# argument checks


def check_alpha(alpha) -> float:
    # numbers.Real takes numpy scalars too; a one-element tensor of a real dtype is read once on the host
    if isinstance(alpha, torch.Tensor) and alpha.numel() == 1 and not alpha.dtype.is_complex \
            and alpha.dtype != torch.bool:
        alpha = alpha.item()
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"alpha must be a real number, got {type(alpha).__name__}")
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")
    if alpha < 0.0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    return alpha


def _check_ids(input_ids) -> None:
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dtype not in INT_DTYPES:
        raise TypeError(f"input_ids must be an integer tensor (token ids), got {str(input_ids.dtype)[6:]}")


def _check_padding_idx(padding_idx, vocab: int) -> int | None:
    if padding_idx is None:
        return None
    if isinstance(padding_idx, bool) or not isinstance(padding_idx, int):
        raise TypeError(f"padding_idx must be an int or None, got {type(padding_idx).__name__}")
    if not -vocab <= padding_idx < vocab:
        raise ValueError(f"padding_idx must be within the weight's rows [-{vocab}, {vocab}), got {padding_idx}")
    return padding_idx + vocab if padding_idx < 0 else padding_idx


def _check_like_ids(t, name: str, input_ids: torch.Tensor, integer: bool) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if integer and t.dtype not in INT_DTYPES:
        raise TypeError(f"{name} must be an integer tensor, got {str(t.dtype)[6:]}")
    if tuple(t.shape) != tuple(input_ids.shape):
        raise ValueError(f"{name} must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(t.shape)}")


def _check_cu_seqlens(cu_seqlens, tokens: int) -> None:
    check_tensor(cu_seqlens, "cu_seqlens", (torch.int32, torch.int64), ndim=1)
    if reference_neftune.stream_capturing(cu_seqlens.device):
        raise ValueError("cu_seqlens is validated on the host, which is not possible while a CUDA graph is being "
                         "captured; pass position_ids (per_sequence mode) or capture with mode='padded'")
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must hold at least [0, T] (2 values), got {cu_seqlens.numel()}")
    bounds = cu_seqlens.to(device="cpu", dtype=torch.int64)
    if int(bounds[0]) != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {int(bounds[0])}")
    if int(bounds[-1]) != tokens:
        raise ValueError(f"cu_seqlens must end at the token count T={tokens}, got {int(bounds[-1])}")
    if bool((bounds[1:] < bounds[:-1]).any()):  # equal neighbours: an empty sequence, as in flash-attn's varlen
        raise ValueError("cu_seqlens must be non-decreasing (sequence boundaries), got "
                         f"{bounds.tolist() if bounds.numel() <= 16 else 'a decreasing step'}")


# ---------------------------------------------------------------------------------------------
# public entry point


def neftune_embedding(
    input_ids: torch.Tensor,
    weight: torch.Tensor,
    alpha: float,
    *,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    mode: str = "padded",
    padding_idx: int | None = None,
    training: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """``weight[input_ids] + noise``, noise uniform in [-mag, mag] per element (NEFTune).

    Args:
      input_ids: integer token ids of any shape, (B, L) or packed (1, T) / (T,); values in [0, V).
      weight: (V, d) float32 / bfloat16 / float16 embedding table; gets the usual embedding
        gradient when it requires grad, none (and no work) when frozen.
      alpha: NEFTune alpha >= 0 (the paper uses 5-15); 0 means no noise.
      attention_mask: input_ids' shape; tokens where it is 0 get no noise (per_sequence mode).
      position_ids: input_ids' shape; in per_sequence mode a 0 starts a new packed sequence.
      cu_seqlens: int32/int64 [0, ..., T] boundaries of packed sequences over the flattened ids.
      mode: "padded": mag = alpha / sqrt(L*d), L = input_ids.shape[-1] (transformers' Trainer
        ``neftune_noise_alpha``, same fp32 value); "per_sequence": L = each sequence's real length.
      padding_idx: like torch.nn.functional.embedding (that row gets no gradient).
      training: False gives a plain embedding lookup (as does alpha 0): no seed drawn, no kernel of fastlora's;
        the ids are still range-checked (one aminmax read on the host; skipped under CUDA graph capture) so that
        a bad id is a ValueError naming input_ids, not an IndexError or a device-side assert.
      backend: "auto", "reference", "cpp", "triton" or "cuda".

    Returns: input_ids.shape + (d,) in weight's dtype.

    Capturable in a CUDA graph: the seed is drawn on the GPU at every replay and nothing is read on the host
    (out-of-range ids, checked on the host otherwise, give NaN rows there; cu_seqlens is refused).
    """
    _check_ids(input_ids)
    check_tensor(weight, "weight", FLOAT_DTYPES, ndim=2)
    alpha = check_alpha(alpha)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    vocab, dim = weight.shape
    padding_idx = _check_padding_idx(padding_idx, vocab)
    check_same_device(input_ids=input_ids, weight=weight)
    if attention_mask is not None:
        _check_like_ids(attention_mask, "attention_mask", input_ids, integer=False)
        check_same_device(input_ids=input_ids, attention_mask=attention_mask)
    if position_ids is not None:
        _check_like_ids(position_ids, "position_ids", input_ids, integer=True)
        check_same_device(input_ids=input_ids, position_ids=position_ids)
    if cu_seqlens is not None:
        if position_ids is not None:
            raise ValueError("pass at most one of position_ids and cu_seqlens (both give packed-sequence boundaries)")
        _check_cu_seqlens(cu_seqlens, input_ids.numel())

    if not training or alpha == 0.0:
        # a ValueError, not F.embedding's IndexError (CPU) or device-side assert (CUDA)
        reference_neftune.check_ids_in_range(input_ids, vocab, "input_ids")
        return F.embedding(input_ids, weight, padding_idx)

    # Every backend's op checks the ids itself (ValueError naming input_ids, one aminmax on a GPU, none while a CUDA
    # graph is being captured): not repeated here.
    op = pick("neftune_embedding", backend, weight.device)
    ids = input_ids.reshape(-1).to(torch.int64).contiguous()
    mag = reference_neftune.noise_magnitudes(input_ids, dim, alpha, mode=mode, attention_mask=attention_mask,
                                             position_ids=position_ids, cu_seqlens=cu_seqlens)
    call_site = call_site_of(weight)
    seed_t = draw_seed(call_site, weight.device)
    # (no stash under torch.compile, call_site None: in_backward would break the graph there)
    if call_site is not None and in_backward() and not (weight.requires_grad and torch.is_grad_enabled()):
        consume_seed(call_site, seed_t)  # a checkpoint recompute whose backward will not run: done with it now
    out = _NeftuneFunction.apply(ids, weight.contiguous(), mag, seed_t, call_site, op,
                                 -1 if padding_idx is None else padding_idx)
    return out.reshape(*input_ids.shape, dim)
