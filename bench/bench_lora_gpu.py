"""QLoRA linear layer on the GPU: fastlora's fused op (backends auto / triton / cuda) against cuBLAS
x·Wᵀ alone (dense bf16 weight), dequantize + cuBLAS + addmm (unfused LoRA) and PEFT + bitsandbytes
(peft.tuners.lora.bnb.Linear4bit), forward and forward + backward, side by side in one run.

    pytest bench/bench_lora_gpu.py --benchmark-only -s     (pytest-benchmark; table at the end)
    python bench/bench_lora_gpu.py --quick                 (the same table without pytest)

Shapes: M in {1, 16, 4096} tokens, 4096 -> 4096 and 4096 -> 14336 (Llama-3-8B attention / MLP up),
rank 16, scaling 2, no bias, nf4 with double quant (blocksize 64), bf16 activations, fp32 adapters
(PEFT's default). Times are medians of triton.testing.do_bench (L2 flushed before each call; CUDA
events when Triton is missing). A column that cannot run here (bitsandbytes without a CUDA backend,
fastlora's Triton LoRA kernels not installed, backend "cuda" for M > 16 which runs Triton) is
skipped with the reason. Roofline (H100 SXM, DESIGN.md §6): 989 TFLOP/s bf16 dense, 3.35 TB/s.
Targets: M <= 16 forward >= 3x cuBLAS bf16; M >= 4096 forward <= 1.05x cuBLAS; fwd+bwd >= 1.5x
PEFT + bitsandbytes.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_timing import host_breakdown  # noqa: E402

PEAK_FLOPS = 989e12
PEAK_BYTES = 3.35e12
ROWS = [1, 16, 4096]
SHAPES = [(4096, 4096), (4096, 14336)]  # (in_features K, out_features N)
MODES = ["fwd", "fwd+bwd"]
IMPLS = ["fastlora-auto", "fastlora-triton", "fastlora-cuda", "cublas", "unfused", "peft-bnb"]
RANK = 16
SCALING = 2.0
BLOCKSIZE = 64
CUDA_MAX_ROWS = 16
DEVICE = "cuda"  # a CPU smoke run of the plumbing sets "cpu"

_results: dict[tuple, float] = {}  # (impl, shape, M, mode) -> median ms
_skipped: dict[tuple, str] = {}  # (impl, shape, M, mode) -> reason
_weights: dict[tuple, dict] = {}  # shape -> tensors / modules built once


def shape_id(shape) -> str:
    return f"{shape[0]}->{shape[1]}"


# --------------------------------------------------------------------------------------------------
# setup
# --------------------------------------------------------------------------------------------------


def _weights_for(shape) -> dict:
    """The frozen weight of ``shape`` once: fastlora 4-bit (on the GPU), its dense bf16 decode for
    cuBLAS, and the adapters."""
    if shape in _weights:
        return _weights[shape]
    from fastlora import nf4

    K, N = shape
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(N, K, generator=g) * 0.02).to(torch.bfloat16)
    q = nf4.quantize(w, BLOCKSIZE, "nf4", True).to(DEVICE)  # quantized on the CPU (C++ kernel), moved
    entry = {
        "w_cpu": w,
        "q": q,
        "dense": nf4.dequantize(q, torch.bfloat16),
        "A": (torch.randn(RANK, K, generator=g) / math.sqrt(K)).to(DEVICE),
        "B": (torch.randn(N, RANK, generator=g) * 0.01).to(DEVICE),
    }
    _weights[shape] = entry
    return entry


def _peft_bnb_layer(shape, entry):
    """peft.tuners.lora.bnb.Linear4bit over a bitsandbytes Linear4bit (nf4, double quant, bf16
    compute) holding the same weight, or raise with the reason it cannot run here."""
    if "peft" in entry:
        return entry["peft"]
    import bitsandbytes as bnb
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    K, N = shape
    base = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                             quant_type="nf4")
    base.weight = bnb.nn.Params4bit(entry["w_cpu"], requires_grad=False, compress_statistics=True,
                                    quant_type="nf4", blocksize=BLOCKSIZE)
    base = base.to(DEVICE)  # quantizes the weight
    alpha = int(SCALING * RANK)
    try:  # peft >= 0.18 takes the LoraConfig
        from peft import LoraConfig

        config = LoraConfig(r=RANK, lora_alpha=alpha, lora_dropout=0.0)
        layer = LoraLinear4bit(base, "default", config=config, r=RANK, lora_alpha=alpha)
    except TypeError:  # older peft: keyword arguments only
        layer = LoraLinear4bit(base, "default", r=RANK, lora_alpha=alpha, lora_dropout=0.0)
    layer = layer.to(DEVICE)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(entry["A"])
        layer.lora_B["default"].weight.copy_(entry["B"])
    probe = torch.randn(2, K, dtype=torch.bfloat16, device=DEVICE)
    with torch.no_grad():
        layer(probe)  # fails here when bitsandbytes has no CUDA backend
    _sync()
    entry["peft"] = layer
    return layer


def build(impl: str, shape, M: int, mode: str):
    """(callable running one call, None) or (None, reason it is skipped)."""
    import fastlora
    from fastlora import backends, nf4

    K, N = shape
    entry = _weights_for(shape)
    q, A, B = entry["q"], entry["A"], entry["B"]
    train = mode == "fwd+bwd"
    x = torch.randn(M, K, dtype=torch.bfloat16, device=DEVICE, requires_grad=train)
    dy = torch.randn(M, N, dtype=torch.bfloat16, device=DEVICE)
    A_ = A.clone().requires_grad_(train)
    B_ = B.clone().requires_grad_(train)

    if impl.startswith("fastlora-"):
        backend = impl.split("-", 1)[1]
        if backend == "cuda":
            if not backends.available("cuda")["cuda"]:
                return None, "fastlora._C has no CUDA kernels (build with FASTLORA_BUILD_CUDA=1)"
            if M > CUDA_MAX_ROWS:
                return None, f"M > {CUDA_MAX_ROWS}: backend 'cuda' runs the Triton forward"

        def run():
            if train:
                y = fastlora.ops.lora_linear(x, q, A_, B_, SCALING, backend=backend)
                torch.autograd.grad(y, (x, A_, B_), dy)
            else:
                with torch.no_grad():
                    fastlora.ops.lora_linear(x, q, A_, B_, SCALING, backend=backend)
    elif impl == "cublas":
        W = entry["dense"]

        def run():
            if train:
                y = torch.nn.functional.linear(x, W)
                torch.autograd.grad(y, (x,), dy)
            else:
                with torch.no_grad():
                    torch.nn.functional.linear(x, W)
    elif impl == "unfused":
        # Unsloth's recipe: dequantize into a fresh bf16 weight, cuBLAS, then the LoRA term with addmm
        # (adapters in bf16 here, so that no cast runs per call)
        A16 = A.to(torch.bfloat16).requires_grad_(train)
        B16 = B.to(torch.bfloat16).requires_grad_(train)

        def run():
            with torch.set_grad_enabled(train):
                W = nf4.dequantize(q, torch.bfloat16)
                y = torch.addmm(torch.nn.functional.linear(x, W), x @ A16.T, B16.T, alpha=SCALING)
                if train:
                    torch.autograd.grad(y, (x, A16, B16), dy)
    elif impl == "peft-bnb":
        try:
            layer = _peft_bnb_layer(shape, entry)
        except Exception as exc:  # ImportError, or bitsandbytes without a CUDA backend
            return None, f"PEFT + bitsandbytes unavailable: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        params = (x, layer.lora_A["default"].weight, layer.lora_B["default"].weight)
        if train:
            for p in params[1:]:
                p.requires_grad_(True)
            layer.train()
        else:
            layer.eval()

        def run():
            if train:
                y = layer(x)
                torch.autograd.grad(y, params, dy)
            else:
                with torch.no_grad():
                    layer(x)
    else:
        raise ValueError(f"unknown impl {impl!r}")

    try:
        run()
        _sync()
    except Exception as exc:  # e.g. fastlora's Triton LoRA kernels not installed in this tree
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    return run, None


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, quick: bool) -> float:
    """Median milliseconds of fn on the GPU."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        return float(do_bench(fn, warmup=5 if quick else 25, rep=20 if quick else 100, return_mode="median"))
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(10 if quick else 50):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def kernel_breakdown(fn, iters: int = 5, top: int = 10) -> list[str]:
    """Lines of the ``top`` GPU kernels of one call of fn by time (torch.profiler, CUDA activity only,
    averaged over ``iters`` calls): microseconds per call, share of the call's kernel time, launches per
    call, name; then the host's side (gpu_timing.host_breakdown: issue time, top host operations). What a slow
    cell spends its time on."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    _sync()
    on_cpu = DEVICE == "cpu"  # the CPU smoke run of the plumbing: operators instead of kernels
    with profile(activities=[ProfilerActivity.CPU if on_cpu else ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        _sync()

    def device_us(event) -> float:
        if on_cpu:
            return float(event.self_cpu_time_total)
        return float(getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0))

    events = sorted((e for e in prof.key_averages() if device_us(e) > 0), key=device_us, reverse=True)
    total = sum(device_us(e) for e in events) or 1.0
    lines = [f"{'us/call':>9} {'share':>6} {'calls':>5}  kernel (total {total / iters:.1f} us per call)"]
    for event in events[:top]:
        lines.append(f"{device_us(event) / iters:>9.1f} {100 * device_us(event) / total:>5.1f}% "
                     f"{event.count / iters:>5.1f}  {event.key[:100]}")
    return lines + host_breakdown(fn, iters, device=DEVICE)


def measure(impl, shape, M, mode, quick=False):
    """Times one cell into _results (or records why it is skipped). Returns (callable, reason)."""
    key = (impl, shape, M, mode)
    fn, reason = build(impl, shape, M, mode)
    if fn is None:
        _skipped[key] = reason
        return None, reason
    _results[key] = time_ms(fn, quick)
    return fn, None


# --------------------------------------------------------------------------------------------------
# roofline and summary
# --------------------------------------------------------------------------------------------------


def floor_ms(impl, shape, M, mode) -> float:
    """The roofline time of a cell: max(flops / peak, bytes / bandwidth). The weight is read once per
    pass: 4-bit codes + uint8 absmax for the 4-bit impls, 2 bytes per element for cuBLAS."""
    K, N = shape
    passes = 2 if mode == "fwd+bwd" else 1
    flops = 2 * M * K * N * passes
    if impl != "cublas":
        flops += 2 * M * RANK * (K + N) * (3 if passes == 2 else 1)  # S, L; dS, dA, dB, dx's LoRA part
    weight = 2 * N * K if impl == "cublas" else N * K // 2 + N * K // BLOCKSIZE
    io = 2 * M * (K + N) * passes
    return 1e3 * max(flops / PEAK_FLOPS, (weight * passes + io) / PEAK_BYTES)


def summary() -> str:
    if not _results and not _skipped:
        return ""
    names = {"fastlora-auto": "auto", "fastlora-triton": "triton", "fastlora-cuda": "cuda", "cublas": "cuBLAS",
             "unfused": "unfused", "peft-bnb": "peft+bnb"}
    head = (f"{'shape':<12}{'M':>6} {'mode':<8}" + "".join(f"{names[i]:>10}" for i in IMPLS)
            + f"{'best':>8}{'xcuBLAS':>9}{'xunfused':>9}{'xpeft':>8}{'%roof':>7}")
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE
    lines = ["", f"QLoRA linear (nf4 dq, bf16, r={RANK}) on {device}: median us; "
             "x<col> = <col> time / best fastlora time (> 1: fastlora faster); %roof = roofline / best", head]
    for shape in SHAPES:
        for M in ROWS:
            for mode in MODES:
                cells = {i: _results.get((i, shape, M, mode)) for i in IMPLS}
                if not any(v is not None for v in cells.values()):
                    continue
                row = f"{shape_id(shape):<12}{M:>6} {mode:<8}"
                row += "".join(f"{v * 1e3:>10.1f}" if v is not None else f"{'-':>10}" for v in cells.values())
                ours = {i: v for i, v in cells.items() if i.startswith("fastlora-") and v is not None}
                if ours:
                    best_impl, best = min(ours.items(), key=lambda kv: kv[1])
                    def ratio(other, width, best=best):
                        return f"{other / best:>{width - 1}.2f}x" if other is not None else f"{'-':>{width}}"

                    row += f"{names[best_impl]:>8}{ratio(cells['cublas'], 9)}{ratio(cells['unfused'], 9)}"
                    row += f"{ratio(cells['peft-bnb'], 8)}{100 * floor_ms(best_impl, shape, M, mode) / best:>6.0f}%"
                lines.append(row)
    reasons = sorted({(impl, reason) for (impl, *_), reason in _skipped.items()})
    if reasons:
        lines.append("skipped:")
        lines += [f"  {impl}: {reason}" for impl, reason in reasons]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# pytest-benchmark
# --------------------------------------------------------------------------------------------------

try:
    import pytest
except ImportError:  # the --quick script needs no pytest
    pytest = None

if pytest is not None:
    pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

    @pytest.mark.parametrize("mode", MODES)
    @pytest.mark.parametrize("M", ROWS)
    @pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
    @pytest.mark.parametrize("impl", IMPLS)
    def test_lora_linear_gpu(benchmark, impl, shape, M, mode):
        fn, reason = measure(impl, shape, M, mode, quick=True)
        if fn is None:
            pytest.skip(reason)
        benchmark.extra_info["median_ms_do_bench"] = _results[(impl, shape, M, mode)]
        benchmark.extra_info["roofline_ms"] = floor_ms(impl, shape, M, mode)

        def synced():
            fn()
            _sync()

        benchmark.pedantic(synced, rounds=3, iterations=1, warmup_rounds=1)

    def teardown_module(module):
        text = summary()
        if text:
            print(text)


# --------------------------------------------------------------------------------------------------
# script
# --------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python bench/bench_lora_gpu.py",
        description="Time fastlora's QLoRA linear op on the GPU against cuBLAS, dequantize + cuBLAS + addmm and "
                    "PEFT + bitsandbytes; prints one table (median microseconds, ratios, % of the H100 roofline).")
    parser.add_argument("--quick", action="store_true", help="fewer timing repetitions (a few seconds per shape)")
    parser.add_argument("--rows", default=",".join(map(str, ROWS)),
                        help="comma-separated M values (default: %(default)s)")
    parser.add_argument("--impls", default=",".join(IMPLS), help="comma-separated columns (default: %(default)s)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated modes (default: %(default)s)")
    parser.add_argument("--profile", metavar="IMPLS", default="",
                        help="comma-separated columns whose cells also get a per-kernel time breakdown "
                             "(torch.profiler, top 10 kernels per cell) and the host's (issue time, top 8 host "
                             "operations), printed after the table")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_lora_gpu: needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 1
    rows = [int(v) for v in args.rows.split(",") if v]
    impls = [v for v in args.impls.split(",") if v]
    modes = [v for v in args.modes.split(",") if v]
    profiled = [v for v in args.profile.split(",") if v]
    unknown = [i for i in impls + profiled if i not in IMPLS] + [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown column or mode: {unknown}")
    ROWS[:] = rows
    t0 = time.perf_counter()
    breakdowns = []
    for shape in SHAPES:
        for M in rows:
            for mode in modes:
                for impl in impls:
                    fn, _ = measure(impl, shape, M, mode, quick=args.quick)
                    if fn is not None and impl in profiled:
                        breakdowns.append(f"\n{impl} {shape_id(shape)} M={M} {mode}:")
                        breakdowns += kernel_breakdown(fn)
    print(summary())
    print("\n".join(breakdowns))
    print(f"({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
