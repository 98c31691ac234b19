"""Attention's q / k / v projections run as one fused op (:func:`fastlora.ops.lora_qkv`: one autograd node, x
saved once, and with dropout inactive one decode pass into one workspace and one GEMM for the three bases).

The attention forward itself is architecture code (rotary embeddings, caches, masks) and stays untouched:
fastlora wraps it only to open a *sibling group* (:func:`fastlora.modules._instance.sibling_group`) for its
duration. The first of q / k / v that the attention calls computes all three on its input; the other two, called
next on the same tensor (same object, not modified in place since), take their outputs from the group. Any other
call runs the projection on its own, as without the group. Matching is structural (``LAYOUTS``, child names).

If a call leaves computed outputs untaken (the attention reads k / v from another input, e.g. cross-attention),
grouping stops for that module for good: it would only waste work there. Under ``torch.compile`` no group is
opened (the projections are compiled one by one). ``fuse_projections=False`` leaves these modules alone.
"""

from __future__ import annotations

import functools

import torch

from ..ops.lora_qkv import lora_qkv
from . import _autocast, _instance, _projection_args, lora, peft_lora

LAYOUTS = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"))
CLAIMS_CHILDREN = False  # the projections are patched one by one too: they run whenever the group does not


def _layout(module):
    for names in LAYOUTS:
        if all(isinstance(getattr(module, n, None), torch.nn.Module) for n in names):
            return names
    return None


def claims(module) -> bool:
    """A module with q / k / v children (``LAYOUTS``), each a LoRA layer (PEFT's or fastlora's own)."""
    names = _layout(module)
    if names is None:
        return False
    return all(lora.has_lora(getattr(module, n)) or peft_lora.claims(getattr(module, n)) for n in names)


def skip_reason(module) -> str | None:
    conflict = _instance.conflict_reason(module)
    if conflict is not None:
        return conflict
    return _projection_args.skip_reason(module, _layout(module))


class _Pending:
    """Outputs computed for the members not called yet, valid for one input tensor in one version."""

    def __init__(self, x: torch.Tensor, outs: dict, failed: bool = False):
        self.x, self.version, self.outs, self.failed = x, _version(x), outs, failed


def _version(x: torch.Tensor) -> int | None:
    return None if x.is_inference() else x._version  # inference tensors have no version counter


class GroupedQKVState(_instance.InstanceState):
    def __init__(self, backend: str, layout: tuple):
        super().__init__(backend)
        self.layout = layout
        self.grouping = True  # False once a call left outputs untaken
        self.pending: _Pending | None = None

    def __deepcopy__(self, memo):
        twin = super().__deepcopy__(memo)
        twin.pending = None
        return twin

    def __getstate__(self):
        return {**self.__dict__, "pending": None}

    def describe(self) -> str:
        return f"fastlora.grouped_qkv(backend={self.backend!r})"


def install(module, backend: str) -> None:
    _instance.install(module, _grouped_forward, GroupedQKVState(backend, _layout(module)))


def _grouped_forward(self, *args, **kwargs):
    state = _instance.state_of(self)
    if not state.grouping or torch.compiler.is_compiling():
        return type(self).forward(self, *args, **kwargs)
    state.pending = None
    try:
        with _instance.sibling_group(functools.partial(_member_output, self)):
            return type(self).forward(self, *args, **kwargs)
    finally:
        if state.pending is not None and state.pending.outs:
            state.grouping = False  # k / v read another input than q here: grouping only wastes work
        state.pending = None


def _member_output(attention, child, x):
    """The output of ``child`` (one of attention's q / k / v) on ``x`` from the group, or None."""
    state = _instance.state_of(attention)
    members = [getattr(attention, name) for name in state.layout]
    if not isinstance(x, torch.Tensor) or not state.grouping or not any(child is m for m in members):
        return None
    pending = state.pending
    if pending is not None and pending.x is x and pending.version == _version(x):
        if id(child) in pending.outs:
            return pending.outs.pop(id(child))
        if pending.failed:  # this input cannot be grouped: counted once, each member runs on its own
            return None
    if pending is not None and pending.outs:  # another input, or a member called twice: outputs go unused
        state.grouping, state.pending = False, None
        return None
    found = _projection_args.projections(members, x)
    if found is None:
        state.fallback_calls += 1  # each projection then runs on its own (fused or not, as it reports)
        state.pending = _Pending(x, {}, failed=True)
        return None
    training, dtype, projections = found
    outs = _autocast.run(lora_qkv, x, dtype, projections, training=training, backend=state.backend)
    by_member = {id(m): y for m, y in zip(members, outs, strict=True)}
    mine = by_member.pop(id(child))
    state.pending = _Pending(x, by_member)
    return mine
