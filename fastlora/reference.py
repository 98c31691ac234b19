"""Torch reference implementations: the ground truth of the tests and the last-resort backend.

Everything here is plain torch, runs on any device, and follows bitsandbytes' arithmetic step by
step (see DESIGN.md §2) so that it is bit-exact with it. Nothing here is fast.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction

import torch

# Index -> value of the 4-bit code books, float32 (bitsandbytes' get_4bit_type). FP4 code 8 is -0.
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)  # fmt: skip
_FP4_MAGNITUDES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)
# Order in which bitsandbytes' argsort lists the FP4 codes from smallest to largest value
# (+0 before -0); quantization maps bucket k to code FP4_SORTED_CODES[k].
FP4_SORTED_CODES = (11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3)
QUANT_TYPES = ("nf4", "fp4")


def code_table(quant_type: str, device: torch.device | str | None = None) -> torch.Tensor:
    """The 16-entry code book of ``quant_type`` as float32 (index -> value)."""
    if quant_type == "nf4":
        return torch.tensor(NF4_VALUES, dtype=torch.float32, device=device)
    if quant_type == "fp4":
        mags = torch.tensor(_FP4_MAGNITUDES, dtype=torch.float32, device=device) / 12.0
        return torch.cat([mags, -mags])
    raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")


def _sorted_codes(quant_type: str, device) -> torch.Tensor:
    if quant_type == "nf4":
        return torch.arange(16, device=device)
    return torch.tensor(FP4_SORTED_CODES, device=device)


def dynamic_map(device: torch.device | str | None = None) -> torch.Tensor:
    """The 256-entry signed dynamic (tree) code used for double-quantized statistics.

    Seven exponent levels 10^-6 .. 10^0; level i holds 2^i linearly spaced fractions in (0.1, 1]
    (midpoints of 2^i + 1 points), both signs, plus 0 and 1, sorted; float32 like bitsandbytes'
    create_dynamic_map(signed=True).
    """
    values: list[float] = []
    for level in range(7):
        points = torch.linspace(0.1, 1.0, 2**level + 1, dtype=torch.float32)
        mids = (points[:-1] + points[1:]) / 2.0
        scale = 10.0 ** (level - 6)
        values += (scale * mids).tolist()
        values += (-scale * mids).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    values.sort()
    return torch.tensor(values, dtype=torch.float32, device=device)


def unpack_codes(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """uint8[ceil(numel/2)] -> int64[numel] codes; the first element of a byte is its high nibble."""
    packed = packed.reshape(-1).to(torch.int64)
    return torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:numel]


def dequantize_4bit(
    packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str, numel: int, dtype: torch.dtype
) -> torch.Tensor:
    """Flat dequantized weight: dtype[numel] = round(TABLE[code[i]] * absmax[i // blocksize])."""
    values = code_table(quant_type, packed.device)[unpack_codes(packed, numel)]
    scale = absmax.float().repeat_interleave(blocksize)[:numel]
    return (values * scale).to(dtype)


def dequantize_absmax(
    qabsmax: torch.Tensor, code: torch.Tensor, absmax2: torch.Tensor, offset: torch.Tensor, blocksize: int
) -> torch.Tensor:
    """Double-quant statistics: fp32(fp32(code[q] * absmax2[i // blocksize]) + offset)."""
    n = qabsmax.numel()
    scaled = code.float()[qabsmax.reshape(-1).long()] * absmax2.float().repeat_interleave(blocksize)[:n]
    return scaled + offset.to(device=scaled.device, dtype=torch.float32).reshape(())


def _block_scaled(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x scaled into [-1, 1] per block, fp32 absmax per block), bitsandbytes' way: full blocks by
    x * (1 / absmax), a trailing partial block by x / absmax."""
    n = flat.numel()
    full = n - n % blocksize
    head = flat[:full].reshape(-1, blocksize)
    absmax = head.abs().amax(dim=1)
    scaled = (head * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp(-1, 1).reshape(-1)
    if full < n:
        tail_max = flat[full:].abs().amax()
        absmax = torch.cat([absmax, tail_max.reshape(1)])
        scaled = torch.cat([scaled, (flat[full:] / tail_max.clamp(min=1e-38)).clamp(-1, 1)])
    return scaled, absmax


def quantize_4bit(weight: torch.Tensor, blocksize: int, quant_type: str, reciprocal: Reciprocal | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8[ceil(numel/2)], absmax fp32[ceil(numel/blocksize)]) of a float weight, as
    bitsandbytes quantizes it on the weight's device: its CUDA kernel's rule for CUDA tensors
    (:func:`quantize_4bit_gpu_rule`, with ``reciprocal``), its CPU quantizer's otherwise."""
    if weight.device.type == "cuda":
        return quantize_4bit_gpu_rule(weight, blocksize, quant_type, reciprocal)
    flat = weight.reshape(-1).float()
    if flat.numel() == 0:
        return (torch.empty(0, dtype=torch.uint8, device=weight.device),
                torch.empty(0, dtype=torch.float32, device=weight.device))
    scaled, absmax = _block_scaled(flat, blocksize)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    table = code_table(quant_type, flat.device)
    order = _sorted_codes(quant_type, flat.device)
    sorted_values = table[order]
    midpoints = (sorted_values[:-1] + sorted_values[1:]) / 2
    codes = order[torch.bucketize(scaled, midpoints)].to(torch.uint8)
    return (codes[0::2] << 4) | codes[1::2], absmax


def _fp32_literals(*literals: str) -> tuple[float, ...]:
    """Each decimal literal rounded once to the nearest fp32 (ties to even), as a C compiler reads ``0.5f``.
    A Python float in between rounds twice and can land one fp32 step off (it does for 4 NF4 thresholds)."""
    values = []
    for literal in literals:
        exact = Fraction(literal)
        near = torch.tensor(float(exact), dtype=torch.float32)  # within one fp32 step of the answer
        candidates = [near, *(torch.nextafter(near, torch.tensor(to)) for to in (-math.inf, math.inf))]
        best = min(candidates, key=lambda c: (abs(Fraction(float(c)) - exact), int(c.view(torch.int32)) & 1))
        values.append(float(best))
    return tuple(values)


# 4-bit codes the way bitsandbytes' CUDA kernel picks them (kQuantizeBlockwise with dQuantizeNF4 /
# dQuantizeFP4, built with --use_fast_math), for byte compatibility on a GPU. It differs from the CPU
# quantizer above in four ways: every block, the partial last one too, is scaled by multiplying with the
# reciprocal of its absmax (the hardware's approximate one there: ``reciprocal``), and the partial block's
# absmax also sees its zero padding; nothing is clamped; arithmetic flushes subnormals to zero; and the
# codes come from strict comparisons (ties to the lower code) with the kernel's own decimal `f` literals,
# which the compiler rounds once to fp32. For NF4 those are not all the fp32 midpoints of the code book
# that the CPU uses: 4 of the 15 (below codes 1, 9, 13 and 15) lie one fp32 step from them, so a value
# scaled exactly onto such a midpoint gets another code on the GPU (read from the compiled kernels'
# FSETP immediates, `cuobjdump -sass` of libbitsandbytes_cuda130.so, sm_80 / sm_90 / sm_100 alike).
# FP4 codes come from the sign of the scaled value (8 | magnitude code for any x < 0, so a small
# negative value gets 8, "-0", where the CPU gives 0) and |x| against FP4_GPU_THRESHOLDS. A NaN (an
# all-zero block: 0 * inf) fails every comparison: NF4 code 0, FP4 code 0.
NF4_GPU_THRESHOLDS = _fp32_literals(
    "-0.8480964004993439", "-0.6106329262256622", "-0.4599952697753906", "-0.33967943489551544",
    "-0.23460740596055984", "-0.13791173323988914", "-0.045525018125772476", "0.03979014977812767",
    "0.1202552504837513", "0.2035212516784668", "0.2920137718319893", "0.3893125355243683",
    "0.5016634166240692", "0.6427869200706482", "0.8614784181118011",
)  # fmt: skip
FP4_GPU_THRESHOLDS = _fp32_literals(
    "0.00260417", "0.0859375", "0.20833333", "0.29166667", "0.4166667", "0.583333", "0.8333333"
)
# Code of |x| by how many of FP4_GPU_THRESHOLDS it exceeds (0 -> code 0, ..., 7 -> code 3).
_FP4_GPU_CODE_BY_RANK = (0, 1, 6, 7, 4, 5, 2, 3)
Reciprocal = Callable[[torch.Tensor], torch.Tensor]


def _reciprocal_ftz(absmax: torch.Tensor) -> torch.Tensor:
    """Correctly rounded fp32 1 / absmax, subnormal results flushed to zero."""
    return _flush_subnormals(torch.ones_like(absmax) / absmax)


def _gpu_block_scaled(flat: torch.Tensor, blocksize: int, reciprocal: Reciprocal | None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(flushed fp32 x * (1 / absmax) of every element, zero padding of the last block included, shape
    (blocks, blocksize); absmax per block), the way bitsandbytes' CUDA kernels scale a block: absmax is
    the largest |x| with NaNs ignored (a block of NaNs gets -FLT_MAX)."""
    flat = _flush_subnormals(flat)
    blocks = -(-flat.numel() // blocksize)
    padded = torch.nn.functional.pad(flat, (0, blocks * blocksize - flat.numel())).reshape(blocks, blocksize)
    magnitude = padded.abs()
    absmax = torch.where(magnitude.isnan(), -_FLT_MAX, magnitude).amax(dim=1)
    inv = _flush_subnormals((reciprocal or _reciprocal_ftz)(absmax))
    return _flush_subnormals(padded * inv.unsqueeze(1)), absmax


def quantize_4bit_gpu_rule(weight: torch.Tensor, blocksize: int, quant_type: str,
                           reciprocal: Reciprocal | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8[ceil(numel/2)], absmax fp32[ceil(numel/blocksize)]) by bitsandbytes' CUDA kernel's
    rule (see the comment above), on any device. ``reciprocal`` maps fp32 absmax to 1 / absmax; None
    uses the correctly rounded one (the GPU's approximate one is fastlora.kernels.approx_reciprocal)."""
    flat = weight.reshape(-1).float()
    n = flat.numel()
    if n == 0:
        return (torch.empty(0, dtype=torch.uint8, device=weight.device),
                torch.empty(0, dtype=torch.float32, device=weight.device))
    scaled, absmax = _gpu_block_scaled(flat, blocksize, reciprocal)
    x = scaled.reshape(-1)[: n + n % 2]  # an odd count's last byte holds the code of a padding zero
    device = x.device
    if quant_type == "nf4":
        thresholds = torch.tensor(NF4_GPU_THRESHOLDS, dtype=torch.float32, device=device)
        codes = torch.bucketize(x, thresholds)  # how many thresholds lie strictly below x
    else:
        thresholds = torch.tensor(FP4_GPU_THRESHOLDS, dtype=torch.float32, device=device)
        rank = torch.bucketize(x.abs(), thresholds)
        codes = torch.tensor(_FP4_GPU_CODE_BY_RANK, device=device)[rank] | torch.where(x < 0, 8, 0)
    codes = torch.where(x.isnan(), 0, codes).to(torch.uint8)
    return (codes[0::2] << 4) | codes[1::2], absmax


# 8-bit quantization of the nested statistics, the way bitsandbytes' CPU quantizer (0.50) does it,
# for byte compatibility. It does not search the code per value: it samples [-1, 1] on a uniform
# grid of 65536 points, g_k = fp32(2k / 65535) - 1, gives each grid point the code entry whose
# fp32 midpoint interval holds it (the first j with NOT mid_j < g_k, mid_j = (code[j] + code[j+1]) * 0.5
# in fp32, the code used as given), and sends a value x to the grid point
# k = trunc(fp32((x * fp32(1 / absmax) clamped to [-1, 1] + 1) * 0.5 * 65535 + 0.5)), the last
# multiply-add fused (one rounding). So a value within half a grid step (~1.5e-5) of a midpoint can
# get the entry on the other side of it: not always the nearest one, but what bitsandbytes stores.
# An all-zero block stores code 0; a NaN (0 * inf under a subnormal absmax) lands on grid point 0.
# bitsandbytes' CUDA kernel does something else (quantize_absmax_search below), and the two disagree
# on about 0.2% of realistic statistics; fastlora follows the bitsandbytes kernel of the device the
# tensor is on: this grid lookup for CPU tensors, the search for CUDA tensors.
ABSMAX_GRID = 65536


def absmax_code_lut(code: torch.Tensor) -> torch.Tensor:
    """uint8[ABSMAX_GRID]: the code entry of each grid point (see the comment above), built on the CPU."""
    code = code.detach().to("cpu", torch.float32).reshape(-1)
    mid = (code[:-1] + code[1:]) * 0.5
    k = torch.arange(ABSMAX_GRID, dtype=torch.float32)
    grid = (k + k) / torch.full_like(k, ABSMAX_GRID - 1.0) - 1.0  # fp32 division, correctly rounded
    # First j with NOT mid[j] < g: the count of leading midpoints below g, i.e. of running maxima
    # below g (a NaN midpoint stops the scan, as +inf does).
    stops = torch.where(mid.isnan(), torch.inf, mid).cummax(0).values.contiguous()
    return torch.searchsorted(stops, grid, side="left").to(torch.uint8)


def absmax_grid_index(normed: torch.Tensor) -> torch.Tensor:
    """int64 grid point of each fp32 x * (1 / absmax) (see the comment above). The fused multiply-add
    is emulated in fp64: t * 65535 is exact there, and so is + 0.5 wherever the result can reach 1."""
    t = (normed.clamp(-1.0, 1.0) + 1.0) * 0.5
    point = (t.double() * (ABSMAX_GRID - 1.0) + 0.5).float()
    return torch.where(point.isnan(), 0, point.nan_to_num(0.0).long())


def quantize_absmax_grid(values: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization of the (centred) statistics, bitsandbytes' CPU way: the code
    entry of the 65536-point grid point nearest x * (1 / absmax) (see the comment above)."""
    flat = values.reshape(-1).float()
    n = flat.numel()
    blocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(flat, (0, blocks * blocksize - n)).reshape(blocks, blocksize)
    absmax = padded.abs().amax(dim=1)
    inv = (torch.ones_like(absmax) / absmax).repeat_interleave(blocksize)[:n]
    idx = absmax_code_lut(code).to(flat.device)[absmax_grid_index(flat * inv)]
    idx = torch.where((absmax == 0).repeat_interleave(blocksize)[:n], 0, idx)  # an all-zero block: code 0
    return idx, absmax


# 8-bit quantization of the nested statistics the way bitsandbytes' CUDA kernel does it
# (kQuantizeBlockwise -> dQuantize<0>, built with --use_fast_math), for byte compatibility with
# bitsandbytes on a GPU. Everything is fp32 with subnormals flushed to zero (inputs and results of
# every step). Per block: absmax = the largest |x| (NaNs ignored, as fmaxf does; a partial last block
# also sees its zero padding, so its absmax is >= 0, while a full block of NaNs gets -FLT_MAX);
# x is scaled by multiplying with the reciprocal of absmax (the hardware's approximate reciprocal
# there, the correctly rounded one here: see below). Then a binary search over the 256 sorted code
# entries: the pivot starts at entry 127 and moves up (x > entry, strictly) or down by 64, 32, ..., 1,
# remembering the last entry passed on each side (lower / upper); an entry never passed on a side is
# the code's first / last entry. Finally, above the entry it stopped at, x takes the upper entry only
# when x > fp32((upper + entry) * 0.5); otherwise it takes the lower entry only when
# x < fp32((lower + entry) * 0.5). Ties at a midpoint therefore go towards the entry the search stopped
# at, which is why this differs from the CPU grid lookup within ~1.5e-5 of a midpoint. The search can
# only return the last entry (255) through `upper`. A NaN (an all-zero block: 0 * inf) fails every
# comparison and gets entry 0; +-inf get entry 255 / 0.
# The reciprocal: the kernel uses the GPU's approximate reciprocal (within an ulp). Where it is not the
# correctly rounded 1 / absmax, x * (1 / absmax) can move by an ulp, which changes a code only for a value
# within about an ulp of a midpoint or entry; torch has no way to issue that instruction, so the ops pass
# fastlora.kernels.approx_reciprocal for CUDA tensors, and the default is the correctly rounded reciprocal.
_FLT_MIN = 2.0**-126
_FLT_MAX = torch.finfo(torch.float32).max


def _flush_subnormals(t: torch.Tensor) -> torch.Tensor:
    """Subnormal values -> a zero of the same sign (what the kernel's .ftz arithmetic does)."""
    return torch.where(t.abs() < _FLT_MIN, t * 0.0, t)


def absmax_search_index(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """int64 code entry of each fp32 x (already scaled into [-1, 1]) by bitsandbytes' CUDA search
    (see the comment above); ``code`` holds 256 sorted fp32 entries on x's device."""
    x = _flush_subnormals(x.float())
    code = code.to(device=x.device, dtype=torch.float32).reshape(-1)
    pivot = torch.full(x.shape, 127, dtype=torch.int64, device=x.device)
    upper_pivot = torch.full_like(pivot, 255)
    lower_pivot = torch.zeros_like(pivot)
    upper = torch.ones_like(x)
    lower = -torch.ones_like(x)
    val = code[pivot]
    step = 64
    while step > 0:
        above = x > val
        lower_pivot = torch.where(above, pivot, lower_pivot)
        lower = torch.where(above, val, lower)
        upper_pivot = torch.where(above, upper_pivot, pivot)
        upper = torch.where(above, upper, val)
        pivot = torch.where(above, pivot + step, pivot - step)
        val = code[pivot]
        step >>= 1
    upper = torch.where(upper_pivot == 255, code[255], upper)
    lower = torch.where(lower_pivot == 0, code[0], lower)
    mid_up = _flush_subnormals((upper + val) * 0.5)
    mid_down = _flush_subnormals((lower + val) * 0.5)
    above = x > val
    return torch.where(above, torch.where(x > mid_up, upper_pivot, pivot),
                       torch.where(x < mid_down, lower_pivot, pivot))


def quantize_absmax_search(values: torch.Tensor, code: torch.Tensor, blocksize: int,
                           reciprocal: Reciprocal | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization of the (centred) statistics, bitsandbytes' CUDA way (see the
    comment above): (uint8 code entries, fp32 absmax per block), on any device. ``reciprocal`` as for
    :func:`quantize_4bit_gpu_rule`."""
    n = values.numel()
    scaled, absmax = _gpu_block_scaled(values.reshape(-1).float(), blocksize, reciprocal)
    idx = absmax_search_index(scaled.reshape(-1)[:n], code)
    return idx.to(torch.uint8), absmax


def quantize_absmax(values: torch.Tensor, code: torch.Tensor, blocksize: int, reciprocal: Reciprocal | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization of the (centred) statistics as bitsandbytes does it on the
    tensor's device: its CUDA kernel's search (with ``reciprocal``) for CUDA tensors, its CPU grid
    lookup otherwise."""
    if values.device.type == "cuda":
        return quantize_absmax_search(values, code, blocksize, reciprocal)
    return quantize_absmax_grid(values, code, blocksize)
