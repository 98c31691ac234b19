"""Philox4x32-10 and the LoRA dropout rule as ``@triton.jit`` helpers (no kernels of their own).

The one definition is csrc/include/fastlora/philox.h; fastlora/reference_lora.py mirrors it in torch.
These helpers implement the same function in uint32 arithmetic (``tl.umulhi`` for the high half of
the 32x32-bit products), so the Triton kernels match the C++ / CUDA kernels and the reference bit for
bit:

* key = (lo32(seed), hi32(seed)); counter = (lo32(n), hi32(n), stream, 0). The kernels take the seed
  as a pointer to an int64 and read it at run time (:func:`load_key`), never as a launch constant, so
  a captured CUDA graph uses the value the seed tensor holds at each replay;
* element i of a tensor (row-major linear index) uses word ``i & 3`` of block ``n = i >> 2`` (NEFTune reads its
  stream in 16-bit halves, eight elements per block: kernels/neftune_embedding.py);
* LoRA dropout (stream 0) keeps element i iff ``(word >> 8) >= ceil(p * 2^24)``, and a kept value is
  ``round(x * scale)`` with ``scale = (float)(1 / (1 - p))`` (computed on the host, see
  :func:`dropout_constants`).

Two ways to get the keep mask of a tile:

* :func:`keep_elements`: one Philox evaluation per element (any index pattern);
* :func:`keep_groups`: one evaluation per four consecutive elements: the caller passes the block
  counters of a ``[..., G]`` tile of groups and gets the ``[..., 4 * G]`` mask of their elements.
  Four times less integer work; needs tiles whose element runs start at a multiple of 4.
"""

from __future__ import annotations

import math
import struct

import triton
import triton.language as tl

__all__ = [
    "STREAM_LORA_DROPOUT",
    "dropout_constants",
    "keep_elements",
    "keep_groups",
    "load_key",
    "philox4x32_10",
]

STREAM_LORA_DROPOUT = 0

_M0: tl.constexpr = tl.constexpr(0xD2511F53)
_M1: tl.constexpr = tl.constexpr(0xCD9E8D57)
_W0: tl.constexpr = tl.constexpr(0x9E3779B9)
_W1: tl.constexpr = tl.constexpr(0xBB67AE85)


def dropout_constants(p: float) -> tuple[int, float]:
    """(threshold, scale) of LoRA dropout with probability ``p`` in [0, 1), as philox.h defines them:
    ``ceil(p * 2^24)`` and ``(float)(1.0 / (1.0 - p))`` (a Python float that is exactly an fp32)."""
    threshold = math.ceil(p * 16777216.0)
    scale = struct.unpack("f", struct.pack("f", 1.0 / (1.0 - p)))[0]  # round-to-nearest-even to fp32
    return threshold, scale


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Ten Philox4x32 rounds on uint32 tensors (counter c0..c3, key k0, k1); returns four words."""
    m0 = tl.full(c0.shape, _M0, tl.uint32)
    m1 = tl.full(c0.shape, _M1, tl.uint32)
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, m0)
        lo0 = c0 * m0
        hi1 = tl.umulhi(c2, m1)
        lo1 = c2 * m1
        c0 = hi1 ^ c1 ^ k0
        c1 = lo1
        c2 = hi0 ^ c3 ^ k1
        c3 = lo0
        k0 = k0 + _W0
        k1 = k1 + _W1
    return c0, c1, c2, c3


@triton.jit
def load_key(seed_ptr):
    """The Philox key (k0, k1) = (lo32(seed), hi32(seed)) as uint32 scalars, from the int64 seed at
    ``seed_ptr``. Both halves are truncations of the 64-bit pattern (the arithmetic shift's sign bits
    fall outside the low 32 bits), so any int64 value gives the key of its two's-complement bits."""
    seed = tl.load(seed_ptr)
    return seed.to(tl.uint32), (seed >> 32).to(tl.uint32)


@triton.jit
def _words(n, k0, k1, STREAM: tl.constexpr):
    # n: int64 block counters -> the four uint32 words of each block.
    c0 = n.to(tl.uint32)  # truncation: lo32(n)
    c1 = (n >> 32).to(tl.uint32)
    c2 = tl.full(c0.shape, STREAM, tl.uint32)
    c3 = tl.zeros(c0.shape, tl.uint32)
    return philox4x32_10(c0, c1, c2, c3, k0, k1)


@triton.jit
def keep_elements(idx, k0, k1, threshold, STREAM: tl.constexpr = 0):
    """bool tile: LoRA dropout keeps element ``idx`` (int64 tensor of row-major linear indices).

    k0, k1: the uint32 key halves from :func:`load_key`; threshold: int32 scalar ``ceil(p * 2^24)``.
    One Philox evaluation per element."""
    w0, w1, w2, w3 = _words(idx >> 2, k0, k1, STREAM)
    j = idx & 3
    w = tl.where(j == 0, w0, tl.where(j == 1, w1, tl.where(j == 2, w2, w3)))
    return (w >> 8) >= threshold.to(tl.uint32)


@triton.jit
def keep_groups(n, k0, k1, threshold, ROWS: tl.constexpr, COLS: tl.constexpr, STREAM: tl.constexpr = 0):
    """bool [ROWS, COLS] tile from int64 block counters ``n`` of shape [ROWS, COLS // 4]: element
    (i, 4 * g + j) of the result is element ``4 * n[i, g] + j`` of the tensor (key halves k0, k1 from
    :func:`load_key`). One Philox evaluation per four elements."""
    w0, w1, w2, w3 = _words(n, k0, k1, STREAM)
    # join(join(w0, w2), join(w1, w3))[..., j, i] = w[2 * j + i]: a row-major reshape puts word k at 4g + k.
    w = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (ROWS, COLS))
    return (w >> 8) >= threshold.to(tl.uint32)
