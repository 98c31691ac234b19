"""Triton kernel: the GPU's fast fp32 reciprocal, one PTX instruction per element.

Code built with nvcc's ``--use_fast_math`` computes ``1.0f / x`` with an approximate reciprocal (within
an ulp or so of the correctly rounded one, subnormals flushed to zero), not with IEEE division.
bitsandbytes' CUDA quantizers scale every block by that reciprocal of its absmax, so reproducing their
bytes on a GPU needs the same instruction; torch's ``1 / x`` is correctly rounded and differs from it
for some absmax values, which moves a code wherever a scaled value lies within an ulp of a threshold.

The instruction is a parameter (``INSTRUCTIONS``) so that a GPU check can tell which one a library was
built with; fastlora uses ``DEFAULT``. The kernel has no interpreter form (inline PTX): it runs on CUDA
tensors only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import CompileSpec

__all__ = ["DEFAULT", "INSTRUCTIONS", "approx_reciprocal", "compile_specs"]

# name -> PTX computing $0 = 1 / $1 in fp32 (0f3F800000 is 1.0f).
INSTRUCTIONS = {
    "rcp.approx.ftz": "rcp.approx.ftz.f32 $0, $1;",
    "rcp.approx": "rcp.approx.f32 $0, $1;",
    "div.approx.ftz": "div.approx.ftz.f32 $0, 0f3F800000, $1;",
    "div.full.ftz": "div.full.ftz.f32 $0, 0f3F800000, $1;",
    "rcp.rn.ftz": "rcp.rn.ftz.f32 $0, $1;",
}
DEFAULT = "rcp.approx.ftz"
_BLOCK = 1024


@triton.jit
def _reciprocal_kernel(x_ptr, out_ptr, n, ASM: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    x = tl.load(x_ptr + offsets, mask=inside, other=1.0)
    y = tl.inline_asm_elementwise(ASM, "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)
    tl.store(out_ptr + offsets, y, mask=inside)


def approx_reciprocal(x: torch.Tensor, instruction: str = DEFAULT) -> torch.Tensor:
    """``1 / x`` by the PTX ``instruction`` (a key of ``INSTRUCTIONS``).

    x: float32 CUDA tensor, any shape. Returns a new float32 tensor of x's shape."""
    if instruction not in INSTRUCTIONS:
        raise ValueError(f"instruction must be one of {sorted(INSTRUCTIONS)}, got {instruction!r}")
    if x.dtype != torch.float32 or x.device.type != "cuda":
        raise ValueError(f"x must be a float32 CUDA tensor, got {x.dtype} on {x.device}")
    flat = x.contiguous().reshape(-1)
    out = torch.empty_like(flat)
    if flat.numel():
        grid = (triton.cdiv(flat.numel(), _BLOCK),)
        _reciprocal_kernel[grid](flat, out, flat.numel(), ASM=INSTRUCTIONS[instruction], BLOCK=_BLOCK,
                                 enable_fp_fusion=False)  # one instruction: nothing to contract
    return out.reshape(x.shape)


def compile_specs() -> list[CompileSpec]:
    return [
        CompileSpec(kernel="approx_reciprocal", config=f"{name} B{_BLOCK}", fn=_reciprocal_kernel,
                    signature={"x_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32", "ASM": "constexpr",
                               "BLOCK": "constexpr"},
                    constexprs={"ASM": asm, "BLOCK": _BLOCK}, aligned=("x_ptr", "out_ptr"),
                    options={"enable_fp_fusion": False})
        for name, asm in INSTRUCTIONS.items()
    ]
