"""A peak-memory tracker for one training step, built on ``TorchDispatchMode`` and tensor storage
lifetimes. It runs the same way on real tensors and under ``FakeTensorMode`` (where nothing is
allocated), so the estimate at real scale and the check at small scale use one accounting.

What is counted: every tensor storage that exists while the tracker is active — the storages
registered before the step (:meth:`MemoryTracker.register`: weights, buffers, inputs) and every new
storage an operator returns (views and in-place results share their input's storage and are not
counted again). A storage is counted from the operator that returns it until its last reference
dies (a weak reference callback), the way a caching allocator without fragmentation would see it.

Not visible through the dispatcher: memory an operator allocates inside its own kernel and frees
before returning (a decoded weight, a float32 copy of the gradient). Such workspaces are added as
transients by an optional ``workspace(func, args, kwargs, out) -> bytes`` model
(:mod:`fastlora.bench.op_workspace`), at the moment the operator returns.

Categories (the breakdown of the peak): ``parameters`` (frozen weights and buffers),
``adapters+optimizer`` (trainable parameters, their gradients, optimizer state), ``activations``
(made during forward), ``temporaries`` (made during backward, recomputed activations of checkpointed
blocks included) and ``workspace`` (the modelled transients).
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

CATEGORIES = ("parameters", "adapters+optimizer", "activations", "temporaries", "workspace")
PHASES = {"forward": "activations", "backward": "temporaries", "optimizer": "adapters+optimizer"}


def _storage(t: torch.Tensor):
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse, nested or other storage-less tensors
        return None


class MemoryTracker(TorchDispatchMode):
    """Live bytes per category and the peak (with its breakdown) over the tracked region.

    Usage: ``tracker.register(t, "parameters")`` for what exists before; ``with tracker:`` around the
    step; ``tracker.phase = "backward"`` (or "forward" / "optimizer") to say which category new
    storages get; ``tracker.retag(t, category)`` to move a storage (a gradient) to another category."""

    def __init__(self, workspace=None, region=None):
        super().__init__()
        self.workspace = workspace
        self.region = region  # optional () -> str | None: the region now running (its own peak is kept)
        self.region_peaks: dict[str, int] = {}
        self.phase = "forward"
        self.current = dict.fromkeys(CATEGORIES, 0)
        self.peak = 0
        self.peak_breakdown = dict(self.current)
        self.peak_op = None
        self.ops = 0
        self.namespaces: dict[str, int] = {}  # operator namespace ("aten", "fastlora", "bitsandbytes") -> calls
        self._live: dict[int, list] = {}  # storage key -> [nbytes, category, weakref]

    @property
    def total(self) -> int:
        return sum(self.current.values())

    def _key(self, st) -> int:
        return st._cdata

    def _add(self, t: torch.Tensor, category: str) -> None:
        st = _storage(t)
        if st is None:
            return
        key = self._key(st)
        if key in self._live:
            return
        nbytes = st.nbytes()
        entry = [nbytes, category, None]

        def release(_ref, key=key, entry=entry):
            if self._live.get(key) is entry:
                del self._live[key]
                self.current[entry[1]] -= entry[0]

        entry[2] = weakref.ref(st, release)
        self._live[key] = entry
        self.current[category] += nbytes

    def register(self, t: torch.Tensor, category: str) -> None:
        """Count a storage that already exists (weights, buffers, inputs) under ``category``."""
        if category not in CATEGORIES:
            raise ValueError(f"category must be one of {CATEGORIES}, got {category!r}")
        self._add(t, category)
        self._update_peak(0, "register")

    def retag(self, t: torch.Tensor, category: str) -> None:
        st = _storage(t)
        entry = None if st is None else self._live.get(self._key(st))
        if entry is None:
            self._add(t, category)
            return
        self.current[entry[1]] -= entry[0]
        entry[1] = category
        self.current[category] += entry[0]

    def _update_peak(self, transient: int, op) -> None:
        total = self.total + transient
        region = self.region() if self.region is not None else None
        if region is not None and total > self.region_peaks.get(region, 0):
            self.region_peaks[region] = total
        if total > self.peak:
            self.peak = total
            self.peak_breakdown = dict(self.current)
            self.peak_breakdown["workspace"] = transient
            self.peak_op = str(op)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops += 1
        namespace = getattr(func, "namespace", "?")
        self.namespaces[namespace] = self.namespaces.get(namespace, 0) + 1
        category = PHASES[self.phase]
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t, category)
        transient = self.workspace(func, args, kwargs, out) if self.workspace is not None else 0
        self._update_peak(transient, func)
        return out
