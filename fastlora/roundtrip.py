"""``python -m fastlora roundtrip``: quantize a real-sized weight to 4 bits and back, with its error
and the speed of each backend (and bitsandbytes', when installed)."""

from __future__ import annotations

import argparse
import time

import torch

from . import backends, nf4

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_BLOCKSIZES = [2**k for k in range(5, 13)]  # what fastlora.nf4.quantize accepts: powers of two, 32..4096


def _best_time(fn, repeats: int) -> float:
    fn()  # warm up (first-touch of the output pages, lazy imports)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastlora roundtrip",
        description="Quantize a random weight of a real model's size (default 4096x14336, a Llama-3-8B MLP "
                    "projection) to 4 bits, dequantize it, and report the error and the time of each backend.")
    parser.add_argument("--shape", default="4096x14336", help="weight shape OUTxIN (default: 4096x14336)")
    parser.add_argument("--quant-type", choices=["nf4", "fp4"], default="nf4", help="4-bit code book (default nf4)")
    parser.add_argument("--blocksize", type=int, default=64, choices=_BLOCKSIZES, metavar="N",
                        help="elements per absmax block, a power of two in 32..4096 (default 64)")
    parser.add_argument("--no-double-quant", action="store_true", help="keep fp32 absmax instead of 8-bit codes")
    parser.add_argument("--dtype", choices=list(_DTYPES), default="bfloat16",
                        help="dtype of the weight and of the dequantized output (default bfloat16)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions, best is reported (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the weight (default 0)")
    args = parser.parse_args(argv)

    try:
        out_features, in_features = (int(v) for v in args.shape.lower().split("x"))
    except ValueError:
        parser.error(f"--shape must look like 4096x14336, got {args.shape!r}")
    dtype = _DTYPES[args.dtype]
    torch.manual_seed(args.seed)
    print(f"weight {out_features}x{in_features} {args.dtype}, {args.quant_type}, blocksize {args.blocksize}, "
          f"double quant {'off' if args.no_double_quant else 'on'}, {torch.get_num_threads()} threads", flush=True)
    weight = (torch.randn(out_features, in_features) * 0.02).to(dtype)
    double_quant = not args.no_double_quant

    q = nf4.quantize(weight, args.blocksize, args.quant_type, double_quant)
    dense = nf4.dequantize(q)
    err = (dense.float() - weight.float())
    rel = err.norm() / weight.float().norm()
    packed_mib = (q.packed.numel() * q.packed.element_size() + q.absmax.numel() * q.absmax.element_size()) / 2**20
    print(f"size: {weight.numel() * weight.element_size() / 2**20:.1f} MiB dense -> {packed_mib:.1f} MiB 4-bit")
    print(f"error: max |w - dq(q(w))| = {err.abs().max().item():.3e}, relative Frobenius = {rel.item():.4f}")

    out_bytes = weight.numel() * dense.element_size()
    moved = q.packed.numel() * q.packed.element_size() + out_bytes  # bytes read + written
    rows = []
    for name in ("cpp", "reference"):
        if backends.available("cpu")[name]:
            rows.append((f"fastlora {name}", lambda n=name: nf4.dequantize(q, backend=n)))
    try:
        import bitsandbytes.functional as F

        bnb_packed, bnb_state = F.quantize_4bit(weight, blocksize=args.blocksize, quant_type=args.quant_type,
                                                compress_statistics=double_quant)
        rows.append(("bitsandbytes", lambda: F.dequantize_4bit(bnb_packed, bnb_state)))
    except ImportError:
        pass
    src = torch.empty(out_bytes // 2, dtype=torch.uint8)
    dst = torch.empty(out_bytes // 2, dtype=torch.uint8)
    # A copy that reads and writes as many bytes as the dequantization: its bandwidth ceiling here.
    rows.append(("copy (ceiling)", lambda: dst.copy_(src)))

    print(f"\n{'dequantize':<20}{'time ms':>10}{'GB/s':>10}{'x copy':>10}")
    times = {}
    for label, fn in rows:
        times[label] = _best_time(fn, args.repeats)
    copy_t = times["copy (ceiling)"]
    for label, t in times.items():
        print(f"{label:<20}{t * 1e3:>10.2f}{moved / t / 1e9:>10.1f}{copy_t / t:>10.2f}")
    quant_t = _best_time(lambda: nf4.quantize(weight, args.blocksize, args.quant_type, double_quant), 1)
    print(f"\nquantize (fastlora): {quant_t * 1e3:.1f} ms")
    return 0
