"""Peak extra memory of ONE forward + backward of a QLoRA linear, each implementation in a fresh
process: fastlora vs PEFT + bitsandbytes vs the bare dense GEMMs (floor).

    python bench/lora_memory.py                    fastlora, PEFT and floor at 4096->14336, 1024 tokens, fp32
    python bench/lora_memory.py --quick --backend reference
    python bench/lora_memory.py --help

How: the child process runs the same implementation once on a tiny problem (imports, op
registration, thread pools: one-time costs), builds the layer (NF4 weight, adapters) and the
inputs x and dY, frees what it can (gc, malloc_trim), resets the kernel's resident-set high-water
mark (``echo 5 > /proc/self/clear_refs``) and reads VmRSS as the baseline.
It then runs one fwd+bwd (gradients for x, lora_A, lora_B; y.backward(dY)) and reads VmHWM.
extra = VmHWM - baseline: the peak of everything the step allocates, outputs included
(y (M, N), dx (M, K), dA, dB), so the floor is not zero: it is y + dx. Children run with
MALLOC_MMAP_THRESHOLD_=131072 so freed large blocks go back to the OS and the RSS follows the live
memory. PEFT's forward and backward each decode the whole weight (224 MiB in fp32 at 4096x14336).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
IMPLS = ("fastlora", "peft", "floor")
MiB = 1 << 20


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure_here(impl: str, dtype: str, tokens: int, in_features: int, out_features: int, backend: str,
                 dropout_p: float) -> dict:
    """Measure in THIS process (it should be fresh: call through ``measure_fresh``)."""
    import lora_setup as ls
    import torch

    torch.manual_seed(0)
    dt = ls.DTYPES[dtype]
    # One-time costs (imports, op registration, thread pool, BLAS set-up) are paid on a tiny problem
    # of the same kind first; anything sized by the real weight or tokens is still counted.
    tiny = ls.make_problem(4, 64, 128, keep_dense=True)
    for dtype_warm in (torch.float32, dt):
        a = torch.mm(*tiny.inputs(dtype_warm)[:1], tiny.dense.to(dtype_warm).t())
        if impl == "fastlora":
            ls.fastlora_step(tiny, dtype_warm, dropout_p, backend)()
        elif impl == "peft":
            ls.peft_step(tiny, dtype_warm, dropout_p)()
    del a, tiny
    p = ls.make_problem(tokens, in_features, out_features, keep_dense=impl == "floor")
    if impl == "fastlora":
        run = ls.fastlora_step(p, dt, dropout_p, backend)
    elif impl == "peft":
        run = ls.peft_step(p, dt, dropout_p)
    elif impl == "floor":
        w = p.dense.to(dt)
        x, dy = p.inputs(dt)
        kept = []
        run = lambda: kept.extend((torch.mm(x, w.t()), torch.mm(dy, w)))  # y and dx, alive together like a step's
    else:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    _trim()
    reset = _reset_hwm()
    base = _status()["VmRSS"]
    t0 = time.perf_counter()
    run()
    seconds = time.perf_counter() - t0
    peak = _status()["VmHWM"]
    esize = dt.itemsize
    outputs = tokens * (out_features + in_features) * esize  # y and dx
    if impl != "floor":
        outputs += 4 * ls.RANK * (in_features + out_features)  # dA, dB (fp32)
    return {"impl": impl, "dtype": dtype, "tokens": tokens, "in_features": in_features, "out_features": out_features,
            "backend": ls.resolved_backend(backend) if impl == "fastlora" else None, "dropout_p": dropout_p,
            "baseline_bytes": base, "peak_bytes": peak, "extra_bytes": peak - base, "outputs_bytes": outputs,
            "hwm_reset": reset, "seconds": seconds}


def measure_fresh(impl: str, dtype: str = "fp32", tokens: int | None = None, shape: tuple[int, int] | None = None,
                  backend: str | None = None, dropout_p: float = 0.0, timeout: float = 1800) -> dict:
    """Run ``measure_here`` in a fresh Python process and return its result."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    import lora_setup as ls

    default_tokens, shapes = ls.tokens_and_shapes()
    tokens = default_tokens if tokens is None else tokens
    k, n = shapes[-1] if shape is None else shape
    backend = ls.env_backend() if backend is None else backend
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), str(HERE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--impl", impl, "--dtype", dtype,
           "--tokens", str(tokens), "--shape", f"{k}x{n}", "--backend", backend, "--dropout", str(dropout_p)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"memory child for {impl} failed (rc={proc.returncode}): {tail}")
    return json.loads(lines[-1])


def format_table(results: list[dict]) -> str:
    by = {r["impl"]: r for r in results}
    r0 = results[0]
    lines = [f"Peak extra memory of one fwd+bwd, fresh process each, {r0['in_features']}->{r0['out_features']}, "
             f"{r0['tokens']} tokens, {r0['dtype']} activations (VmHWM - VmRSS after set-up)",
             f"{'impl':<10}{'extra MiB':>11}{'outputs MiB':>13}{'step s':>9}  note"]
    for r in results:
        note = f"backend {r['backend']}" if r["backend"] else ""
        if not r["hwm_reset"]:
            note += " (VmHWM could not be reset: the set-up peak may hide the step's)"
        lines.append(f"{r['impl']:<10}{r['extra_bytes'] / MiB:>11.1f}{r['outputs_bytes'] / MiB:>13.1f}"
                     f"{r['seconds']:>9.2f}  {note}")
    if "fastlora" in by and "peft" in by and by["peft"]["extra_bytes"] > 0:
        ratio = by["fastlora"]["extra_bytes"] / by["peft"]["extra_bytes"]
        verdict = "met" if ratio <= 0.5 else "MISSED"
        lines.append(f"fastlora / PEFT = {ratio:.2f} (target <= 0.50: {verdict})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Defaults follow FASTLORA_BENCH_QUICK "
                                 "and FASTLORA_BENCH_BACKEND like bench_lora_linear.py.")
    ap.add_argument("--impl", choices=(*IMPLS, "all"), default="all", help="what to measure (default: all three)")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="activation dtype (default fp32)")
    ap.add_argument("--shape", help="INxOUT, default the largest benchmark shape (4096x14336)")
    ap.add_argument("--tokens", type=int, help="M, default 1024 (128 with --quick)")
    ap.add_argument("--backend", help="fastlora backend (default $FASTLORA_BENCH_BACKEND or auto)")
    ap.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (default 0.0)")
    ap.add_argument("--quick", action="store_true", help="small shape and 128 tokens (FASTLORA_BENCH_QUICK=1)")
    ap.add_argument("--json", action="store_true", help="print one JSON line per implementation")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # measure in this process
    args = ap.parse_args(argv)
    if args.quick:
        os.environ["FASTLORA_BENCH_QUICK"] = "1"
    shape = tuple(int(v) for v in args.shape.lower().split("x")) if args.shape else None
    if args.child:
        import lora_setup as ls

        backend = args.backend or ls.env_backend()
        result = measure_here(args.impl, args.dtype, args.tokens, shape[0], shape[1], backend, args.dropout)
        print(json.dumps(result), flush=True)
        return 0
    impls = IMPLS if args.impl == "all" else (args.impl,)
    results = []
    for impl in impls:
        print(f"[lora-memory] {impl}: fresh process ...", file=sys.stderr, flush=True)
        try:
            results.append(measure_fresh(impl, args.dtype, args.tokens, shape, args.backend, args.dropout))
        except RuntimeError as exc:
            print(f"[lora-memory] {impl}: {exc}", file=sys.stderr, flush=True)
    for r in results if args.json else []:
        print(json.dumps(r))
    if results and not args.json:
        print(format_table(results))
    return 0 if len(results) == len(impls) else 1


if __name__ == "__main__":
    sys.exit(main())
