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


def host_breakdown(fn, iters: int = 5, top: int = 8, device: str = "cuda") -> list[str]:
    """Where the host's time goes in one call of fn: the wall time to issue a call (no synchronization, so a
    call bound by the GPU returns long before its kernels end; a call that waits for the GPU shows that wait),
    and the ``top`` host operations by self CPU time (torch.profiler, CPU activity: a cudaStreamSynchronize or
    cudaMemcpy there is a call waiting for the device). When the issue time exceeds the kernels' time, the call
    is bound by the host, and its GPU timing measures Python and launch overhead."""
    import time

    from torch.profiler import ProfilerActivity, profile

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    fn()
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    issue_us = (time.perf_counter() - start) / iters * 1e6
    sync()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            fn()
        sync()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) / iters
    lines = [f"  host: {issue_us:.1f} us per call to issue (wall, no sync); profiled self CPU time {total:.1f} us "
             "per call, top operations:"]
    for event in events[:top]:
        lines.append(f"{event.self_cpu_time_total / iters:>9.1f} us {event.count / iters:>5.1f}x  {event.key[:90]}")
    return lines
