"""transformers' ``Conv1D`` (GPT-2 style): a linear layer whose weight is stored (in_features, out_features).

The fused ops read (out_features, in_features). A layer keeps one transposed copy of its frozen weight,
made on the first call and again when the weight's storage or version changes: a Conv1D model holds its
projection weights twice — a cost in weight memory, none in activations (nothing per call is saved)."""

from __future__ import annotations

import torch


def conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def is_conv1d(module) -> bool:
    cls = conv1d_class()
    return cls is not None and type(module) is cls


def features(module) -> tuple[int, int]:
    """(in_features, out_features) of a Conv1D."""
    return int(module.weight.shape[0]), int(module.weight.shape[1])


class TransposedWeight:
    """weight.T, contiguous, cached per (storage, version, dtype, device, shape). ``get`` replaces the cached
    pair rather than mutating it, so a shallow copy (deepcopy of patch state) never shares a stale one."""

    def __init__(self):
        self.cached = None

    def get(self, weight: torch.Tensor) -> torch.Tensor:
        key = (weight.untyped_storage().data_ptr(), weight._version, weight.dtype, weight.device, weight.shape)
        if self.cached is None or self.cached[0] != key:
            self.cached = (key, weight.detach().t().contiguous())
        return self.cached[1]

    def __deepcopy__(self, memo):
        return TransposedWeight()
