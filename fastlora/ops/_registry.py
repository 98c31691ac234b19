"""Shared plumbing of the op files: argument checks and the per-backend op table.

Every op exists once per backend as a torch.library custom op with a fake implementation:
``fastlora::NAME`` (the compiled extension: CPU kernel, and CUDA kernel where built),
``fastlora::NAME_triton`` and ``fastlora::NAME_reference``. When the extension is missing,
``fastlora::NAME`` is defined from Python with the reference kernel behind it, so callers and
``torch.compile`` always find the same schema.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import _extension, backends

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def define_native(name: str, schema: str, reference_impl: Callable) -> None:
    """Make sure ``fastlora::name`` exists: the extension defines it; without the extension it is
    defined here with the reference implementation."""
    if _extension.load() is not None:
        return
    torch.library.define(f"fastlora::{name}", schema)
    torch.library.impl(f"fastlora::{name}", "default")(reference_impl)


# A resolved backend -> the suffix of its op name ("fastlora::NAME" is the compiled extension's op: cpp on the
# CPU, cuda on a GPU; or, for the ops defined in Python, the one decoding with the extension's kernel).
SUFFIX = {"cpp": "", "cuda": "", "triton": "_triton", "reference": "_reference"}


def backend_op(name: str, backend: str):
    """The OpOverload of op ``name`` for a resolved ``backend`` (a key of ``SUFFIX``)."""
    return getattr(torch.ops.fastlora, name + SUFFIX[backend]).default


def pick(name: str, backend: str, device: torch.device, implemented: tuple[str, ...] = backends.BACKENDS,
         gpu_order: tuple[str, ...] = backends.GPU_ORDER):
    """The OpOverload of op ``name`` for ``backend`` ("auto" resolved for ``device``)."""
    return backend_op(name, backends.resolve(backend, device, implemented, gpu_order))


def define_decode_ops(make_impls: Callable[[str], dict], schemas: dict[str, str], fakes: dict[str, Callable]) -> None:
    """Define, from Python, ops whose only backend-specific step is the 4-bit decode (the GEMMs are torch's):
    ``fastlora::NAME{suffix}`` for each op NAME and suffix "", "_triton", "_reference", each decoding with
    ``fastlora::dequantize_4bit_into{suffix}``. ``make_impls(suffix)`` returns {NAME: implementation}."""
    for suffix in ("", "_triton", "_reference"):
        for name, impl in make_impls(suffix).items():
            op = torch.library.custom_op(f"fastlora::{name}{suffix}", impl, mutates_args=(), schema=schemas[name])
            op.register_fake(fakes[name])


def check_tensor(t, name: str, dtypes: tuple[torch.dtype, ...] | None = None, ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        names = list(dict.fromkeys(str(d).replace("torch.", "") for d in dtypes))  # (float32, x.dtype) may repeat
        want = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
        raise TypeError(f"{name} must have dtype {want}; got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def check_blocksize(blocksize, name: str = "blocksize") -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int):
        raise TypeError(f"{name} must be an int, got {type(blocksize).__name__}")
    if not (32 <= blocksize <= 4096) or blocksize & (blocksize - 1):
        raise ValueError(f"{name} must be a power of two in [32, 4096], got {blocksize}")


def check_quant_type(quant_type) -> None:
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")


def check_float_dtype(dtype, name: str = "dtype") -> None:
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}")


def check_packed_4bit(packed, absmax, blocksize: int, quant_type, numel: int, numel_from: str = "numel") -> None:
    """Checks shared by the dequantize ops: dtypes of the codes and statistics, the blocksize and
    quant_type, and that ``packed`` / ``absmax`` hold exactly what ``numel`` elements need.
    ``numel_from`` names the argument the element count was taken from (``out`` for the ops that
    write into a buffer), so that a wrong count is reported against it rather than against ``packed``."""
    check_tensor(packed, "packed", (torch.uint8,))
    check_tensor(absmax, "absmax", (torch.float32,))
    check_blocksize(blocksize)
    check_quant_type(quant_type)
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    if packed.numel() != (numel + 1) // 2 and numel_from != "numel":
        nbytes = packed.numel()
        counts = [0] if nbytes == 0 else [2 * nbytes - 1, 2 * nbytes]
        # When packed and absmax agree on an element count, the odd one out is the tensor numel came from.
        if any(-(-n // blocksize) == absmax.numel() for n in counts):
            fits = " or ".join(map(str, counts))
            raise ValueError(f"{numel_from} must have {fits} elements, the count that packed ({nbytes} bytes) and "
                             f"absmax ({absmax.numel()} blocks of {blocksize}) hold; got {numel}")
    if packed.numel() != (numel + 1) // 2:
        raise ValueError(f"packed must hold ceil(numel/2) = {(numel + 1) // 2} bytes for numel={numel}, "
                         f"got {packed.numel()}")
    blocks = -(-numel // blocksize)
    if absmax.numel() != blocks:
        raise ValueError(f"absmax must hold ceil(numel/blocksize) = {blocks} values for numel={numel}, "
                         f"blocksize={blocksize}; got {absmax.numel()}")


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"tensors must be on one device, got {listing}")
