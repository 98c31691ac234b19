"""QLoRA training step on the CPU: fastlora vs PEFT + bitsandbytes (the tests, summary and environment variables
are in fastlora/bench/pytest_train.py, which ``python -m fastlora bench --suite train`` runs too).

    python -m pytest bench/bench_train_step.py                  (the summary is printed at the very end)
    python bench/bench_train_step.py --help                     (same, with options as flags)
    python bench/bench_train_step.py --preset-fp32 tiny --preset-bf16 tiny --steps 2   (checks the bench itself)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

if __name__ == "__main__":  # run as a script: benchmark this checkout's fastlora, not an installed one
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fastlora.bench import train_setup as ts  # noqa: E402

ENV = "FASTLORA_TRAIN_BENCH_"  # the configuration (fastlora/bench/pytest_train.py reads it when imported)
if __name__ != "__main__":  # as a script, main() sets the environment first and pytest imports this file again
    from fastlora.bench.pytest_train import (  # noqa: F401
        bench_summary,
        test_initial_loss_agrees,
        test_saved_for_backward,
        test_train_step,
        unavailable,
    )


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(
        description="QLoRA training-step benchmark: fastlora.patch vs PEFT + bitsandbytes (runs pytest).",
        epilog="Arguments after '--' go to pytest, e.g. -- -k 'fp32 and not saved'. "
               "Progress lines go to stderr, the summary to stdout at the end.")
    ap.add_argument("--dtype", choices=("fp32", "bf16", "both"), default=None, help="activation dtype (default both)")
    ap.add_argument("--steps", type=int, help="timed steps per provider (default 5)")
    ap.add_argument("--warmup", type=int, help="untimed steps first (default 1)")
    ap.add_argument("--preset-fp32", choices=sorted(ts.PRESETS), help="model size of the fp32 runs (default full)")
    ap.add_argument("--preset-bf16", choices=sorted(ts.PRESETS), help="model size of the bf16 runs (default small)")
    ap.add_argument("--hidden", type=int, help="override the presets' hidden size (multiple of 64)")
    ap.add_argument("--layers", type=int, help="override the presets' number of layers")
    ap.add_argument("--seq", type=int, help="override the presets' sequence length (batch stays 2)")
    ap.add_argument("--dropout", help="lora_dropout values, comma separated (default 0,0.05)")
    ap.add_argument("--backend", help="fastlora.patch backend (default auto)")
    ap.add_argument("--emulate-no-bf16", action="store_true",
                    help="emulate a CPU without native bf16 GEMMs (torch's oneDNN off for both providers, "
                    "FASTLORA_CPU_BF16_GEMM=0 for fastlora): what the bf16 target is about, on a CPU that has them")
    ap.add_argument("--json", metavar="PATH", help="write the results (one record per dtype/dropout) as JSON")
    ap.add_argument("--benchmark-json", metavar="PATH", help="also save pytest-benchmark's JSON report")
    args, rest = ap.parse_known_args(argv)
    if rest and rest[0] == "--":
        rest = rest[1:]
    if args.hidden is not None and args.hidden % 64:
        ap.error(f"--hidden must be a multiple of 64 (the 4-bit blocksize), got {args.hidden}")
    dtypes = None if args.dtype is None else ("fp32,bf16" if args.dtype == "both" else args.dtype)
    for value, name in ((dtypes, "DTYPES"), (args.steps, "STEPS"), (args.warmup, "WARMUP"),
                        (args.preset_fp32, "PRESET_FP32"), (args.preset_bf16, "PRESET_BF16"),
                        (args.hidden, "HIDDEN"), (args.layers, "LAYERS"), (args.seq, "SEQ"),
                        (args.dropout, "DROPOUTS"), (args.backend, "BACKEND"), (args.json, "JSON"),
                        ("1" if args.emulate_no_bf16 else None, "NO_NATIVE_BF16")):
        if value is not None:
            os.environ[ENV + name] = str(value)
    extra = [f"--benchmark-json={args.benchmark_json}"] if args.benchmark_json else []
    return pytest.main([str(Path(__file__).resolve()), "-p", "no:cacheprovider", "-q", *extra, *rest])


if __name__ == "__main__":
    sys.exit(main())
