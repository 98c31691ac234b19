"""Host time per call of one LoRA layer, where the arithmetic is negligible: fastlora (a PEFT layer patched
by ``fastlora.patch``) vs the same PEFT layer unpatched vs its base layer alone, side by side in one run.

    python -m pytest bench/bench_host_overhead.py          (the summary is printed at the very end)
    FASTLORA_BENCH_QUICK=1 python -m pytest bench/bench_host_overhead.py

Problem: 8 tokens, 64 -> 64, r=16, fp32 activations and adapters, no dropout; one call = y = layer(x),
y.backward(dY) with gradients for x, lora_A and lora_B. At this size every case spends its time in Python,
the autograd engine and the dispatcher, not in GEMMs, so the ratios say what a patched layer costs the host
per call. On a GPU that host time overlaps the kernels of earlier calls and only shows when a step is
host-bound (small models, few tokens per step); there it is a fraction of what this slow CPU spends.
Kinds (the layers ``fastlora.patch`` accelerates):
  linear      PEFT lora.Linear over nn.Linear (dense fp32 weight)
  linear4bit  PEFT lora.bnb.Linear4bit over bitsandbytes Linear4bit (NF4, double quant, fp32 compute)
Cases: base (the base layer alone, no LoRA), peft, fastlora. Every case is timed over many calls per round,
rounds interleaved with the other cases, and the fastest round is kept: on a shared machine the slowest
rounds measure the neighbours.

Environment:
  FASTLORA_BENCH_BACKEND   fastlora backend, default auto
  FASTLORA_BENCH_QUICK     1: fewer rounds and calls (checks the benchmark, not the speed)
"""

from __future__ import annotations

import copy
import time

import pytest
import torch

import fastlora
from fastlora.bench import lora_setup as ls
from fastlora.bench.pytest_progress import Progress

_progress = Progress("host-bench")

TOKENS, IN_FEATURES, OUT_FEATURES = 8, 64, 64
KINDS = ("linear", "linear4bit")
IMPLS = ("base", "peft", "fastlora")
QUICK = ls.env_quick()
ROUNDS, CALLS = (3, 20) if QUICK else (25, 200)

_results: dict[tuple[str, str], float] = {}  # (kind, impl) -> seconds per call, fastest round
_layers: dict[str, dict] = {}


def _peft_linear(p: ls.Problem):
    """PEFT lora.Linear over an nn.Linear holding p's dense fp32 weight, with p's adapters."""
    from peft import LoraConfig
    from peft.tuners.lora import Linear

    base = torch.nn.Linear(p.in_features, p.out_features, bias=False)
    with torch.no_grad():
        base.weight.copy_(p.dense)
    base.weight.requires_grad_(False)
    layer = Linear(base, "default", config=LoraConfig(r=ls.RANK, lora_alpha=ls.LORA_ALPHA), r=ls.RANK,
                   lora_alpha=ls.LORA_ALPHA)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(p.lora_A)
        layer.lora_B["default"].weight.copy_(p.lora_B)
    return layer.train()


def _layers_of(kind: str) -> dict:
    """{impl: layer} for ``kind``: the PEFT layer, a patched deep copy of it and its base layer."""
    if kind not in _layers:
        p = ls.make_problem(TOKENS, IN_FEATURES, OUT_FEATURES, keep_dense=True)
        peft_layer = _peft_linear(p) if kind == "linear" else ls.peft_layer(p, torch.float32)
        patched = copy.deepcopy(peft_layer)
        handle = fastlora.patch(patched, backend=ls.env_backend())
        if "" not in handle.report()["patched"]:  # the PEFT layer itself (its 4-bit base is patched too)
            raise RuntimeError(f"fastlora.patch did not accelerate the {kind} layer: {handle.summary()}")
        _layers[kind] = {"base": peft_layer.get_base_layer(), "peft": peft_layer, "fastlora": patched}
    return _layers[kind]


def _call(layer):
    x = torch.randn(TOKENS, IN_FEATURES, generator=torch.Generator().manual_seed(1), requires_grad=True)
    dy = torch.randn(TOKENS, OUT_FEATURES, generator=torch.Generator().manual_seed(2))

    def run():
        layer(x).backward(dy)

    return run


def _skip_reason(impl: str) -> str | None:
    reason = ls.peft_unavailable()
    if reason is None and impl == "fastlora":
        reason = ls.fastlora_unavailable(ls.env_backend())
    return reason


def _fastest_rounds(calls: dict) -> dict:
    """{name: seconds per call of its fastest round}, rounds of the callables in ``calls`` interleaved."""
    best = dict.fromkeys(calls, float("inf"))
    for fn in calls.values():
        for _ in range(CALLS // 4):  # warm-up: first-call set-up, allocator caches
            fn()
    for _ in range(ROUNDS):
        for name, fn in calls.items():
            start = time.perf_counter()
            for _ in range(CALLS):
                fn()
            best[name] = min(best[name], (time.perf_counter() - start) / CALLS)
    return best


@pytest.mark.parametrize("kind", KINDS)
def test_host_time_per_call(benchmark, request, kind):
    for impl in IMPLS:
        reason = _skip_reason(impl)
        if reason:
            pytest.skip(reason)
    layers = _layers_of(kind)
    calls = {impl: _call(layers[impl]) for impl in IMPLS}
    for impl, seconds in _fastest_rounds(calls).items():
        _results[(kind, impl)] = seconds
    summary = ", ".join(f"{impl} {_results[(kind, impl)] * 1e6:.0f} us" for impl in IMPLS)
    _progress.say(request, f"{kind}: {summary} per call (fastest of {ROUNDS} rounds of {CALLS})")
    # pytest-benchmark's own table: the patched layer, the case this file is about
    benchmark.group = f"host time per call, {kind}, {TOKENS} tokens {IN_FEATURES}->{OUT_FEATURES} r={ls.RANK}"
    benchmark.extra_info.update({f"{impl}_us": _results[(kind, impl)] * 1e6 for impl in IMPLS})
    benchmark.pedantic(calls["fastlora"], rounds=ROUNDS, iterations=CALLS, warmup_rounds=0)


def bench_summary() -> str:
    """The ratio summary; bench/conftest.py prints it after pytest-benchmark's tables."""
    if not _results:
        return ""
    lines = ["", f"Host time per call of one LoRA layer (fwd + bwd), {TOKENS} tokens, {IN_FEATURES}->{OUT_FEATURES}, "
             f"r={ls.RANK}, fp32, on this CPU ({torch.get_num_threads()} threads); fastlora backend "
             f"{ls.env_backend()} -> {ls.resolved_backend(ls.env_backend())}. Fastest of {ROUNDS} rounds of {CALLS} "
             "calls.", f"  {'kind':<12}{'base us':>9}{'peft us':>9}{'fastlora us':>13}{'fastlora/peft':>15}"
             f"{'fastlora-base':>15}{'peft-base':>11}"]
    for kind in KINDS:
        if (kind, "fastlora") not in _results:
            continue
        base, peft, ours = (_results[(kind, impl)] * 1e6 for impl in IMPLS)
        lines.append(f"  {kind:<12}{base:>9.0f}{peft:>9.0f}{ours:>13.0f}{ours / peft:>15.2f}{ours - base:>15.0f}"
                     f"{peft - base:>11.0f}")
    return "\n".join(lines)
