"""``python -m fastlora bench --suite memory``: the peak memory of one QLoRA training step at real
model scale, estimated on this CPU without the hardware.

The step (:mod:`fastlora.bench.memory_model`: Llama shape, NF4 bitsandbytes projections, PEFT LoRA on
all seven projections, forward with labels, backward, AdamW step) runs under ``FakeTensorMode``:
every tensor is a fake one — shapes, dtypes, strides, no data — so nothing is allocated, and every
operator runs its fake implementation (fastlora's custom ops and bitsandbytes' ops have one). A
:class:`fastlora.bench.memory_tracker.MemoryTracker` counts the bytes of every storage from the op
that creates it until its last reference dies, and adds the modelled in-kernel workspaces of the
4-bit GEMMs on a GPU (:mod:`fastlora.bench.op_workspace`). Two providers run the same model bytes:
``peft+bnb`` (PEFT's lora.bnb.Linear4bit over bitsandbytes) and ``fastlora`` (the same model after
``fastlora.patch``).

What it does not model: allocator rounding and fragmentation (a CUDA caching allocator adds some
percent), the CUDA context and cuBLAS workspaces (the same for both), and kernels' internal memory
other than the modelled 4-bit GEMMs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import asdict, dataclass

import torch

from . import memory_model
from .memory_tracker import CATEGORIES, MemoryTracker
from .op_workspace import gpu_workspace

PROVIDERS = ("peft+bnb", "fastlora")
GiB = 2**30


@dataclass
class StepMemory:
    """The peak of one training step and its breakdown (bytes)."""

    provider: str
    peak: int
    breakdown: dict
    peak_op: str
    ops: int
    fallback_calls: int
    seconds: float


def _warm_fusion_check(step: memory_model.StepConfig) -> None:
    """fastlora.patch verifies once per class, on two real tokens, that a gated MLP block computes
    down(act(gate(x)) * up(x)); fake tensors have no values to compare, so verify the class on a tiny
    real model of the same architecture first (the verdict is cached per class)."""
    import fastlora

    tiny = memory_model.Shape(hidden=64, intermediate=128, layers=1, heads=4, kv_heads=2, vocab=64)
    small = memory_model.StepConfig(seq=4, rank=4, alpha=8, dtype=step.dtype)
    with torch.random.fork_rng():
        model = memory_model.build_peft_model(tiny, small, fake=False)
    fastlora.patch(model).unpatch()


def _register_weights(tracker: MemoryTracker, model: torch.nn.Module) -> None:
    for p in model.parameters():
        tracker.register(p, "adapters+optimizer" if p.requires_grad else "parameters")
    for b in model.buffers():
        tracker.register(b, "parameters")
    for module in model.modules():  # the 4-bit statistics live on the quant state, not as parameters
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is None:
            continue
        for t in (state.absmax, state.code, state.offset):
            if isinstance(t, torch.Tensor):
                tracker.register(t, "parameters")
        if state.state2 is not None:
            tracker.register(state.state2.absmax, "parameters")
            tracker.register(state.state2.code, "parameters")


def measure_step(shape: memory_model.Shape, step: memory_model.StepConfig, provider: str, *, fake: bool = True,
                 workspace=gpu_workspace) -> StepMemory:
    """Run one training step of ``provider`` ("peft+bnb" or "fastlora") and return its tracked peak.
    ``fake=True``: under FakeTensorMode (the estimate); ``fake=False``: on real CPU tensors (the check)."""
    import fastlora
    from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    if provider == "fastlora" and fake:
        _warm_fusion_check(step)
    start = time.perf_counter()
    mode = FakeTensorMode() if fake else contextlib.nullcontext()
    with mode:
        model = memory_model.build_peft_model(shape, step, fake=fake)
        handle = None
        if provider == "fastlora":
            # patch probes activations on small real tensors of its own: outside the fake mode (the
            # model's fake tensors still dispatch to the fake mode they belong to)
            with unset_fake_temporarily() if fake else contextlib.nullcontext():
                handle = fastlora.patch(model)
        params = memory_model.trainable(model)
        optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=False)
        ids = memory_model.inputs(shape, step)
        tracker = MemoryTracker(workspace)
        _register_weights(tracker, model)
        tracker.register(ids, "activations")
        hooks = [p.register_post_accumulate_grad_hook(lambda p: tracker.retag(p.grad, "adapters+optimizer"))
                 for p in params]
        with tracker:
            tracker.phase = "forward"
            loss = model(input_ids=ids, labels=ids).loss  # as Trainer: only the loss outlives the forward
            tracker.phase = "backward"
            loss.backward()
            del loss
            tracker.phase = "optimizer"
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        for h in hooks:
            h.remove()
        fallbacks = sum(handle.report()["fallback_calls"].values()) if handle is not None else 0
    return StepMemory(provider=provider, peak=tracker.peak, breakdown=dict(tracker.peak_breakdown),
                      peak_op=tracker.peak_op or "", ops=tracker.ops, fallback_calls=fallbacks,
                      seconds=time.perf_counter() - start)
