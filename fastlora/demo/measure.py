"""What the demo measures besides time: bytes saved for backward and the peak memory of a training step."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def _storage_key(t: torch.Tensor):
    return (t.device.type, t.device.index, t.untyped_storage().data_ptr())


def _quant_state_tensors(param) -> list[torch.Tensor]:
    """The statistics a bitsandbytes ``Params4bit`` keeps outside parameters and buffers (absmax, code and
    the nested ones of double quant); fastlora keeps them as buffers."""
    out, state = [], getattr(param, "quant_state", None)
    while state is not None:
        out += [t for t in (getattr(state, "absmax", None), getattr(state, "code", None),
                            getattr(state, "offset", None)) if isinstance(t, torch.Tensor)]
        state = getattr(state, "state2", None)
    return out


def _resident_tensors(model, optimizer, grads: bool) -> list[torch.Tensor]:
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [t for p in model.parameters() for t in _quant_state_tensors(p)]
    if grads:
        tensors += [p.grad for p in model.parameters() if p.grad is not None]
    if optimizer is not None:
        for state in optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return [t for t in tensors if t.device.type != "meta"]


def resident_storages(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> set:
    """Keys of the storages that exist between steps: parameters, buffers (fastlora's 4-bit codes are
    buffers, bitsandbytes' are parameters with their statistics on the side), gradients and optimizer
    state."""
    return {_storage_key(t) for t in _resident_tensors(model, optimizer, grads=True)}


def resident_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes of the distinct storages of the weights (4-bit codes and statistics included), LoRA
    parameters and optimizer state."""
    sizes = {_storage_key(t): t.untyped_storage().nbytes() for t in _resident_tensors(model, optimizer, grads=False)}
    return sum(sizes.values())


class SavedTensorBytes:
    """Context manager: while active, every tensor autograd saves for backward is recorded;
    ``nbytes`` is the total size of the distinct storages saved (a storage saved by several ops, or
    through several views, counts once), leaving out the storages in ``exclude`` (the parameters and
    buffers: they exist anyway)."""

    def __init__(self, exclude: set):
        self.exclude = exclude
        self.storages: dict = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in self.exclude and key not in self.storages:
            self.storages[key] = t.untyped_storage().nbytes()
        return t

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of the tensors created while active and still alive, tracked per storage at the
    dispatcher (every op's outputs on a storage none of its inputs has; counted until the storage is freed).
    Storages in ``exclude`` (what exists between steps) are not counted. Scratch memory a compiled
    kernel allocates and frees inside one op is not seen; on CUDA use the allocator's statistics."""

    def __init__(self, exclude: set):
        super().__init__()
        self.exclude = exclude
        self.live = 0
        self.peak = 0
        self._tracked: set = set()

    def _release(self, key, nbytes):
        self._tracked.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # An output on an input's storage (in-place ops, views) is not new memory: if it is not tracked
        # yet, it existed before the tracker started.
        inputs = {_storage_key(t) for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            key = _storage_key(t)
            if key in self.exclude or key in self._tracked or key in inputs:
                continue
            storage = t.untyped_storage()
            nbytes = storage.nbytes()
            self._tracked.add(key)
            self.live += nbytes
            weakref.finalize(storage, self._release, key, nbytes)
        self.peak = max(self.peak, self.live)
        return out
