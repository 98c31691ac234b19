"""A median-of-N wall-clock timer for the bench suites.

Each run is timed on its own (``time.perf_counter`` around one call, the device synchronized before
and after on a GPU), so an untimed ``setup`` can prepare each run (e.g. the forward whose backward is
timed). Runs continue until ``max_runs`` or until ``budget_s`` seconds of timed work, whichever comes
first, but at least ``min_runs`` (one only when a warm-up run alone took the whole budget: a slow
reference should not hold a suite up for minutes); ``warmup`` untimed runs go first. The median is what is reported:
on a shared machine other load only adds time, and the median ignores the worst of it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    runs: int


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(fn: Callable, *, setup: Callable | None = None, warmup: int = 1, min_runs: int = 3,
            max_runs: int = 15, budget_s: float = 1.0, device: str = "cpu") -> Timing:
    """Time ``fn(setup())`` (or ``fn()`` without setup); see the module docstring."""
    if min_runs < 1 or max_runs < min_runs:
        raise ValueError(f"need 1 <= min_runs <= max_runs, got {min_runs}, {max_runs}")
    slowest_warmup = 0.0
    for _ in range(warmup):
        arg = setup() if setup is not None else None
        t0 = time.perf_counter()
        fn(arg) if setup is not None else fn()
        slowest_warmup = max(slowest_warmup, time.perf_counter() - t0)
    if warmup and slowest_warmup >= budget_s > 0:
        min_runs = 1
    times: list[float] = []
    while len(times) < max_runs and (len(times) < min_runs or sum(times) < budget_s):
        arg = setup() if setup is not None else None
        _sync(device)
        t0 = time.perf_counter()
        fn(arg) if setup is not None else fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return Timing(statistics.median(times) * 1e3, min(times) * 1e3, len(times))
