"""Which implementation runs an op: discovery of the available backends and the choice per call.

Backends:
  ``reference``  torch code in fastlora/reference.py, any device (always available)
  ``cpp``        the C++ CPU kernels of fastlora._C (CPU tensors)
  ``cuda``       the CUDA kernels of fastlora._C (CUDA tensors; built only where torch has CUDA)
  ``triton``     the Triton kernels in fastlora.kernels (CUDA tensors; CPU tensors too when
                 TRITON_INTERPRET=1 is set, which is how the tests run them)
``auto`` picks, by default, triton, then cuda, then reference on a GPU, and cpp, then reference on
the CPU; an op whose CUDA kernel measures faster passes its own GPU order (``GPU_ORDER_CUDA_FIRST``).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from . import _extension

BACKENDS = ("reference", "cpp", "cuda", "triton")
GPU_ORDER = ("triton", "cuda", "reference")
# Bandwidth-bound 4-bit dequantization: the CUDA kernel moved 2.0-2.4 TB/s on an H100 (NF4 ->
# bf16/fp32, 14336x4096), the Triton kernel 0.5-0.9 TB/s (bench/bench_dequantize_gpu.py).
GPU_ORDER_CUDA_FIRST = ("cuda", "triton", "reference")


def stream_capturing(device: torch.device) -> bool:
    """Whether work on ``device`` is being captured into a CUDA graph: no host read of device data is possible
    then (it would synchronize a capturing stream), so the checks that need one are skipped (the reference and the
    Triton launchers read this; the CUDA op asks c10's capture status itself)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def extension_cuda() -> bool:
    ext = _extension.load()
    return ext is not None and bool(ext.with_cuda())


@functools.cache
def _native_bf16() -> bool:
    ext = _extension.load()
    return ext is not None and "native-bf16" in ext.cpu_features()


def cpu_bf16_gemms() -> bool:
    """Whether bf16 GEMMs on this CPU run in bf16 (the C++ kernels' bf16 GEMM mode, csrc/cpu/cpu_features.h
    use_bf16_gemm): FASTLORA_CPU_BF16_GEMM=0|1 when set, else whether the CPU has native bf16 (AVX512-BF16 or
    AMX). Without them bf16 GEMMs are computed in fp32: torch's own bf16 GEMMs are slow there."""
    env = os.environ.get("FASTLORA_CPU_BF16_GEMM", "")
    return env[0] != "0" if env else _native_bf16()


def cpu_tile_bytes() -> int:
    """fp32 bytes one decoded / widened block of a weight may take on the CPU: FASTLORA_CPU_TILE_BYTES when it
    is a positive integer, else 8 MiB (csrc/cpu/lora_linear.cpp tile_budget_bytes reads the same setting)."""
    try:
        value = int(os.environ.get("FASTLORA_CPU_TILE_BYTES", ""))
    except ValueError:
        value = 0
    return value if value > 0 else 8 << 20


def available(device_type: str = "cpu") -> dict[str, bool]:
    """Backend name -> whether it can run tensors on ``device_type`` ("cpu" or "cuda") here."""
    ext = _extension.load()
    on_gpu = device_type == "cuda"
    return {
        "reference": True,
        "cpp": ext is not None and not on_gpu,
        "cuda": on_gpu and extension_cuda() and torch.cuda.is_available(),
        "triton": triton_installed() and (triton_interpret() or (on_gpu and torch.cuda.is_available())),
    }


def resolve(backend: str, device: torch.device, implemented: tuple[str, ...] = BACKENDS,
            gpu_order: tuple[str, ...] = GPU_ORDER) -> str:
    """The backend that runs a call on ``device``: ``backend`` itself when it can, else a ValueError
    naming what is available; ``"auto"`` picks the fastest available one. ``implemented`` lists the
    backends the op has."""
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    device_type = "cuda" if device.type == "cuda" else "cpu"
    if device.type not in ("cpu", "cuda"):
        return "reference"
    ok = {name: yes and name in implemented for name, yes in available(device_type).items()}
    if backend == "auto":
        order = gpu_order if device_type == "cuda" else ("cpp", "reference")
        return next(name for name in order if ok[name])
    if not ok[backend]:
        have = [name for name, yes in ok.items() if yes]
        raise ValueError(f"backend {backend!r} cannot run on {device.type} tensors here; available: {have}")
    return backend
