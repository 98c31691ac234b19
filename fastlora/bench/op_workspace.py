"""Memory an operator allocates inside its kernel and frees before it returns: invisible to a
dispatch-level tracker (only outputs are seen) and absent under FakeTensorMode (fake impls create
outputs only). :func:`gpu_workspace` models it for the 4-bit GEMM ops of both providers as they run
on a CUDA GPU at training sizes (M > 1536 tokens), read from their launchers:

* ``bitsandbytes::gemm_4bit`` (bitsandbytes 0.50 ``backends/cuda/ops.py``, M > 1536: the
  ``_dequant_linear_fallback``): float32 absmax (2 x blocks x 4 bytes with double quant: the
  decoded codes and the offset-added copy) and the decoded (N, K) weight in x's dtype, then F.linear.
  Its backward decodes through ``F.dequantize_4bit``, torch ops the tracker sees.
* ``fastlora::lora_linear_fwd*`` (kernels/lora_linear.py, GEMMS="torch", the GPU default). bf16 x with fp32
  adapters (ADAPTER_GEMMS "auto", kernels/adapter_gemms.py): S from x·keep (with dropout: the uint8 mask and
  the product in x's dtype) and an (M, 3r) fp32 product; then the decoded (N, K) weight in x's dtype, F.linear,
  and for the "linear4bit" rounding the LoRA term in bf16 (M, N) ("linear": added in place). Other dtypes:
  first S's operand, dropout(x) in the adapters' dtype (x's copy in that dtype, dropout's output while the
  copy lives, a float32 copy of a 16-bit result), then the decoded weight and F.linear. The larger phase.
* ``fastlora::lora_linear_bwd*``: the largest of three phases, each with dS (M, r) fp32. bf16 x with fp32
  adapters: G·B and Gᵀ·S as (M, 3r) / (N, 3r) fp32 products; the decoded weight with G·W (M, K), and with
  dropout dS·A (M, K fp32), its dropout and their float32 sum (without dropout dS·A is added into G·W, the
  output); x·keep as in the forward with a (3r, K) fp32 product and dA (r, K). Other dtypes: grad_y in float32
  (M, N) with Gᵀ·S (N, r); the decoded weight with dS·A (M, K fp32, and its dropout), G·W (M, K) and their
  float32 sum (M, K); dA's operand dropout(x) as in the forward, with dA (r, K) fp32.

Other ops (torch's own, the elementwise and dequantize ops) are treated as allocating only their
outputs. A dense-weight call (absmax None) decodes nothing.

:func:`cpu_workspace` models fastlora's C++ CPU kernels (csrc/cpu/lora_linear.cpp) for float32 and
float16 x (bfloat16 x on a CPU with native bf16 GEMMs takes another path, not modelled): per thread that
takes a tile, fp32 tiles of ``tile_extent_threads`` rows/columns (8 MiB budget, FASTLORA_CPU_TILE_BYTES)
— forward: LoRA and output tiles (M, nt) and a decoded weight tile (nt, K); backward: dS (M, r), then
dS·A, G·W and dropout(x) tiles (M, kt) and a decoded weight tile (N, kt) — plus float32 copies of
16-bit x and grad_y. It is what the small-scale check on this CPU needs to compare the estimate with
the CPU allocator.
"""

from __future__ import annotations

import math

import torch

from fastlora import backends
from fastlora.kernels.adapter_gemms import split_applies


def _base_name(func) -> str:
    name = func._schema.name if hasattr(func, "_schema") else str(func)
    for suffix in ("_triton", "_reference"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _nbytes(out) -> int:
    if isinstance(out, torch.Tensor):
        return out.numel() * out.element_size()
    if isinstance(out, (tuple, list)):
        return sum(_nbytes(t) for t in out)
    return 0


def _dropped_x(x, adapter_dtype: torch.dtype, dropout_p: float) -> int:
    """Peak bytes of kernels/lora_torch_gemms._dropped_x(...).float(): x copied to the adapters' dtype (none when x
    has it), dropout's output while that copy lives, then a float32 copy of a 16-bit result."""
    m, k = x.shape
    a = torch.empty((), dtype=adapter_dtype).element_size()
    copy = m * k * a if x.dtype != adapter_dtype else 0
    dropped = m * k * a if dropout_p > 0 else 0
    widen = m * k * 4 if adapter_dtype != torch.float32 else 0
    return max(copy + dropped, (dropped if dropout_p > 0 else copy) + widen)


def _kept_x(x, dropout_p: float) -> int:
    """Peak bytes of kernels/lora_torch_gemms._kept_x: the uint8 keep mask and x·keep in x's dtype (nothing without
    dropout)."""
    m, k = x.shape
    return m * k * (1 + x.element_size()) if dropout_p > 0 else 0


def _lora_fwd(args) -> int:
    x, absmax, out_features, lora_A, dropout_p, rounding = args[0], args[2], args[5], args[6], args[10], args[12]
    m, k = x.shape
    decoded = out_features * k * x.element_size() if absmax is not None else 0
    if split_applies(x.dtype, lora_A.dtype):
        s_phase = _kept_x(x, float(dropout_p)) + m * 3 * lora_A.shape[0] * 4
        return max(s_phase, decoded + (m * out_features * 2 if rounding == "linear4bit" else 0))
    return max(_dropped_x(x, lora_A.dtype, float(dropout_p)), decoded)


def _lora_bwd(args, out) -> int:
    x, S, absmax, out_features, lora_A, dropout_p = args[1], args[2], args[4], args[7], args[8], float(args[11])
    need_dx, need_dA, need_dB = args[13], args[14], args[15]
    m, k = x.shape
    n, r, xs = out_features, S.shape[1], x.element_size()
    ds = m * r * 4 if (need_dx or need_dA) else 0
    decoded = n * k * xs if absmax is not None else 0
    del out  # the outputs are made by the last step of each phase: counted by the tracker, not here
    if split_applies(x.dtype, lora_A.dtype):
        ds_db = ds + (m * 3 * r * 4 if ds else 0) + (n * 3 * r * 4 if need_dB else 0)
        dx_phase = ds + decoded + (m * k * xs + 2 * m * k * 4 if dropout_p > 0 else 0) if need_dx else 0
        da_phase = ds + _kept_x(x, dropout_p) + 3 * r * k * 4 + r * k * 4 if need_dA else 0
        return max(ds_db, dx_phase, da_phase)
    ds_db = m * n * 4 + ds + (n * r * 4 if need_dB else 0)
    dx_phase = 0
    if need_dx:
        lora_part = m * k * 4 * (2 if dropout_p > 0 else 1)
        dx_phase = ds + decoded + lora_part + m * k * xs + m * k * 4
    da_phase = ds + _dropped_x(x, lora_A.dtype, dropout_p) + r * k * 4 if need_dA else 0
    return max(ds_db, dx_phase, da_phase)


def _arg(args, kwargs, index: int, name: str):
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else None


def _bnb_gemm(args, kwargs) -> int:
    a, (n, k), blocksize = args[0], args[2], args[4]
    double_quant = _arg(args, kwargs, 7, "absmax_8bit") is not None
    stats = 2 * math.ceil(n * k / blocksize) * 4 if double_quant else 0
    return stats + n * k * a.element_size()


def gpu_workspace(func, args, kwargs, out) -> int:
    """Bytes ``func`` holds internally at its peak beyond its outputs, on a CUDA GPU (see module doc)."""
    name = _base_name(func)
    if name == "fastlora::lora_linear_fwd":
        return _lora_fwd(args)
    if name == "fastlora::lora_linear_bwd":
        return _lora_bwd(args, out)
    if name == "bitsandbytes::gemm_4bit":
        return _bnb_gemm(args, kwargs)
    return 0


def _tile_extent_threads(total: int, row_len: int, threads: int) -> int:
    t = max(16, backends.cpu_tile_bytes() // (4 * max(row_len, 1)) // 16 * 16)
    per_thread = ((total + threads - 1) // threads + 15) // 16 * 16
    return min(min(t, total), max(per_thread, 16))


def _cpu_lora_fwd(args, threads: int) -> int:
    x, absmax, n = args[0], args[2], args[5]
    m, k = x.shape
    widen = m * k * 4 if x.dtype != torch.float32 else 0
    nt = _tile_extent_threads(n, k, threads)
    busy = min(threads, -(-n // nt)) if n else 0
    per_thread = 2 * m * nt * 4 + (nt * k * 4 if absmax is not None or x.dtype != torch.float32 else 0)
    return widen + busy * per_thread


def _cpu_lora_bwd(args, threads: int) -> int:
    grad_y, x, S, absmax, n = args[0], args[1], args[2], args[4], args[7]
    need_dx, need_dA = args[13], args[14]
    m, k = x.shape
    r = S.shape[1]
    widen = m * n * 4 if grad_y.dtype != torch.float32 else 0
    if not (need_dx or need_dA):
        return widen
    ds = m * r * 4
    kt = _tile_extent_threads(k, n, threads) if need_dx else _tile_extent_threads(k, m, threads)
    busy = min(threads, -(-k // kt)) if k else 0
    per_thread = 0
    if need_dx:
        per_thread += 2 * m * kt * 4 + (n * kt * 4 if absmax is not None or x.dtype != torch.float32 else 0)
    if need_dA:
        per_thread += m * kt * 4 + r * kt * 4
    return widen + ds + busy * per_thread


def cpu_workspace(func, args, kwargs, out) -> int:
    """Bytes fastlora's C++ CPU kernel for ``func`` holds internally beyond its outputs (see module doc)."""
    name = func._schema.name if hasattr(func, "_schema") else ""
    threads = torch.get_num_threads()
    if name == "fastlora::lora_linear_fwd":
        return _cpu_lora_fwd(args, threads)
    if name == "fastlora::lora_linear_bwd":
        return _cpu_lora_bwd(args, threads)
    return 0
