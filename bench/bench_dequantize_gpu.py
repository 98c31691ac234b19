"""NF4 dequantization on a CUDA GPU: fastlora's CUDA and Triton kernels vs bitsandbytes' CUDA
kernel, with a device-to-device copy of the same bytes as the bandwidth ceiling, in one run.

    python bench/bench_dequantize_gpu.py [--shapes 4096x4096,14336x4096] [--iters 50]
    pytest bench/bench_dequantize_gpu.py -s          (skips without a GPU)

Bytes moved = packed codes + double-quantized statistics read + the output written. Targets
(DESIGN.md §6): >= 85% of HBM bandwidth and >= 1.2x bitsandbytes for NF4 -> bf16.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_timing import hbm_peak_tbps, time_ms  # noqa: E402


def run(shapes: list[tuple[int, int]], iters: int, dtypes=("bf16", "fp32")) -> list[dict]:
    from fastlora import backends

    torch_dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
    peak = hbm_peak_tbps()
    have = backends.available("cuda")
    try:
        import bitsandbytes.functional as bnb_f
    except Exception as exc:  # noqa: BLE001 - any import failure means: no bitsandbytes column
        print(f"bitsandbytes unavailable ({exc}); its column is left empty", file=sys.stderr)
        bnb_f = None
    rows = []
    for shape in shapes:
        for dname in dtypes:
            rows += _case(shape, dname, torch_dtypes[dname], iters, have, bnb_f, peak)
    return rows


def _case(shape, dname, dtype, iters, have, bnb_f, peak) -> list[dict]:
    from fastlora import nf4

    w = torch.randn(shape) * 0.02
    q = nf4.quantize(w, 64, "nf4", True).to("cuda")
    moved = q.packed_bytes().numel() + q.absmax.numel() + w.numel() * dtype.itemsize
    out = torch.empty(shape, dtype=dtype, device="cuda")
    results = {}
    for backend in ("cuda", "triton"):
        if have[backend]:
            results[f"fastlora-{backend}"] = time_ms(lambda b=backend: nf4.dequantize(q, out=out, backend=b), iters)
            results[f"fastlora-{backend}-fresh"] = time_ms(lambda b=backend: nf4.dequantize(q, dtype, backend=b),
                                                            iters)
    if bnb_f is not None:
        param = nf4.to_bnb(q)
        param.quant_state.dtype = dtype
        results["bitsandbytes"] = time_ms(lambda: bnb_f.dequantize_4bit(param.data, param.quant_state, out=out),
                                           iters)
    src = torch.empty(moved // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    results["copy"] = time_ms(lambda: dst.copy_(src), iters)
    return [dict(shape=f"{shape[0]}x{shape[1]}", dtype=dname, impl=impl, ms=ms, tbps=moved / ms / 1e9, peak=peak,
                 vs_bnb=results.get("bitsandbytes", 0) / ms, vs_copy=results["copy"] / ms)
            for impl, ms in results.items()]


def report(rows: list[dict]) -> str:
    lines = [f"GPU: {torch.cuda.get_device_name()}; ratios > 1 mean faster than the peer",
             f"{'shape':<11}{'dtype':<6}{'impl':<24}{'ms':>9}{'TB/s':>7}{'% HBM':>7}{'vs bnb':>8}{'% copy':>8}"]
    for r in rows:
        hbm = f"{100 * r['tbps'] / r['peak']:>6.0f}%" if r["peak"] else f"{'-':>7}"
        vs_bnb = f"{r['vs_bnb']:>7.2f}x" if r["vs_bnb"] else f"{'-':>8}"
        lines.append(f"{r['shape']:<11}{r['dtype']:<6}{r['impl']:<24}{r['ms']:>9.4f}{r['tbps']:>7.2f}{hbm}"
                     f"{vs_bnb}{100 * r['vs_copy']:>7.0f}%")
    return "\n".join(lines)


def test_dequantize_gpu():
    import pytest

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    print("\n" + report(run([(4096, 4096), (14336, 4096)], iters=20)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="4096x4096,14336x4096",
                        help="comma-separated OUTxIN weight shapes (default: %(default)s)")
    parser.add_argument("--iters", type=int, default=50, help="calls per timed run; 5 runs, median (default: 50)")
    parser.add_argument("--dtypes", default="bf16,fp32", help="output dtypes: bf16, fp32, fp16 (default: %(default)s)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU here: nothing to measure", file=sys.stderr)
        return 1
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    print(report(run(shapes, args.iters, args.dtypes.split(","))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
