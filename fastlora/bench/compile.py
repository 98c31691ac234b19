"""``python -m fastlora bench --suite compile``: the compile-check table (:mod:`fastlora.compile_check`,
also ``python -m fastlora compile-check``) as a bench suite, its rows kept with the other results.

One result row per kernel configuration and architecture: metric "registers" (ptxas' count; -1 when
unknown, e.g. failed or skipped), with spills, shared memory, tensor-core instructions and the status in
``extra``. Exit status as compile-check: 1 when a kernel failed to compile, spilled or failed a check.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict

from fastlora import compile_check

from . import results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default=compile_check.DEFAULT_ARCHS,
                        help=f"comma-separated target architectures; default {compile_check.DEFAULT_ARCHS} "
                             "(sm_80 only with --quick)")
    parser.add_argument("--no-triton", action="store_true", help="skip the Triton kernels")
    parser.add_argument("--no-cuda", action="store_true", help="skip the CUDA sources (nvcc)")
    parser.add_argument("--quick", action="store_true",
                        help="sm_80 only, Triton kernels only (no nvcc): about half a minute")


def to_rows(rows: list[compile_check.Row]) -> list[dict]:
    out = []
    for r in rows:
        extra = {k: v for k, v in asdict(r).items() if k not in ("backend", "kernel", "config", "arch", "registers")}
        out.append(results.row(r.kernel, r.backend, "fastlora", r.config, "-", "registers",
                               -1 if r.registers is None else r.registers, "registers", device=r.arch, **extra))
    return out


def run(args) -> int:
    arch_text = "sm_80" if args.quick and args.arch == compile_check.DEFAULT_ARCHS else args.arch
    try:
        archs = list(dict.fromkeys(compile_check._parse_arch(a) for a in arch_text.split(",") if a.strip()))
    except argparse.ArgumentTypeError as exc:
        print(f"fastlora bench: --arch: {exc}", file=sys.stderr)
        return 2
    if not archs:
        print("fastlora bench: --arch: no architecture given", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    rows, notes = compile_check.run_checks(archs, triton=not args.no_triton, cuda=not (args.no_cuda or args.quick))
    print(compile_check._format_table(rows))
    for note in notes:
        print(f"note: {note}")
    failed = [r for r in rows if r.status == "failed"]
    print(f"{sum(r.status == 'ok' for r in rows)} ok, {len(failed)} failed, "
          f"{sum(r.status == 'skipped' for r in rows)} skipped in {time.perf_counter() - t0:.1f} s")
    args.rows.extend(to_rows(rows))
    return 1 if failed else 0
