"""QLoRA linear forward + backward on the CPU: fastlora vs PEFT + bitsandbytes vs the bare dense
GEMMs (the floor), side by side in one run, plus peak memory and saved-for-backward bytes.

    python -m pytest bench/bench_lora_linear.py                 (the summary is printed at the very end)
    python bench/bench_lora_linear.py --help                    (same, with options as flags)
    FASTLORA_BENCH_QUICK=1 FASTLORA_BENCH_BACKEND=reference python -m pytest bench/bench_lora_linear.py

Problem: 1024 tokens, in->out 4096->4096 and 4096->14336, r=16, scaling 2.0 (alpha 32), NF4 with
double quant (blocksize 64), fp32 adapters (PEFT's default); one step = y = layer(x),
y.backward(dY) with gradients for x, lora_A and lora_B. Cases:
  floor     torch.mm(x, Wᵀ) and torch.mm(dY, W) on a dense W of the activation dtype (no LoRA, no dequant)
  fastlora  fastlora.ops.lora_linear, backend $FASTLORA_BENCH_BACKEND (default auto); lora_dropout 0.0 and 0.1
  peft      peft.tuners.lora.bnb.Linear4bit over a bitsandbytes Linear4bit holding the same NF4 tensors
each with fp32 and bf16 activations. Targets: fastlora fp32 <= 1.05x the fp32 floor, fastlora bf16
<= 1.15x the fp32 floor, PEFT bf16 >= 20x fastlora bf16; peak extra memory of one fwd+bwd at
4096->14336 (fp32, fresh process, bench/lora_memory.py): fastlora <= half of PEFT's.

Environment (the CLI flags set these):
  FASTLORA_BENCH_BACKEND   fastlora backend, default auto (use "reference" until the C++ kernels exist)
  FASTLORA_BENCH_QUICK     1: 128 tokens, shapes 512->512 and 512->1792 (checks the benchmark, not the speed)
  FASTLORA_BENCH_SECONDS   time budget per case, default 10: rounds = budget / first call, clamped to 1..7
  FASTLORA_BENCH_PEFT_BF16 all (default) | first (first shape only) | skip: PEFT with bf16 activations runs
                           bf16 GEMMs, which are very slow on CPUs without native bf16 support
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lora_memory  # noqa: E402
import lora_setup as ls  # noqa: E402

from fastlora.bench.pytest_progress import Progress  # noqa: E402

TOKENS, SHAPES = ls.tokens_and_shapes()
BACKEND = ls.env_backend()
MAX_ROUNDS = 7
CASES = [  # (impl, activation dtype, lora_dropout)
    ("floor", "fp32", 0.0), ("floor", "bf16", 0.0),
    ("fastlora", "fp32", 0.0), ("fastlora", "fp32", 0.1), ("fastlora", "bf16", 0.0), ("fastlora", "bf16", 0.1),
    ("peft", "fp32", 0.0), ("peft", "bf16", 0.0),
]
SAVED_CASES = [("fastlora", "fp32"), ("fastlora", "bf16"), ("peft", "fp32"), ("peft", "bf16")]
MEMORY_IMPLS = ["fastlora", "peft", "floor"]

_results: dict[tuple, float] = {}  # (impl, dtype, dropout, shape) -> median seconds
_skipped: dict[tuple, str] = {}
_saved: dict[tuple, list[dict]] = {}  # (impl, dtype) -> storages
_memory: dict[str, dict] = {}  # impl -> lora_memory result
_problems: dict[tuple, ls.Problem] = {}
_progress = Progress("lora-bench")
MiB = 1 << 20


def _case_id(case) -> str:
    impl, dtype, p = case
    return f"{impl}-{dtype}" + (f"-p{p}" if impl == "fastlora" else "")


def _label(impl: str, dtype: str, p: float = 0.0) -> str:
    name = {"floor": "floor", "fastlora": "fastlora", "peft": "PEFT"}[impl]
    return f"{name} {dtype}" + (f" p={p:g}" if p else "")


def _problem(shape) -> ls.Problem:
    if shape not in _problems:
        _problems[shape] = ls.make_problem(TOKENS, shape[0], shape[1], keep_dense=True)
    return _problems[shape]






@pytest.fixture(scope="module")
def fastlora_reason():
    return ls.fastlora_unavailable(BACKEND)


@pytest.fixture(scope="module")
def peft_reason():
    return ls.peft_unavailable()


def _skip_if(reason: str | None, key=None) -> None:
    if reason:
        if key is not None:
            _skipped[key] = reason
        pytest.skip(reason)


def _measure(benchmark, request, fn, what: str) -> float | None:
    """One cold call (warm-up, also sizes the run), then pedantic rounds within the time budget."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    budget = float(os.environ.get("FASTLORA_BENCH_SECONDS", "10"))
    rounds = max(1, min(MAX_ROUNDS, int(budget / max(first, 1e-9))))
    _progress.say(request, f"    {what}: first call {first:.3f} s, timing {rounds} round(s)")
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)
    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing measured
        return None
    median = benchmark.stats.stats.median
    _progress.say(request, f"    {what}: median {median * 1e3:.1f} ms")
    return median


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("shape", SHAPES, ids=ls.shape_id)
def test_fwd_bwd(benchmark, request, fastlora_reason, peft_reason, shape, case):
    impl, dtype, p = case
    key = (impl, dtype, p, shape)
    what = f"{_label(impl, dtype, p)} {shape[0]}->{shape[1]}"
    _progress.start(request, what)
    if impl == "fastlora":
        _skip_if(fastlora_reason, key)
    if impl == "peft":
        _skip_if(peft_reason, key)
        mode = os.environ.get("FASTLORA_BENCH_PEFT_BF16", "all")
        if dtype == "bf16" and (mode == "skip" or (mode == "first" and shape != SHAPES[0])):
            _skip_if(f"FASTLORA_BENCH_PEFT_BF16={mode}", key)
    prob = _problem(shape)
    dt = ls.DTYPES[dtype]
    if impl == "floor":
        fn = ls.floor_fn(prob, dt)
    elif impl == "fastlora":
        fn = ls.fastlora_step(prob, dt, p, BACKEND)
    else:
        fn = ls.peft_step(prob, dt, p)
    benchmark.group = f"fwd+bwd {shape[0]}->{shape[1]}, {TOKENS} tokens"
    benchmark.extra_info.update(impl=impl, dtype=dtype, dropout_p=p, tokens=TOKENS, rank=ls.RANK,
                                backend=ls.resolved_backend(BACKEND) if impl == "fastlora" else None)
    median = _measure(benchmark, request, fn, what)
    if median is not None:
        _results[key] = median


@pytest.mark.parametrize("case", SAVED_CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_saved_for_backward(benchmark, request, fastlora_reason, peft_reason, case):
    """Bytes the forward saves for backward (unique storages, the layer's own weights excluded)."""
    impl, dtype = case
    shape = SHAPES[-1]
    _progress.start(request, f"saved-for-backward {_label(impl, dtype)} {shape[0]}->{shape[1]}")
    _skip_if(fastlora_reason if impl == "fastlora" else peft_reason)
    prob = _problem(shape)
    dt = ls.DTYPES[dtype]
    step = ls.fastlora_step(prob, dt, 0.0, BACKEND) if impl == "fastlora" else ls.peft_step(prob, dt, 0.0)
    out: list = []
    benchmark.group = "saved-for-backward probe (one forward under saved_tensors_hooks)"
    benchmark.pedantic(lambda: out.append(ls.saved_for_backward(step)), rounds=1, iterations=1, warmup_rounds=0)
    _saved[case] = out[-1]
    total = sum(s["bytes"] for s in out[-1])
    benchmark.extra_info.update(saved_bytes=total, storages=[f"{s['name']} {s['shape']} {s['dtype']}" for s in out[-1]])


@pytest.mark.parametrize("impl", MEMORY_IMPLS)
def test_peak_memory(benchmark, request, fastlora_reason, peft_reason, impl):
    """Peak extra RSS of one fp32 fwd+bwd at the largest shape, in a fresh process."""
    shape = SHAPES[-1]
    _progress.start(request, f"peak memory {impl} fp32 {shape[0]}->{shape[1]} (fresh process)")
    if not Path("/proc/self/status").exists():
        pytest.skip("needs Linux /proc/self/status (VmHWM)")
    if impl == "fastlora":
        _skip_if(fastlora_reason)
    if impl == "peft":
        _skip_if(peft_reason)
    out: dict = {}
    benchmark.group = "peak-memory probe (fresh process; time includes start-up)"
    benchmark.pedantic(lambda: out.update(lora_memory.measure_fresh(impl, "fp32", TOKENS, shape, BACKEND)),
                       rounds=1, iterations=1, warmup_rounds=0)
    _memory[impl] = out
    benchmark.extra_info.update(extra_bytes=out["extra_bytes"], baseline_bytes=out["baseline_bytes"])
    _progress.say(request, f"    {impl}: extra {out['extra_bytes'] / MiB:.1f} MiB")


# ---------------------------------------------------------------------------------------------
# summary


def _fmt_bytes(n: int) -> str:
    return f"{n / MiB:.2f} MiB" if n >= MiB else f"{n / 1024:.1f} KiB" if n >= 1024 else f"{n} B"


def _verdict(value: float | None, target: float, at_most: bool, what: str) -> str:
    bound = f"{'<=' if at_most else '>='} {target:g}x {what}"
    if value is None:
        return f"{bound}: -"
    ok = value <= target if at_most else value >= target
    return f"{bound}: {'met' if ok else 'MISSED'}"


def bench_summary() -> str:
    """The ratio summary; bench/conftest.py prints it after pytest-benchmark's tables."""
    if not (_results or _memory or _saved):
        return ""
    lines = ["", f"QLoRA linear fwd+bwd on this CPU ({torch.get_num_threads()} threads): {TOKENS} tokens, r={ls.RANK}, "
             f"scaling {ls.SCALING:g}, nf4 double quant, fp32 adapters; fastlora backend {BACKEND} -> "
             f"{ls.resolved_backend(BACKEND)}. Median times. 'x fp32 floor' = time / (x·Wᵀ + dY·W, dense fp32 "
             "torch.mm); 'x own floor': the same GEMMs in the case's activation dtype."]
    reasons: list[str] = []
    for shape in SHAPES:
        if not any(k[3] == shape for k in (*_results, *_skipped)):
            continue  # deselected
        floor = _results.get(("floor", "fp32", 0.0, shape))
        lines.append(f"{shape[0]}->{shape[1]:<14}{'median ms':>11}{'x fp32 floor':>14}{'x own floor':>13}"
                     f"{'PEFT/fastlora':>15}  target")
        for impl, dtype, p in CASES:
            key = (impl, dtype, p, shape)
            label = _label(impl, dtype, p)
            t = _results.get(key)
            if t is None:
                why = _skipped.get(key)
                if why is None:
                    lines.append(f"  {label:<22}{'-':>9}  (not timed)")
                    continue
                if why not in reasons:
                    reasons.append(why)
                lines.append(f"  {label:<22}{'-':>9}  (skipped [{reasons.index(why) + 1}])")
                continue
            vs_floor = t / floor if floor else None
            peft_ratio, target = None, ""
            if impl == "peft":
                fl = _results.get(("fastlora", dtype, 0.0, shape))
                peft_ratio = t / fl if fl else None
                if dtype == "bf16":
                    target = _verdict(peft_ratio, 20, at_most=False, what="fastlora bf16")
            elif impl == "fastlora" and p == 0.0:
                target = _verdict(vs_floor, 1.05 if dtype == "fp32" else 1.15, at_most=True, what="fp32 floor")
            own = _results.get(("floor", dtype, 0.0, shape))
            vf = f"{vs_floor:>14.2f}" if vs_floor is not None else f"{'-':>14}"
            vo = f"{t / own:>13.2f}" if own else f"{'-':>13}"
            pr = f"{peft_ratio:>15.2f}" if peft_ratio is not None else f"{'':>15}"
            lines.append(f"  {label:<22}{t * 1e3:>9.1f}{vf}{vo}{pr}  {target}")
    lines += [f"  [{i}] {why}" for i, why in enumerate(reasons, 1)]
    if _memory:
        results = [_memory[i] for i in MEMORY_IMPLS if i in _memory]
        lines += ["", lora_memory.format_table(results)]
    if _saved:
        shape = SHAPES[-1]
        lines += ["", f"Saved for backward per call at {shape[0]}->{shape[1]} ({TOKENS} tokens): unique storages, "
                  "weights/adapters excluded"]
        for (impl, dtype), storages in _saved.items():
            total = sum(s["bytes"] for s in storages)
            parts = ", ".join(f"{s['name']} {tuple(s['shape'])} {s['dtype']} {_fmt_bytes(s['bytes'])}"
                              for s in storages)
            note = ""
            if impl == "fastlora":
                expect = TOKENS * shape[0] * ls.DTYPES[dtype].itemsize + TOKENS * ls.RANK * 4 + 8
                note = f"  [x + S + seed = {expect} B: {'exact' if total == expect else 'DIFFERS'}]"
            lines.append(f"  {_label(impl, dtype):<14}{total:>12} B = {_fmt_bytes(total):>10}: {parts}{note}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# command line


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(
        description="QLoRA linear fwd+bwd benchmark: fastlora vs PEFT + bitsandbytes vs dense GEMMs (runs pytest).",
        epilog="Arguments after '--' go to pytest, e.g. -- -k 'fastlora and 4096to4096'. "
               "Progress lines go to stderr, the summary to stdout at the end.")
    ap.add_argument("--backend", help="fastlora backend (FASTLORA_BENCH_BACKEND; default auto)")
    ap.add_argument("--quick", action="store_true", help="small shapes, 128 tokens (FASTLORA_BENCH_QUICK=1)")
    ap.add_argument("--seconds", type=float, help="time budget per case (FASTLORA_BENCH_SECONDS; default 10)")
    ap.add_argument("--peft-bf16", choices=("all", "first", "skip"),
                    help="PEFT with bf16 activations on all shapes, the first only, or none (default all)")
    ap.add_argument("--benchmark-json", metavar="PATH", help="also save pytest-benchmark's JSON report")
    args, rest = ap.parse_known_args(argv)
    if rest and rest[0] == "--":
        rest = rest[1:]
    for flag, var in ((args.backend, "FASTLORA_BENCH_BACKEND"), (args.seconds, "FASTLORA_BENCH_SECONDS"),
                      (args.peft_bf16, "FASTLORA_BENCH_PEFT_BF16")):
        if flag is not None:
            os.environ[var] = str(flag)
    if args.quick:
        os.environ["FASTLORA_BENCH_QUICK"] = "1"
    extra = [f"--benchmark-json={args.benchmark_json}"] if args.benchmark_json else []
    return pytest.main([str(Path(__file__).resolve()), "-p", "no:cacheprovider", "-q", *extra, *rest])


if __name__ == "__main__":
    sys.exit(main())
