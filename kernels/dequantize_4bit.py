"""Triton kernels: bitsandbytes 4-bit (NF4 / FP4) dequantization and nested (double-quant) absmax.

Format (shared/DESIGN.md §2; per-element math as in csrc/include/fastlora/quant4.h):
  * element i of the flattened weight is the nibble of byte i // 2, even i in the HIGH nibble;
  * ``w[i] = dtype(fp32(TABLE[nibble] * absmax[i // blocksize]))``: one fp32 multiply, then one
    round-to-nearest-even cast to the output dtype;
  * nested statistics: ``absmax[b] = fp32(fp32(code[q[b]] * absmax2[b // blocksize2]) + offset)``,
    two separate roundings, never a fused multiply-add.

Both launchers run on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before
this module was imported. Results are bit-exact with ``torch.ops.fastlora.dequantize_4bit`` /
``dequantize_absmax`` and with bitsandbytes.

This module is the bottom layer: it imports torch and triton only (plus its own package's registry).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import FP_FMA_PTX, CompileSpec

__all__ = [
    "ABSMAX_CONFIG",
    "DEQUANT_CONFIGS",
    "AbsmaxConfig",
    "DequantConfig",
    "code_table",
    "compile_specs",
    "dequantize_4bit",
    "dequantize_absmax",
    "pick_dequant_config",
]

# NF4 code book, index -> value (the fp32 values of nf4_value in quant4.h).
_NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
# FP4 magnitudes of the low three bits, before the division by 12 (fp4_value in quant4.h).
_FP4_MAGNITUDES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)

_OUT_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_BLOCKSIZES = tuple(1 << k for k in range(5, 13))  # 32 .. 4096


def code_table(quant_type: str) -> torch.Tensor:
    """The 16-entry decode table of ``quant_type`` ("nf4" | "fp4"): fp32[16] on the CPU, index = code.

    FP4 is ``±magnitude / 12`` divided in fp32 as quant4.h does; code 8 is ``-0.0``.
    """
    if quant_type == "nf4":
        return torch.tensor(_NF4_VALUES, dtype=torch.float32)
    if quant_type == "fp4":
        mag = torch.tensor(_FP4_MAGNITUDES, dtype=torch.float32) / 12.0
        return torch.cat([mag, -mag])  # negating +0 gives the -0 of code 8
    raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")


def _is_interpreted(fn) -> bool:
    # Under TRITON_INTERPRET=1, @triton.jit returns an InterpretedFunction instead of a JITFunction.
    return not isinstance(fn, triton.runtime.JITFunction)


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _dequantize_4bit_kernel(
    packed_ptr,  # *u8  [n_bytes]
    absmax_ptr,  # *fp32 [ceil(numel / (2 * HALF_BLOCKSIZE))]
    table_ptr,  # *fp32 [16]
    out_ptr,  # *fp32 | *bf16 | *fp16 [numel]
    n_bytes,  # ceil(numel / 2)
    numel,
    NBLK: tl.constexpr,
    CHUNKS: tl.constexpr,
    VEC: tl.constexpr,
    HALF_BLOCKSIZE: tl.constexpr,
    SOFT_BF16: tl.constexpr,
):
    # One program decodes NBLK * CHUNKS * VEC consecutive bytes (twice as many elements), viewed as
    # [NBLK, CHUNKS, VEC]: each dim-0 slice lies in one quantization block (both nibbles of a byte
    # share a block since blocksize is even), so absmax is loaded once per block and broadcast.
    # VEC bytes decode to 16 output bytes: the byte load and the output store then get the same
    # register layout, and Triton needs no shared-memory round trip between them.
    BYTES: tl.constexpr = NBLK * CHUNKS * VEC
    start = tl.program_id(0).to(tl.int64) * BYTES
    # 64-bit arithmetic only on the per-program base; the tile offsets below stay 32-bit.
    packed_ptr += start
    out_ptr += 2 * start
    absmax_ptr += start // HALF_BLOCKSIZE
    bytes_left = tl.minimum(n_bytes - start, BYTES).to(tl.int32)
    elems_left = tl.minimum(numel - 2 * start, 2 * BYTES).to(tl.int32)

    blk = tl.arange(0, NBLK)[:, None, None]
    chunk = tl.arange(0, CHUNKS)[None, :, None]
    offs = blk * (CHUNKS * VEC) + chunk * VEC + tl.arange(0, VEC)[None, None, :]
    b = tl.load(packed_ptr + offs, mask=offs < bytes_left, other=0).to(tl.int32)
    blk_start = blk * (CHUNKS * VEC)  # [NBLK, 1, 1]
    scale = tl.load(absmax_ptr + blk_start // HALF_BLOCKSIZE, mask=blk_start < bytes_left, other=0.0)
    # The 16-entry table is a 64-byte gather that stays in L1; a select tree would cost ~15 ALU ops
    # per element in a kernel that must stay memory-bound.
    hi = tl.load(table_ptr + (b >> 4)) * scale
    lo = tl.load(table_ptr + (b & 15)) * scale
    w = tl.interleave(hi, lo)  # [NBLK, CHUNKS, 2*VEC]: element 2j from the high nibble of byte j

    if SOFT_BF16:
        # Triton's interpreter truncates fp32 -> bf16; round to nearest even in integer arithmetic
        # (as float_to_bf16_bits in quant4.h). On a GPU the cast below is cvt.rn, already RNE.
        u = w.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = tl.where((u & 0x7FFFFFFF) > 0x7F800000, (u >> 16) | 0x40, r)
        w = r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        w = w.to(out_ptr.dtype.element_ty)
    eoffs = 2 * (blk * (CHUNKS * VEC) + chunk * VEC) + tl.arange(0, 2 * VEC)[None, None, :]
    tl.store(out_ptr + eoffs, w, mask=eoffs < elems_left)


@triton.jit
def _dequantize_absmax_kernel(
    qabsmax_ptr,  # *u8  [n]
    code_ptr,  # *fp32 [256]
    absmax2_ptr,  # *fp32 [ceil(n / blocksize)]
    offset_ptr,  # *fp32 [1]
    out_ptr,  # *fp32 [n]
    n,
    blocksize,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    q = tl.load(qabsmax_ptr + offs, mask=mask, other=0).to(tl.int32)
    c = tl.load(code_ptr + q)
    a2 = tl.load(absmax2_ptr + offs // blocksize, mask=mask, other=0.0)
    offset = tl.load(offset_ptr)
    # Two roundings: the launcher compiles this kernel with enable_fp_fusion=False, so LLVM does not
    # contract the pair into an FMA and ptxas runs with --fmad=false (compile-check verifies the PTX).
    tl.store(out_ptr + offs, c * a2 + offset, mask=mask)


# --------------------------------------------------------------------------------------------------
# Configurations (enumerated by compile_specs for the ahead-of-time compile check)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DequantConfig:
    """Tile of the 4-bit dequant kernel: ``block_bytes`` packed bytes (2x elements) per program."""

    block_bytes: int
    num_warps: int

    def label(self) -> str:
        return f"B{self.block_bytes} w{self.num_warps}"


@dataclass(frozen=True)
class AbsmaxConfig:
    """Tile of the nested-absmax kernel: ``block`` outputs per program."""

    block: int
    num_warps: int


# 16 packed bytes (32 outputs) per thread in the large tile, 8 in the small one, which keeps enough
# programs in flight for small weights. Loads are VEC bytes and stores 16 bytes per instruction.
DEQUANT_CONFIGS: tuple[DequantConfig, ...] = (DequantConfig(1024, 4), DequantConfig(4096, 8))
ABSMAX_CONFIG = AbsmaxConfig(block=512, num_warps=4)
# Below this many packed bytes the small tile is used (about 4 programs per SM of a 132-SM GPU with
# the large tile).
_SMALL_BYTES = 4096 * 132 * 4


def pick_dequant_config(n_bytes: int) -> DequantConfig:
    """The configuration the launcher uses for ``n_bytes`` packed bytes."""
    return DEQUANT_CONFIGS[0] if n_bytes < _SMALL_BYTES else DEQUANT_CONFIGS[1]


def _tile(config: DequantConfig, blocksize: int, dtype: torch.dtype) -> dict[str, int]:
    """Constexprs of the dequant kernel: NBLK quant blocks of CHUNKS * VEC bytes per program."""
    vec = 8 // dtype.itemsize  # VEC bytes -> 2 * VEC outputs = 16 bytes (one 128-bit store)
    block_bytes = min(blocksize // 2, config.block_bytes)
    return {
        "NBLK": config.block_bytes // block_bytes,
        "CHUNKS": block_bytes // vec,
        "VEC": vec,
        "HALF_BLOCKSIZE": blocksize // 2,
    }


_ENABLE_FP_FUSION = False  # both kernels: no mul+add contraction (bit-exactness)


def compile_specs() -> list[CompileSpec]:
    """Every configuration the launchers below can produce on a GPU (see ``CompileSpec``)."""
    specs = []
    for config in DEQUANT_CONFIGS:
        for blocksize in _BLOCKSIZES:
            for dtype, dtype_name in _OUT_DTYPES.items():
                specs.append(
                    CompileSpec(
                        kernel="dequantize_4bit",
                        config=f"bs{blocksize} {dtype_name} {config.label()}",
                        fn=_dequantize_4bit_kernel,
                        signature={
                            "packed_ptr": "*u8",
                            "absmax_ptr": "*fp32",
                            "table_ptr": "*fp32",
                            "out_ptr": f"*{dtype_name}",
                            "n_bytes": "i32",
                            "numel": "i32",
                            "NBLK": "constexpr",
                            "CHUNKS": "constexpr",
                            "VEC": "constexpr",
                            "HALF_BLOCKSIZE": "constexpr",
                            "SOFT_BF16": "constexpr",
                        },
                        constexprs={**_tile(config, blocksize, dtype), "SOFT_BF16": False},
                        aligned=("packed_ptr", "absmax_ptr", "table_ptr", "out_ptr", "n_bytes", "numel"),
                        num_warps=config.num_warps,
                        options={"enable_fp_fusion": _ENABLE_FP_FUSION},
                    )
                )
    specs.append(
        CompileSpec(
            kernel="dequantize_absmax",
            config=f"B{ABSMAX_CONFIG.block} w{ABSMAX_CONFIG.num_warps}",
            fn=_dequantize_absmax_kernel,
            signature={
                "qabsmax_ptr": "*u8",
                "code_ptr": "*fp32",
                "absmax2_ptr": "*fp32",
                "offset_ptr": "*fp32",
                "out_ptr": "*fp32",
                "n": "i32",
                "blocksize": "i32",
                "BLOCK": "constexpr",
            },
            constexprs={"BLOCK": ABSMAX_CONFIG.block},
            aligned=("qabsmax_ptr", "code_ptr", "absmax2_ptr", "offset_ptr", "out_ptr", "n", "blocksize"),
            num_warps=ABSMAX_CONFIG.num_warps,
            options={"enable_fp_fusion": _ENABLE_FP_FUSION},
            forbid_ptx={"fp fma": FP_FMA_PTX},
        )
    )
    return specs


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------

_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def _device_table(quant_type: str, device: torch.device) -> torch.Tensor:
    key = (quant_type, device)
    table = _TABLES.get(key)
    if table is None:
        table = _TABLES[key] = code_table(quant_type).to(device)
    return table


def _check_device(name: str, t: torch.Tensor, device: torch.device, fn) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    if t.device.type != "cuda" and not _is_interpreted(fn):
        raise ValueError(
            f"Triton kernels need CUDA tensors ({name} is on {t.device}); "
            "set TRITON_INTERPRET=1 before importing fastlora.kernels to run them on the CPU"
        )


def _flat(name: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    return t.reshape(-1).contiguous()


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    quant_type: str,
    numel: int,
    dtype: torch.dtype,
    *,
    config: DequantConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode ``numel`` elements of a bitsandbytes 4-bit weight.

    packed:     uint8[>= ceil(numel / 2)] (any shape, read flattened; other storage dtypes are read
                as their bytes), element i in byte i // 2, even i in the high nibble.
    absmax:     fp32[>= ceil(numel / blocksize)] per-block scales (already de-nested).
    blocksize:  power of two in [32, 4096].
    quant_type: "nf4" or "fp4".
    dtype:      torch.float32, torch.bfloat16 or torch.float16.
    config:     tile to use (one of ``DEQUANT_CONFIGS``); default: ``pick_dequant_config``.
    out:        optional contiguous ``dtype`` tensor of ``numel`` elements on packed's device to
                write into (a reused workspace) instead of a fresh allocation.
    Returns ``dtype[numel]`` (``out`` when given) on packed's device:
    ``w[i] = dtype(fp32(TABLE[nibble(i)] * absmax[i // blocksize]))``, rounded to nearest even.
    """
    if dtype not in _OUT_DTYPES:
        raise TypeError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    if blocksize not in _BLOCKSIZES:
        raise ValueError(f"blocksize must be a power of two in [32, 4096], got {blocksize}")
    numel = int(numel)
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    if packed.dtype != torch.uint8:
        packed = packed.contiguous().view(torch.uint8)
    packed = packed.reshape(-1).contiguous()
    absmax = _flat("absmax", absmax, torch.float32)
    n_bytes = (numel + 1) // 2
    n_blocks = (numel + blocksize - 1) // blocksize
    if packed.numel() < n_bytes:
        raise ValueError(f"packed holds {packed.numel()} bytes, {n_bytes} needed for {numel} elements")
    if absmax.numel() < n_blocks:
        raise ValueError(f"absmax holds {absmax.numel()} scales, {n_blocks} needed for {numel} elements")
    device = packed.device
    if out is None:
        out = torch.empty(numel, dtype=dtype, device=device)
    elif out.dtype != dtype or out.numel() != numel or not out.is_contiguous() or out.device != device:
        raise ValueError(f"out must be a contiguous {dtype} tensor of {numel} elements on {device}, got "
                         f"{out.dtype}, {out.numel()} elements, contiguous={out.is_contiguous()}, on {out.device}")
    if numel == 0:
        return out
    table = _device_table(quant_type, device)
    fn = _dequantize_4bit_kernel
    _check_device("packed", packed, device, fn)
    _check_device("absmax", absmax, device, fn)
    config = config or pick_dequant_config(n_bytes)
    grid = (triton.cdiv(n_bytes, config.block_bytes),)
    fn[grid](
        packed,
        absmax,
        table,
        out,
        n_bytes,
        numel,
        **_tile(config, blocksize, dtype),
        SOFT_BF16=dtype == torch.bfloat16 and _is_interpreted(fn),
        num_warps=config.num_warps,
        enable_fp_fusion=_ENABLE_FP_FUSION,
    )
    return out


def dequantize_absmax(
    qabsmax: torch.Tensor,
    code: torch.Tensor,
    absmax2: torch.Tensor,
    offset: torch.Tensor,
    blocksize: int,
) -> torch.Tensor:
    """De-nest double-quantized block scales.

    qabsmax:   uint8[n] 8-bit codes of the per-block absmax.
    code:      fp32[256] the 8-bit code book (bitsandbytes' dynamic map).
    absmax2:   fp32[>= ceil(n / blocksize)] second-level scales.
    offset:    fp32 0-dim or 1-element tensor (the mean subtracted before quantizing); may be on the
               host when the others are on the GPU.
    blocksize: second-level block size (bitsandbytes uses 256), > 0.
    Returns fp32[n]: ``fp32(fp32(code[q[i]] * absmax2[i // blocksize]) + offset)``, two roundings.
    """
    qabsmax = _flat("qabsmax", qabsmax, torch.uint8)
    code = _flat("code", code, torch.float32)
    absmax2 = _flat("absmax2", absmax2, torch.float32)
    offset = _flat("offset", offset, torch.float32)
    blocksize = int(blocksize)
    if blocksize <= 0:
        raise ValueError(f"blocksize must be positive, got {blocksize}")
    n = qabsmax.numel()
    if n >= 2**31:
        raise ValueError(f"dequantize_absmax supports fewer than 2**31 blocks, got {n}")
    if code.numel() != 256:
        raise ValueError(f"code must hold 256 values, got {code.numel()}")
    if offset.numel() != 1:
        raise ValueError(f"offset must be a single value, got {offset.numel()}")
    if absmax2.numel() < (n + blocksize - 1) // blocksize:
        raise ValueError(f"absmax2 holds {absmax2.numel()} scales, {(n + blocksize - 1) // blocksize} needed")
    device = qabsmax.device
    out = torch.empty(n, dtype=torch.float32, device=device)
    if n == 0:
        return out
    if offset.device != device:
        offset = offset.to(device)  # a 4-byte copy; bitsandbytes may keep the offset on the host
    fn = _dequantize_absmax_kernel
    for name, t in (("qabsmax", qabsmax), ("code", code), ("absmax2", absmax2), ("offset", offset)):
        _check_device(name, t, device, fn)
    grid = (triton.cdiv(n, ABSMAX_CONFIG.block),)
    fn[grid](
        qabsmax,
        code,
        absmax2,
        offset,
        out,
        n,
        blocksize,
        BLOCK=ABSMAX_CONFIG.block,
        num_warps=ABSMAX_CONFIG.num_warps,
        enable_fp_fusion=_ENABLE_FP_FUSION,
    )
    return out
