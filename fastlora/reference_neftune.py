"""Torch reference of NEFTune (fastlora::neftune_embedding) and the noise magnitudes per token.

The op (bit for bit what the C++, Triton and CUDA kernels compute), for T tokens and rows of d:
    i      = t*d + j                                     row-major element index
    bits   = 16-bit half i & 1 (low first) of word (i >> 1) & 3 of the Philox4x32-10 block i >> 3, stream 1
             (csrc/include/fastlora/philox.h: one Philox evaluation per eight elements)
    u      = float((int32)bits - 2^15) * 2^-15            exact, in [-1, 1)
    noise  = rnd_f32(u * mag[t])                          (no FMA: multiply and add round separately)
    out    = rnd_W(rnd_f32(float(weight[ids[t], j]) + noise))
and where mag[t] == 0 the row is a plain copy of weight[ids[t]] (so -0.0 and NaN payloads survive).
Why 16 random bits per element: the noise is added to a value then rounded to at most fp32 (bf16 or fp16 in
practice), and one Philox evaluation per eight elements instead of four keeps the 16-bit kernels memory-bound: with
24-bit words the bf16 kernel took the same ~97 us at 8x2048 tokens, d=4096, on an H100 and an H200 (bound by the
Philox arithmetic, not by memory) while the plain lookup took 94 and 72 us (bench/bench_neftune_gpu.py).

Noise magnitudes (DESIGN.md §4): mag = alpha / sqrt(L·d) as an fp32 value computed exactly like
transformers' ``neftune_post_forward_hook`` (``alpha / torch.sqrt(torch.tensor(L * d))``), where L is
  "padded":        the padded length ids.shape[-1] (the Trainer's ``neftune_noise_alpha``);
  "per_sequence":  each sequence's real length: rows of ids, split at ``position_ids`` restarts or at
                   ``cu_seqlens`` boundaries for packed batches, counting only tokens whose
                   ``attention_mask`` is nonzero; masked tokens get mag 0.
"""

from __future__ import annotations

import functools

import torch

from .backends import stream_capturing
from .reference_lora import STREAM_NEFTUNE, philox_words

MODES = ("padded", "per_sequence")


def noise_bits(seed, numel: int, device=None) -> torch.Tensor:
    """int64[numel]: the 16 random bits of elements 0..numel-1 on the NEFTune stream (element i: half i & 1 of
    word i >> 1, low half first)."""
    words = philox_words(seed, (numel + 1) // 2, STREAM_NEFTUNE, device)
    return torch.stack((words & 0xFFFF, words >> 16), dim=1).reshape(-1)[:numel]


def uniform_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """fp32 u in [-1, 1) (multiples of 2^-15) from int64 16-bit values."""
    return (bits - 32768).to(torch.float32) * (2.0 ** -15)


def neftune_uniform(seed, shape: tuple[int, int], device=None) -> torch.Tensor:
    """fp32 (T, d): u of every element of the op's output (before scaling by mag)."""
    t, d = shape
    return uniform_from_bits(noise_bits(seed, t * d, device)).reshape(t, d)


def check_ids_in_range(ids: torch.Tensor, vocab: int, name: str = "input_ids") -> None:
    """ValueError naming ``name`` unless every id is in [0, vocab): one (min, max) read on the host. Skipped
    under CUDA graph capture, where the kernels' own masking (NaN rows; torch's indexing: a device-side
    assert) is what remains."""
    if ids.numel() == 0 or stream_capturing(ids.device):
        return
    lo, hi = torch.aminmax(ids)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= vocab:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} must be in [0, {vocab}) (the rows of weight), got {bad}")


def neftune_embedding(ids: torch.Tensor, weight: torch.Tensor, mag: torch.Tensor, seed) -> torch.Tensor:
    """The op on flat ``ids`` (T,) int64, ``weight`` (V, d), fp32 ``mag`` (T,); returns (T, d) in weight's dtype."""
    check_ids_in_range(ids, weight.shape[0])
    rows = weight[ids]
    t, d = rows.shape
    if t == 0 or d == 0:
        return rows.clone()
    u = neftune_uniform(seed, (t, d), weight.device)
    noise = u * mag.to(torch.float32)[:, None]  # one fp32 multiply (rounded)
    noisy = (rows.to(torch.float32) + noise).to(weight.dtype)  # one fp32 add, one rounding to W
    return torch.where((mag == 0)[:, None], rows, noisy)


def _magnitude_of(alpha: float, lengths: torch.Tensor, dim: int) -> torch.Tensor:
    """Elementwise ``alpha / sqrt(L*d)`` over int64 lengths with the hook's dtypes and roundings
    (int64 L*d -> fp32 sqrt -> fp32 division of the Python float alpha)."""
    return alpha / torch.sqrt(lengths.to(torch.int64) * dim)


@torch.compiler.assume_constant_result  # a function of Python numbers: a constant to torch.compile, no graph break
def padded_magnitude(alpha: float, length: int, dim: int) -> float:
    """transformers' ``alpha / torch.sqrt(torch.tensor(length * dim))`` as a Python float (exactly an fp32 value),
    computed as the hook computes it: on the CPU, with torch's own CPU sqrt (not always the correctly rounded fp32
    square root: on this machine's torch the correctly rounded one differs in the last bit for ~18% of L * d, so
    a device-side or host-emulated value could differ from the Trainer's)."""
    return _padded_magnitude(float(alpha), int(length), int(dim))


@functools.lru_cache(maxsize=256)
def _padded_magnitude(alpha: float, length: int, dim: int) -> float:
    return float(_magnitude_of(alpha, torch.tensor(length), dim).item())


def noise_magnitudes(input_ids: torch.Tensor, dim: int, alpha: float, *, mode: str = "padded",
                     attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                     cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 (T,) noise magnitude of every token of ``input_ids`` (flattened row-major); inputs are
    assumed valid (fastlora.ops.neftune_embedding checks them)."""
    device = input_ids.device
    numel = input_ids.numel()
    if mode == "padded":
        length = input_ids.shape[-1] if input_ids.dim() > 0 else 1
        # one fill with a host constant: no host -> device copy (CUDA graph capture forbids one), no host read of a
        # device value (a graph break under torch.compile), and one launch instead of the hook's four ops
        return torch.full((numel,), padded_magnitude(float(alpha), length, dim), dtype=torch.float32, device=device)
    if mode != "per_sequence":
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if numel == 0:
        return torch.zeros(0, dtype=torch.float32, device=device)
    valid = (torch.ones(numel, dtype=torch.bool, device=device) if attention_mask is None
             else attention_mask.reshape(-1) != 0)
    width = input_ids.shape[-1] if input_ids.dim() > 0 else 1
    if cu_seqlens is not None:
        bounds = cu_seqlens.to(device=device, dtype=torch.int64)
        segment = torch.searchsorted(bounds[1:], torch.arange(numel, device=device), right=True)
    else:
        starts = torch.arange(numel, device=device) % width == 0  # every row starts a sequence
        if position_ids is not None:
            starts |= position_ids.reshape(-1).to(device) == 0
        segment = torch.cumsum(starts.to(torch.int64), 0) - 1
    lengths = torch.zeros(numel, dtype=torch.int64, device=device)  # segment ids are < numel: no sync
    lengths.index_add_(0, segment, valid.to(torch.int64))
    mag = _magnitude_of(float(alpha), lengths, dim)[segment]
    return torch.where(valid, mag, torch.zeros((), dtype=torch.float32, device=device))
