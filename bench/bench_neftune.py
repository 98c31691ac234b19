"""NEFTune embedding forward on the CPU: fastlora's fused op vs the Hugging Face hook vs a plain
embedding lookup (the floor), side by side, plus the peak extra memory of one call.

    python -m pytest bench/bench_neftune.py            (the summary is printed at the very end)
    FASTLORA_BENCH_QUICK=1 python -m pytest bench/bench_neftune.py

Problem: 8 x 2048 tokens, d = 4096, vocab 32000, alpha 5 (padded mode), fp32 and bf16 weights. Cases:
  lookup    F.embedding(ids, weight)                                      (no noise: the floor)
  fastlora  fastlora.ops.neftune_embedding(ids, weight, 5.0), backend $FASTLORA_BENCH_BACKEND (default auto)
  hf        transformers' neftune_post_forward_hook after F.embedding: out + zeros_like(out).uniform_(-mag, mag)
Target: fastlora >= 2x faster than hf, and no full-size temporary. Memory: peak RSS of one call
above the baseline (VmHWM after ``echo 5 > /proc/self/clear_refs``), minus the output itself; large
tensors are mmap'ed by malloc, so the RSS follows what is live. The hook holds three full-size
tensors at its peak (the lookup, the noise, the sum); the fused op only its output.

Environment:
  FASTLORA_BENCH_BACKEND   fastlora backend, default auto
  FASTLORA_BENCH_QUICK     1: 2 x 256 tokens, d = 512 (checks the benchmark, not the speed)
  FASTLORA_BENCH_SECONDS   time budget per case, default 6: rounds = budget / first call, clamped to 1..7
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastlora import backends
from fastlora.bench.lora_setup import env_quick
from fastlora.bench.pytest_progress import Progress
from fastlora.ops import neftune_embedding

_progress = Progress("neftune-bench")

QUICK = env_quick()
BATCH, LENGTH, DIM, VOCAB = (2, 256, 512, 1000) if QUICK else (8, 2048, 4096, 32000)
ALPHA = 5.0
BACKEND = os.environ.get("FASTLORA_BENCH_BACKEND", "auto")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IMPLS = ("lookup", "fastlora", "hf")
MAX_ROUNDS = 7
MiB = 1 << 20

_results: dict[tuple[str, str], float] = {}  # (impl, dtype) -> median seconds
_memory: dict[tuple[str, str], int] = {}  # (impl, dtype) -> peak extra bytes of one call
_inputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def _hf_hook():
    try:
        from transformers.integrations.neftune import neftune_post_forward_hook
        return neftune_post_forward_hook
    except ImportError:  # the same three lines
        def hook(module, input, output):
            dims = torch.tensor(output.size(1) * output.size(2))
            mag_norm = module.neftune_noise_alpha / torch.sqrt(dims)
            return output + torch.zeros_like(output).uniform_(-mag_norm, mag_norm)
        return hook


def _problem(dtype: str):
    if dtype not in _inputs:
        _inputs.clear()  # one weight at a time (512 MiB in fp32)
        gc.collect()
        g = torch.Generator().manual_seed(0)
        weight = torch.randn(VOCAB, DIM, generator=g).to(DTYPES[dtype])
        ids = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=g)
        _inputs[dtype] = (ids, weight)
    return _inputs[dtype]


def _fn(impl: str, dtype: str):
    ids, weight = _problem(dtype)
    if impl == "lookup":
        return lambda: F.embedding(ids, weight)
    if impl == "fastlora":
        return lambda: neftune_embedding(ids, weight, ALPHA, backend=BACKEND)
    hook = _hf_hook()
    module = torch.nn.Module()  # the hook reads module.training and module.neftune_noise_alpha
    module.neftune_noise_alpha = ALPHA
    return lambda: hook(module, (ids,), F.embedding(ids, weight))




def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name == key:
                return int(value.split()[0]) * 1024
    raise KeyError(key)


def _peak_extra(fn) -> int | None:
    """Peak RSS growth during one call (the returned output included)."""
    if not Path("/proc/self/clear_refs").exists():
        return None
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    base = _status("VmRSS")
    out = fn()
    peak = _status("VmHWM")
    del out
    return peak - base


def _skip_reason(impl: str) -> str | None:
    if impl == "fastlora":
        try:
            backends.resolve(BACKEND, torch.device("cpu"))
        except ValueError as e:
            return str(e)
    return None


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("impl", IMPLS)
def test_neftune_forward(benchmark, request, impl, dtype):
    reason = _skip_reason(impl)
    if reason:
        pytest.skip(reason)
    fn = _fn(impl, dtype)
    what = f"{impl} {dtype} {BATCH}x{LENGTH} d={DIM}"
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    _memory[(impl, dtype)] = _peak_extra(fn)
    budget = float(os.environ.get("FASTLORA_BENCH_SECONDS", "6"))
    rounds = max(1, min(MAX_ROUNDS, int(budget / max(first, 1e-9))))
    benchmark.group = f"NEFTune embedding forward, {BATCH}x{LENGTH} tokens, d={DIM}"
    benchmark.extra_info.update(impl=impl, dtype=dtype, peak_extra_bytes=_memory[(impl, dtype)])
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)
    if benchmark.stats is not None:
        _results[(impl, dtype)] = benchmark.stats.stats.median
        _progress.say(request, f"{what}: median {_results[(impl, dtype)] * 1e3:.1f} ms")


def bench_summary() -> str:
    """The ratio summary; bench/conftest.py prints it after pytest-benchmark's tables."""
    if not _results:
        return ""
    out_bytes = {dt: BATCH * LENGTH * DIM * torch.empty((), dtype=d).element_size() for dt, d in DTYPES.items()}
    resolved = "?"
    with contextlib.suppress(ValueError):
        resolved = backends.resolve(BACKEND, torch.device("cpu"))
    lines = ["", f"NEFTune embedding forward on this CPU ({torch.get_num_threads()} threads): {BATCH}x{LENGTH} tokens, "
             f"d={DIM}, vocab {VOCAB}, alpha {ALPHA:g}, padded mode; fastlora backend {BACKEND} -> {resolved}. "
             "Median times; 'extra' = peak RSS growth of one call minus its output (temporaries).",
             f"  {'case':<16}{'median ms':>10}{'x lookup':>10}{'hf/this':>9}{'peak MiB':>10}{'extra MiB':>11}  target"]
    for dtype in DTYPES:
        lookup, hf = _results.get(("lookup", dtype)), _results.get(("hf", dtype))
        for impl in IMPLS:
            t = _results.get((impl, dtype))
            if t is None:
                lines.append(f"  {impl + ' ' + dtype:<16}{'-':>10}")
                continue
            peak = _memory.get((impl, dtype))
            extra = None if peak is None else peak - out_bytes[dtype]
            target = ""
            if impl == "fastlora":
                ok = hf is not None and hf / t >= 2.0
                no_temp = extra is not None and extra < out_bytes[dtype] / 2
                target = (f">= 2x faster than hf: {'met' if ok else 'MISSED'}; "
                          f"no full-size temporary: {'met' if no_temp else 'MISSED'}")
            vs_lookup = f"{t / lookup:>10.2f}" if lookup else f"{'-':>10}"
            vs_hf = f"{hf / t:>9.2f}" if hf else f"{'-':>9}"
            pk = f"{peak / MiB:>10.1f}" if peak is not None else f"{'-':>10}"
            ex = f"{extra / MiB:>11.1f}" if extra is not None else f"{'-':>11}"
            lines.append(f"  {impl + ' ' + dtype:<16}{t * 1e3:>10.1f}{vs_lookup}{vs_hf}{pk}{ex}  {target}")
    lines.append(f"  (output: {out_bytes['fp32'] / MiB:.0f} MiB fp32, {out_bytes['bf16'] / MiB:.0f} MiB bf16)")
    return "\n".join(lines)
