"""Triton kernels of fastlora (installed as ``fastlora.kernels``; the bottom layer: imports no ``fastlora``).

Importing this package is cheap: it does not import Triton. Each kernel module (``dequantize_4bit``,
...) is imported on demand by the op layer, or by :func:`all_compile_specs` for the ahead-of-time
compile check (``python -m fastlora compile-check``).

Compile-check registry
----------------------
Every kernel module that defines Triton kernels also defines a module-level function

    def compile_specs() -> list[CompileSpec]: ...

returning one :class:`CompileSpec` per kernel configuration its launchers can produce (every
constexpr combination and ``num_warps`` they use). :func:`all_compile_specs` imports every module of
this package (found with ``pkgutil``, so a new kernel file needs no edit here) and concatenates
their specs. The compile check then builds each spec with ``triton.compile(ASTSource(...))`` for
each requested GPU architecture, without needing a GPU.

Triton kernels only run on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set in
the environment before the kernel module was imported (the ``@triton.jit`` decorator reads it when
the kernel is defined).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FP_FMA_PTX", "CompileSpec", "all_compile_specs", "kernel_modules"]


@dataclass(frozen=True)
class CompileSpec:
    """One ahead-of-time compilable configuration of a Triton kernel.

    kernel:      short kernel name shown in the report, e.g. ``"dequantize_4bit"``.
    config:      human-readable label of this configuration, unique per kernel,
                 e.g. ``"bs64 bf16 B4096 w8"``.
    fn:          the ``@triton.jit`` function.
    signature:   every parameter name -> Triton type string, in parameter order: pointers as
                 ``"*u8"``, ``"*fp32"``, ``"*bf16"``, ``"*fp16"``; scalars as ``"i32"``, ``"i64"``,
                 ``"fp32"``; constexpr parameters as ``"constexpr"``.
    constexprs:  value of each constexpr parameter, by name.
    aligned:     parameters the launcher normally passes 16-divisible (16-byte-aligned pointers,
                 sizes that are multiples of 16); the JIT specializes on that at launch time, so the
                 compile check must too, or it would report code without vectorized memory access.
    num_warps, num_stages: launch options as the launcher passes them.
    options:     any further Triton compile options the launcher passes (e.g. ``enable_fp_fusion``).
    forbid_ptx:  label -> regular expression that must not match the kernel's PTX, e.g.
                 ``{"fp fma": FP_FMA_PTX}`` for a kernel that must round a multiply and an add
                 separately; a match fails the check, otherwise ``"no <label>"`` is reported.
    """

    kernel: str
    config: str
    fn: Any
    signature: Mapping[str, str]
    constexprs: Mapping[str, Any] = field(default_factory=dict)
    aligned: tuple[str, ...] = ()
    num_warps: int = 4
    num_stages: int = 3
    options: Mapping[str, Any] = field(default_factory=dict)
    forbid_ptx: Mapping[str, str] = field(default_factory=dict)


# Floating-point fused multiply-add in PTX (fma.rn.f32, fma.rn.ftz.f32, mad.f32, fma.rn.bf16, ...),
# not the integer mad.lo / mad.wide used for addressing.
FP_FMA_PTX = r"\b(?:fma|mad)\.(?:[a-z0-9]+\.)*b?f(?:16|32|64)"


def kernel_modules() -> list[str]:
    """Names of the kernel modules of this package (``"dequantize_4bit"``, ...), sorted."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def all_compile_specs() -> list[CompileSpec]:
    """Import every kernel module and collect its ``compile_specs()`` (modules without one add nothing)."""
    specs: list[CompileSpec] = []
    for name in kernel_modules():
        module = importlib.import_module(f"{__name__}.{name}")
        provider = getattr(module, "compile_specs", None)
        if provider is not None:
            specs.extend(provider())
    return specs
