"""fastlora under torch.distributed (DDP, FSDP2): a cross-rank check of what :func:`fastlora.patch` did, and
the refusal to add parameters to a model that is already wrapped.

Automatic: when a process group with several ranks is initialized, :func:`fastlora.patch` installs a one-shot
forward pre-hook (:class:`FirstStepCheck`) that runs :func:`check_consistent` at the model's first forward, so
differently patched ranks fail at the first step (ValueError on every rank that patched; TimeoutError after
``FIRST_STEP_TIMEOUT`` seconds, naming the ranks, when a rank did not patch at all) instead of diverging silently.
Calling it explicitly, as below, checks earlier and also covers ranks that did not patch.

Usage, on every rank, after patching and before (or right after) wrapping::

    handle = fastlora.patch(model, lora=..., quantize="nf4", neftune_alpha=5.0)   # before DDP / fully_shard
    fastlora.distributed.check_consistent(model)                                  # every rank, patched or not
    model = DistributedDataParallel(model, broadcast_buffers=False)

Why a check: ranks that patched differently often do not fail by themselves. DDP compares only the shapes of
the parameters it syncs (a different LoRA r fails on one rank while the other hangs in the next collective);
a rank without NEFTune, with another dropout or another backend trains silently with other noise.
:func:`check_consistent` exchanges a small fingerprint through the process group's store (not a collective),
so a rank that never calls it makes the others fail after ``timeout`` seconds, naming it, instead of hanging.

Randomness: dropout masks and NEFTune noise come from seeds drawn from the generator of the inputs' device
(:mod:`fastlora.ops._dropout_seed`). Seed each rank differently (``torch.manual_seed(seed + rank)``, what
``accelerate.utils.set_seed(seed, device_specific=True)`` does) for each rank to draw its own noise; with one
seed on every rank (the transformers Trainer's default) the ranks draw the same noise for their different
data, as torch's own dropout would.

Patching after wrapping: :func:`fastlora.patch` refuses ``lora=`` / ``quantize=`` / ``neftune_alpha`` on a DDP
or FSDP wrapper; patching a wrapped PEFT model (forwards only) works. Patching the inner model of a DDP wrapper
with ``lora=`` cannot be seen from the model: DDP does not sync the new adapters and raises nothing, so each
rank trains its own; ``check_consistent(ddp_model)`` detects it.

Frozen 4-bit weights (``quantize=`` / fastlora ``Linear4bit``) are non-persistent buffers, not parameters:
FSDP2 shards parameters only, so the 4-bit codes stay whole on every rank (replicated by design; they are 4-bit
already and are never all-gathered), while the LoRA parameters and any frozen dense parameters are sharded.
DDP broadcasts buffers from rank 0 before every forward unless ``broadcast_buffers=False``: the frozen codes
never change, so pass ``broadcast_buffers=False`` to save one broadcast of the whole 4-bit model per step.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json

import torch

_KEY = "fastlora/check_consistent"
_calls = itertools.count()  # every rank calls check_consistent in the same order: the n-th calls pair up
FIRST_STEP_TIMEOUT = 300.0  # seconds the automatic check at the first forward waits for the other ranks


def wrapper_kind(model) -> str | None:
    """The name of the data-parallel wrapper ``model`` is (or that holds ``model``'s parameters), else None:
    ``DistributedDataParallel``, ``FullyShardedDataParallel`` (FSDP1) or ``fully_shard`` (FSDP2)."""
    if not isinstance(model, torch.nn.Module):
        return None
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        return "DistributedDataParallel"
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # torch built without distributed
        return None
    for module in model.modules():
        if isinstance(module, FullyShardedDataParallel):
            return "FullyShardedDataParallel"
        if isinstance(module, FSDPModule):
            return "fully_shard"
    return None


def refuse_wrapped(model, options: dict) -> None:
    """ValueError when :func:`fastlora.patch` would add or replace parameters / the input embedding's
    forward of a model already wrapped by DDP / FSDP: the wrapper recorded the parameters it syncs when it
    was built, so new LoRA parameters would train unsynced on each rank. Patching a wrapped PEFT model
    (forwards swapped, no parameter added) is allowed and works."""
    wanted = [name for name in ("lora", "quantize", "neftune_alpha") if options.get(name) is not None]
    if not wanted:
        return
    kind = wrapper_kind(model)
    if kind is not None:
        raise ValueError(f"model is wrapped by {kind}; fastlora.patch with {', '.join(wanted)} changes its "
                         f"parameters or input embedding, which the wrapper has already recorded: patch the "
                         f"model first, then wrap it")


def _unwrapped(model):
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def _unsynced(model) -> list[str]:
    """Names of trainable parameters a DDP wrapper does not synchronize: they did not exist when it was built
    (``fastlora.patch(model, lora=...)`` on the inner model after ``DistributedDataParallel(model)``)."""
    from torch.nn.parallel import DistributedDataParallel

    known = getattr(model, "_module_parameters", None) if isinstance(model, DistributedDataParallel) else None
    if known is None:
        return []
    ids = {id(p) for p in known}
    return [n for n, p in model.module.named_parameters() if p.requires_grad and id(p) not in ids]


def _jsonable(value):
    if dataclasses.is_dataclass(value):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(value).items() if k != "extra"}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def fingerprint(model: torch.nn.Module) -> dict:
    """What fastlora did to ``model`` (a DDP wrapper is looked through), JSON-able: ``patched`` (bool),
    ``options`` of :func:`fastlora.patch`, ``modules`` {name: kind} of the patched modules, ``lora``
    {name: [r, alpha, dropout, rslora]} of fastlora adapters, ``trainable`` {name: global shape} of the
    parameters that require grad (PEFT adapters included; DTensors give their full shape) and ``unsynced``
    [names] of trainable parameters a DDP ``model`` does not synchronize (added after it was built)."""
    from .modules import lora as lora_module
    from .patch import patch_handle

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    unsynced = _unsynced(model)
    model = _unwrapped(model)
    handle = patch_handle(model)
    lora = {}
    for name, module in model.named_modules():
        s = lora_module.lora_settings(module)
        if s is not None:
            lora[name] = [s.r, s.lora_alpha, s.lora_dropout, s.use_rslora]
    return {"patched": handle is not None,
            "options": _jsonable(handle.options) if handle is not None else None,
            "modules": dict(handle.kinds) if handle is not None else {},
            "lora": lora,
            "trainable": {n: list(p.shape) for n, p in model.named_parameters() if p.requires_grad},
            "unsynced": unsynced}


def _flat(value, path=""):
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flat(v, f"{path}.{k}" if path else k))
        return out or {path: {}}
    return {path: value}


def _differences(a: dict, b: dict, limit: int = 3) -> list[str]:
    fa, fb = _flat(a), _flat(b)
    missing = object()
    order = ("patched", "options", "lora", "modules", "trainable", "unsynced")  # cause first, consequences after
    keys = sorted(set(fa) | set(fb), key=lambda k: (order.index(k.split(".")[0]), k))
    diffs = [f"{k}: {fa.get(k, '<absent>')!r} vs {fb.get(k, '<absent>')!r}" for k in keys
             if fa.get(k, missing) != fb.get(k, missing)]
    return diffs[:limit] + ([f"... and {len(diffs) - limit} more"] if len(diffs) > limit else [])


def check_consistent(model: torch.nn.Module, *, timeout: float = 60.0) -> dict:
    """Check that every rank of the default process group patched ``model`` the same way; returns this rank's
    :func:`fingerprint`. Call it on every rank (patched or not) after :func:`fastlora.patch`.

    Raises ValueError on every rank when the fingerprints differ, naming the ranks and the first differing
    fields (e.g. ``options.lora.r: 16 vs 8``); TimeoutError when a rank has not called it within ``timeout``
    seconds, naming that rank. Without an initialized process group (or with one rank) it only returns the
    fingerprint. The exchange goes through the process group's key-value store, no collective op.

    Given the ``DistributedDataParallel`` wrapper it also raises (ValueError, every rank) when trainable
    parameters exist that DDP does not synchronize: the inner model was patched with ``lora=`` after it was
    wrapped, which DDP itself does not notice (each rank silently trains its own adapters)."""
    import torch.distributed as dist

    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    mine = fingerprint(model)
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return _check_synced(mine)
    store = dist.distributed_c10d._get_default_store()
    rank, world = dist.get_rank(), dist.get_world_size()
    prefix = f"{_KEY}/{next(_calls)}"
    store.set(f"{prefix}/{rank}", json.dumps(mine, sort_keys=True))
    keys = [f"{prefix}/{r}" for r in range(world)]
    try:
        store.wait(keys, datetime.timedelta(seconds=timeout))
    except Exception:  # noqa: BLE001 - the store's timeout error type differs between torch versions
        absent = [r for r, key in enumerate(keys) if not store.check([key])]
        raise TimeoutError(f"fastlora.distributed.check_consistent: rank(s) {absent} did not call it within "
                           f"{timeout} s; call it on every rank after fastlora.patch, whether the rank patched "
                           f"or not") from None
    prints = [json.loads(store.get(key)) for key in keys]
    bad = [r for r in range(world) if prints[r] != prints[0]]
    if bad:
        lines = "; ".join(f"rank {r} vs rank 0: " + ", ".join(_differences(prints[r], prints[0])) for r in bad)
        raise ValueError(f"fastlora.distributed.check_consistent: ranks patched the model differently "
                         f"(patch every rank with the same options): {lines}")
    return _check_synced(mine)  # after the exchange: every rank got here and raises alike


def is_multi_rank() -> bool:
    """Whether a default process group with more than one rank is initialized."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class FirstStepCheck:
    """The forward pre-hook :func:`fastlora.patch` installs on a model under a multi-rank process group: at the
    model's first forward it removes itself and runs :func:`check_consistent` (``FIRST_STEP_TIMEOUT``)."""

    @torch.compiler.disable  # a key-value store exchange, once: never traced
    def __call__(self, module, args):
        hooks = module._forward_pre_hooks
        for key in [k for k, hook in hooks.items() if hook is self]:
            del hooks[key]
        check_consistent(module, timeout=FIRST_STEP_TIMEOUT)


def install_first_step_check(model: torch.nn.Module):
    """Install :class:`FirstStepCheck` on ``model`` when :func:`is_multi_rank`; returns the hook's handle or None."""
    if not is_multi_rank():
        return None
    return model.register_forward_pre_hook(FirstStepCheck())


def _check_synced(mine: dict) -> dict:
    names = mine["unsynced"]
    if names:
        raise ValueError(f"fastlora.distributed.check_consistent: {len(names)} trainable parameter(s) ({names[0]}"
                         f"{', ...' if len(names) > 1 else ''}) are not synchronized by DistributedDataParallel: they "
                         f"were added after it wrapped the model (fastlora.patch(model, lora=...) after "
                         f"DistributedDataParallel(model)?), so each rank would train its own copy; patch the model "
                         f"first, then wrap it")
    return mine
