"""Which fp32 reciprocal the quantizers scale blocks by on a device (see fastlora/reference.py): on a
GPU, the hardware's approximate one that bitsandbytes' CUDA kernels use (a Triton kernel), so that
CUDA weights quantize to bitsandbytes' bytes; elsewhere, or without Triton, the correctly rounded one."""

from __future__ import annotations

import torch

from .. import backends
from ..reference import Reciprocal


def gpu_reciprocal(device: torch.device) -> Reciprocal | None:
    """fastlora.kernels.approx_reciprocal for a CUDA ``device`` where Triton runs, else None (the
    reference's correctly rounded reciprocal)."""
    if device.type != "cuda" or not backends.triton_installed() or backends.triton_interpret():
        return None
    from ..kernels.approx_reciprocal import approx_reciprocal

    return approx_reciprocal
