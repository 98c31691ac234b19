"""Achieved throughput of the kernels suite's cases against the device's measured ceilings.

Ceilings (:func:`ceiling_operation`, timed by the suite like its cases; :func:`ceilings_from`), measured on the
device the suite runs on, in the case's dtype:
  * GEMM: a square ``torch.mm`` (n x n by n x n; n = 8192 on a GPU, 1024 on a CPU, 512 for 16-bit dtypes on a
    CPU), 2n^3 flops per call;
  * copy: ``Tensor.copy_`` of a 256 MiB (GPU) / 64 MiB (CPU) buffer, counted as bytes read + bytes written.

Work per case (:func:`work`): the flops of its matrix products and the bytes it must move at the least (every
operand read once, every result written once), from the shapes alone, so that every provider of a case is
divided by the same numbers. M tokens, a K -> N projection, LoRA rank r, element size e of the dtype, fp32
adapters, the weight NF4 double-quant (blocksize 64: K·N/2 code bytes + K·N/64 one-byte absmax + the
second-level fp32 absmax every 256 blocks), bwd of a frozen linear (linear_4bit, frozen_linear) dx alone:

  ================  ===============================================  ==============================================
  case              flops                                            bytes
  ================  ===============================================  ==============================================
  dequantize_4bit   0 (a decode: bandwidth only)                      weight + K·N·e out
  lora_linear fwd   2MKN + 2MKr + 2MrN                                weight + adapters + x + y + S (M·r fp32)
  lora_linear bwd   2MNK (dx) + 4MNr + 4MrK (G·B, ·A, dB, dA)          weight + adapters + their grads + G + x + S
                                                                     + dx
  lora_linear full  fwd + bwd                                        fwd + bwd
  gated_mlp         the three projections' lora_linear sums (hidden K, intermediate N: gate, up K -> N,
                    down N -> K)
  neftune           0                                                ids (8 bytes each) + M·d·e rows read + M·d·e
                                                                     written
  lora_qkv          the three projections' lora_linear sums (q K -> K, k and v K -> K/4: lora_setup's GQA shapes),
                    but x read once (fwd and bwd) and dx written once (bwd)
  linear_4bit fwd   2MKN                                             weight + x + y
  linear_4bit bwd   2MNK (dx)                                        weight + G + dx
  dora_linear fwd   lora_linear fwd + 2NrK (B·A for the row norms    lora_linear fwd + magnitude (N·4)
                    ‖W + s·BA‖)
  dora_linear bwd   lora_linear bwd                                  lora_linear bwd + magnitude + its grad (2·N·4)
  frozen_linear     as linear_4bit with a dense bf16 weight (K·N·2 bytes; e = 2: the op is bf16 only)
  ================  ===============================================  ==============================================

Achieved TFLOP/s = flops / time and GB/s = bytes / time; the fraction of each ceiling says which bound a case is
near (a small-M LoRA forward is bandwidth-bound: its GB/s matters, not its TFLOP/s).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from .lora_setup import BLOCKSIZE, RANK, qkv_out_features


@dataclasses.dataclass(frozen=True)
class Work:
    flops: float
    bytes: float


@dataclasses.dataclass(frozen=True)
class Ceilings:
    """Measured on ``device`` in ``dtype``: GEMM TFLOP/s and copy GB/s, with what was measured."""
    device: str
    dtype: str
    gemm_tflops: float
    copy_gbs: float
    gemm_n: int
    copy_bytes: int


def weight_4bit_bytes(k: int, n: int) -> float:
    blocks = k * n / BLOCKSIZE
    return k * n / 2 + blocks + blocks / 256 * 4


def _lora_linear(m: int, k: int, n: int, e: int, r: int = RANK) -> tuple[Work, Work]:
    """(forward, backward) work of one QLoRA projection."""
    adapters = (r * k + n * r) * 4
    s = m * r * 4
    fwd = Work(2 * m * k * n + 2 * m * k * r + 2 * m * r * n, weight_4bit_bytes(k, n) + adapters + m * k * e
               + m * n * e + s)
    bwd = Work(2 * m * n * k + 4 * m * n * r + 4 * m * r * k,
               weight_4bit_bytes(k, n) + 2 * adapters + m * n * e + m * k * e + s + m * k * e)
    return fwd, bwd


def _frozen_linear(m: int, k: int, n: int, e: int, weight_bytes: float) -> tuple[Work, Work]:
    """(forward, backward) work of a linear without adapter over a frozen weight: dx alone in backward."""
    return (Work(2 * m * k * n, weight_bytes + m * k * e + m * n * e),
            Work(2 * m * n * k, weight_bytes + m * n * e + m * k * e))


def _lora_qkv(m: int, k: int, e: int) -> tuple[Work, Work]:
    """(forward, backward) work of q, k, v on one x: the three projections' sums, x read once, dx written once."""
    parts = [_lora_linear(m, k, n, e) for n in qkv_out_features(k)]
    x = m * k * e
    fwd = Work(sum(f.flops for f, _ in parts), sum(f.bytes for f, _ in parts) - 2 * x)
    bwd = Work(sum(b.flops for _, b in parts), sum(b.bytes for _, b in parts) - 2 * (x + x))
    return fwd, bwd


def _dora_linear(m: int, k: int, n: int, e: int, r: int = RANK) -> tuple[Work, Work]:
    fwd, bwd = _lora_linear(m, k, n, e, r)
    magnitude = n * 4
    return Work(fwd.flops + 2 * n * r * k, fwd.bytes + magnitude), Work(bwd.flops, bwd.bytes + 2 * magnitude)


def _passes(fwd: Work, bwd: Work, pass_: str) -> Work:
    if pass_ == "fwd":
        return fwd
    if pass_ == "bwd":
        return bwd
    if pass_ == "full":
        return Work(fwd.flops + bwd.flops, fwd.bytes + bwd.bytes)
    raise ValueError(f"pass must be 'fwd', 'bwd' or 'full', got {pass_!r}")


def work(op: str, pass_: str, m: int, k: int, n: int, dtype: torch.dtype) -> Work:
    """The flops and least bytes of one kernels-suite case (see the module docstring); ``n`` is NEFTune's vocab
    and the gated MLP's intermediate size, as in the suite, and not used by lora_qkv (hidden size ``k``)."""
    e = torch.empty((), dtype=dtype).element_size()
    if op == "dequantize_4bit":
        return Work(0.0, weight_4bit_bytes(k, n) + k * n * e)
    if op == "neftune_embedding":
        return Work(0.0, m * 8 + 2 * m * k * e)
    if op == "lora_linear":
        return _passes(*_lora_linear(m, k, n, e), pass_)
    if op == "gated_mlp":
        parts = [_lora_linear(m, k, n, e), _lora_linear(m, k, n, e), _lora_linear(m, n, k, e)]
        return Work(sum(_passes(*p, pass_).flops for p in parts), sum(_passes(*p, pass_).bytes for p in parts))
    if op == "lora_qkv":
        return _passes(*_lora_qkv(m, k, e), pass_)
    if op == "linear_4bit":
        return _passes(*_frozen_linear(m, k, n, e, weight_4bit_bytes(k, n)), pass_)
    if op == "dora_linear":
        return _passes(*_dora_linear(m, k, n, e), pass_)
    if op == "frozen_linear":
        return _passes(*_frozen_linear(m, k, n, e, k * n * e), pass_)
    raise ValueError(f"no work model for op {op!r}")


def ceiling_sizes(device: str, dtype: torch.dtype) -> tuple[int, int]:
    """(n of the square GEMM, bytes of the copy) measured for the ceilings."""
    on_gpu = device.startswith("cuda")
    # CPUs without native bf16 / fp16 GEMMs run them at ~0.15 GFLOP/s: a smaller square there keeps this short
    n = 8192 if on_gpu else (1024 if dtype == torch.float32 else 512)
    return n, (256 if on_gpu else 64) << 20


def ceiling_operation(kind: str, device: str, dtype: torch.dtype) -> Callable[[], object]:
    """The call timed for a ceiling: ``kind`` "gemm" (torch.mm of two n x n) or "copy" (copy_ of the buffer)."""
    n, nbytes = ceiling_sizes(device, dtype)
    if kind == "gemm":
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        return lambda: torch.mm(a, b)
    if kind == "copy":
        src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
        dst = torch.empty_like(src)
        return lambda: dst.copy_(src)
    raise ValueError(f"kind must be 'gemm' or 'copy', got {kind!r}")


def ceilings_from(device: str, dtype: torch.dtype, dtype_name: str, gemm_ms: float, copy_ms: float) -> Ceilings:
    """The ceilings from the median times of the two ceiling operations."""
    n, nbytes = ceiling_sizes(device, dtype)
    return Ceilings(device, dtype_name, 2 * n**3 / (gemm_ms * 1e-3) / 1e12, 2 * nbytes / (copy_ms * 1e-3) / 1e9, n,
                    nbytes)


def achieved(w: Work, ms: float, ceilings: Ceilings) -> dict:
    """TFLOP/s and GB/s of one timed case and their fractions of the ceilings (None where the case has no flops)."""
    seconds = ms * 1e-3
    tflops = w.flops / seconds / 1e12 if w.flops else None
    gbs = w.bytes / seconds / 1e9
    return {"tflops": tflops, "gbs": gbs,
            "gemm_fraction": tflops / ceilings.gemm_tflops if tflops is not None else None,
            "copy_fraction": gbs / ceilings.copy_gbs}
