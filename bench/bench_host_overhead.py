"""Host time per call where the arithmetic is negligible: fastlora (a PEFT layer or model patched by
``fastlora.patch``) vs the same PEFT layer or model unpatched vs its base, side by side in one run.

    python -m pytest bench/bench_host_overhead.py          (the summary is printed at the very end)
    FASTLORA_BENCH_QUICK=1 python -m pytest bench/bench_host_overhead.py

Problem: fp32 activations and adapters, r=16, no dropout. A layer call: 8 tokens, 64 -> 64, y = layer(x),
y.backward(dY) with gradients for x, lora_A and lora_B. At these sizes every case spends its time in Python,
the autograd engine and the dispatcher, not in GEMMs, so the ratios say what patching costs the host per call.
On a GPU that host time overlaps the kernels of earlier calls and only shows when a step is host-bound (small
models, few tokens per step); there it is a fraction of what this slow CPU spends.
Kinds (the layers ``fastlora.patch`` accelerates, and a whole model):
  linear      PEFT lora.Linear over nn.Linear (dense fp32 weight)
  linear4bit  PEFT lora.bnb.Linear4bit over bitsandbytes Linear4bit (NF4, double quant, fp32 compute)
  llama       a training step (forward, loss, backward; no optimizer) of a random 2-layer Llama (hidden 64,
              intermediate 128, GQA 4/2 heads, vocab 96) on 1x8 tokens with PEFT LoRA r=16 on all seven
              projections (fastlora runs q/k/v and the gated MLP each as one fused op); base: the same model
              dense and frozen with no adapters (fastlora.bench.train_setup.floor_model)
  llama4bit   the same with NF4 bitsandbytes projections; base: none (the floor is dense)
Cases: base, peft, fastlora. Every case is timed over many calls per round,
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
from fastlora.bench import train_setup
from fastlora.bench.pytest_progress import Progress

_progress = Progress("host-bench")

TOKENS, IN_FEATURES, OUT_FEATURES = 8, 64, 64
KINDS = ("linear", "linear4bit", "llama", "llama4bit")
LLAMA = train_setup.Spec(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=96, batch=1, seq=8)
IMPLS = ("base", "peft", "fastlora")
QUICK = ls.env_quick()
ROUNDS, CALLS = (3, 20) if QUICK else (25, 200)
STEP_CALLS = 2 if QUICK else 20  # per round of the llama kinds: a step is ~40 layer calls

_results: dict[tuple[str, str], float | None] = {}  # (kind, impl) -> seconds per call, fastest round
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
    """{impl: layer or model} for ``kind``: the PEFT one, a patched deep copy of it and its base (or None)."""
    if kind not in _layers:
        if kind.startswith("llama"):
            peft = train_setup.peft_model(LLAMA, four_bit=kind == "llama4bit")
            base = train_setup.floor_model(LLAMA) if kind == "llama" else None
        else:
            p = ls.make_problem(TOKENS, IN_FEATURES, OUT_FEATURES, keep_dense=True)
            peft = _peft_linear(p) if kind == "linear" else ls.peft_layer(p, torch.float32)
            base = peft.get_base_layer()
        patched = copy.deepcopy(peft)
        handle = fastlora.patch(patched, backend=ls.env_backend())
        if not handle.report()["patched"]:
            raise RuntimeError(f"fastlora.patch accelerated nothing in the {kind} case: {handle.summary()}")
        _layers[kind] = {"base": base, "peft": peft, "fastlora": patched, "handle": handle}
    return _layers[kind]


def _call(kind: str, layer):
    if kind.startswith("llama"):
        ids = train_setup.token_batch(LLAMA)

        def step():
            layer(input_ids=ids, labels=ids).loss.backward()

        return step
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


def _fastest_rounds(calls: dict, per_round: int) -> dict:
    """{name: seconds per call of its fastest round of ``per_round`` calls}, rounds of the callables in
    ``calls`` interleaved."""
    best = dict.fromkeys(calls, float("inf"))
    for fn in calls.values():
        for _ in range(max(1, per_round // 4)):  # warm-up: first-call set-up, allocator caches
            fn()
    for _ in range(ROUNDS):
        for name, fn in calls.items():
            start = time.perf_counter()
            for _ in range(per_round):
                fn()
            best[name] = min(best[name], (time.perf_counter() - start) / per_round)
    return best


@pytest.mark.parametrize("kind", KINDS)
def test_host_time_per_call(benchmark, request, kind):
    for impl in IMPLS:
        reason = _skip_reason(impl)
        if reason:
            pytest.skip(reason)
    layers = _layers_of(kind)
    calls = {impl: _call(kind, layers[impl]) for impl in IMPLS if layers[impl] is not None}
    for impl in IMPLS:
        _results[(kind, impl)] = None
    per_round = STEP_CALLS if kind.startswith("llama") else CALLS
    _results.update({(kind, impl): seconds for impl, seconds in _fastest_rounds(calls, per_round).items()})
    fallbacks = layers["handle"].report()["fallback_calls"]
    assert not fallbacks, f"patched modules ran their own forward, the timing is not fastlora's: {fallbacks}"
    summary = ", ".join(f"{impl} {_results[(kind, impl)] * 1e6:.0f} us" for impl in calls)
    _progress.say(request, f"{kind}: {summary} per call (fastest of {ROUNDS} rounds of {per_round})")
    # pytest-benchmark's own table: the patched layer, the case this file is about
    benchmark.group = f"host time per call, {kind}"
    benchmark.extra_info.update({f"{impl}_us": _results[(kind, impl)] * 1e6 for impl in calls})
    benchmark.pedantic(calls["fastlora"], rounds=ROUNDS, iterations=per_round, warmup_rounds=0)


def bench_summary() -> str:
    """The ratio summary; bench/conftest.py prints it after pytest-benchmark's tables."""
    if not _results:
        return ""
    lines = ["", f"Host time per call (fwd + bwd), fp32, r={ls.RANK}: one LoRA layer at {TOKENS} tokens, "
             f"{IN_FEATURES}->{OUT_FEATURES}, and a 2-layer Llama step on {LLAMA.batch}x{LLAMA.seq} tokens; this CPU, "
             f"{torch.get_num_threads()} threads; fastlora backend {ls.env_backend()} -> "
             f"{ls.resolved_backend(ls.env_backend())}. Fastest of {ROUNDS} rounds of {CALLS} calls "
             f"({STEP_CALLS} steps).",
             f"  {'kind':<12}{'base us':>9}{'peft us':>9}{'fastlora us':>13}{'fastlora/peft':>15}"
             f"{'fastlora-base':>15}{'peft-base':>11}"]
    for kind in KINDS:
        if _results.get((kind, "fastlora")) is None:
            continue
        base, peft, ours = (None if _results[(kind, i)] is None else _results[(kind, i)] * 1e6 for i in IMPLS)
        over = ("-", "-") if base is None else (f"{ours - base:.0f}", f"{peft - base:.0f}")
        lines.append(f"  {kind:<12}{'-' if base is None else f'{base:.0f}':>9}{peft:>9.0f}{ours:>13.0f}"
                     f"{ours / peft:>15.2f}{over[0]:>15}{over[1]:>11}")
    return "\n".join(lines)
