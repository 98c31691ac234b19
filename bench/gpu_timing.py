"""Timing helpers shared by the GPU benchmarks (bench/bench_*_gpu.py)."""

from __future__ import annotations

import torch

# Datasheet HBM bandwidth (TB/s) of the GPUs the roofline percentages know, matched by device name.
HBM_TBPS = {"H100": 3.35, "H200": 4.8, "A100": 2.04}


def hbm_peak_tbps() -> float | None:
    """HBM bandwidth of the current GPU from HBM_TBPS, or None for a GPU not listed."""
    name = torch.cuda.get_device_name()
    return next((v for k, v in HBM_TBPS.items() if k in name), None)


def time_ms(fn, iters: int) -> float:
    """Median of 5 runs of ``iters`` back-to-back calls, per call, from CUDA events."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return sorted(times)[len(times) // 2]
