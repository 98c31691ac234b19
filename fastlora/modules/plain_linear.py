"""Dense linears without an adapter (``nn.Linear``, transformers ``Conv1D``): nothing to fuse, torch's GEMM
already is the whole layer. They are claimed only so :func:`fastlora.patch` can list them as unchanged."""

from __future__ import annotations

import torch

UNCHANGED = True  # reported under "unchanged", not "skipped": there is nothing fastlora would do here


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def claims(module) -> bool:
    return type(module) is torch.nn.Linear or (_conv1d_type() is not None and type(module) is _conv1d_type())


def skip_reason(module) -> str:
    return "dense linear without an adapter (nothing to fuse)"
