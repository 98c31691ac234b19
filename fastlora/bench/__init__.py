"""``python -m fastlora bench``: benchmark suites.

Each suite is an entry of :data:`SUITES`: name -> (module, help). The module provides
``add_arguments(parser)`` (its own options) and ``run(args) -> int``; ``run`` appends its measurements
to ``args.rows`` (:func:`fastlora.bench.results.row`). The dispatcher stamps them (suite, fastlora version,
git commit, time) and appends them to the results folder (``--results``, CSV and JSON); ``--output``
writes this run's JSON (the memory suite writes its own, with every breakdown). ``--plot`` draws PNG charts from
the results folder (:mod:`fastlora.bench.plot`). Suites are added by adding a row, and to :data:`PYTEST_SUITES` if
pytest-benchmark times them; the dispatcher knows nothing else about them. Suites run without the third-party noise
that :mod:`fastlora._quiet` names.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pathlib
import sys

from .._quiet import quiet
from . import results

SUITES = {
    "memory": ("fastlora.bench.memory",
               "peak memory of one QLoRA training step at real model scale (Llama 1B / 8B / 70B shapes), "
               "fastlora vs PEFT + bitsandbytes, estimated under FakeTensorMode on this CPU"),
    "kernels": ("fastlora.bench.kernels",
                "every op (4-bit dequantize, LoRA linear, NEFTune embedding, gated MLP, LoRA q/k/v, 4-bit linear, "
                "DoRA linear, frozen bf16 linear; fwd / bwd / full): fastlora's backends vs the torch reference vs "
                "bitsandbytes / PEFT / transformers / torch"),
    "train": ("fastlora.bench.train",
              "one QLoRA training step of a small Llama, fastlora.patch vs PEFT + bitsandbytes: time, saved bytes"),
    "offload": ("fastlora.bench.offload",
                "activation bytes a QLoRA forward keeps on the device, fastlora.patch vs PEFT + bitsandbytes, plain / "
                "save_on_cpu / checkpointing / both / transformers' checkpoint offload; losses and gradients compared"),
    "compile": ("fastlora.bench.compile",
                "the compile-check table: every Triton and CUDA kernel compiled ahead of time for sm_80 / sm_90"),
}
# timed by pytest-benchmark in a pytest process of their own (fastlora.bench.pytest_run), unless --crossover
PYTEST_SUITES = ("kernels", "train")
DEFAULT_RESULTS = pathlib.Path("fastlora-bench-results")


def build_parser(suite: str | None) -> argparse.ArgumentParser:
    """The command line of ``python -m fastlora bench``, with the options of ``suite`` (a name of SUITES) if given."""
    parser = argparse.ArgumentParser(
        prog="python -m fastlora bench",
        description="Run a benchmark suite. Suites: " + "; ".join(f"{name}: {text}" for name, (_, text)
                                                                   in SUITES.items()),
        epilog="`python -m fastlora bench --suite NAME --help` lists that suite's own options.")
    parser.add_argument("--suite", metavar="NAME", help=f"which suite to run: {', '.join(SUITES)}")
    parser.add_argument("--output", type=pathlib.Path, default=None,
                        help="also write this run's results as JSON to this file")
    parser.add_argument("--results", type=pathlib.Path, default=DEFAULT_RESULTS, metavar="DIR",
                        help="folder the results are appended to (results.csv, results.json) and --plot reads; "
                             f"default ./{DEFAULT_RESULTS}")
    parser.add_argument("--plot", action="store_true",
                        help="draw PNG charts (speedup per op; memory per provider) from the results folder into it; "
                             "with --suite, after the run")
    if suite in SUITES:
        importlib.import_module(SUITES[suite][0]).add_arguments(parser)
    return parser


def _suite_named(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--suite" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--suite="):
            return arg.split("=", 1)[1]
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    suite = _suite_named(argv)
    if suite is not None and suite not in SUITES:
        print(f"fastlora bench: unknown suite {suite!r}; available: {', '.join(SUITES)}", file=sys.stderr)
        return 2
    parser = build_parser(suite)
    args = parser.parse_args(argv)  # argparse exits 2 with a message on bad options
    if args.suite is None and not args.plot:
        parser.print_usage(sys.stderr)
        print(f"fastlora bench: give --suite NAME ({', '.join(SUITES)}) and/or --plot", file=sys.stderr)
        return 2
    if args.output is not None:
        folder = args.output.parent if str(args.output.parent) else pathlib.Path(".")
        if not folder.is_dir():
            print(f"fastlora bench: --output folder {str(folder)!r} does not exist", file=sys.stderr)
            return 2
    if args.suite is not None:
        problem = results.check_folder(args.results)
        if problem:
            print(f"fastlora bench: --results: {problem}", file=sys.stderr)
            return 2
        if args.suite in PYTEST_SUITES and not getattr(args, "crossover", False):
            from . import pytest_run

            problem = pytest_run.missing()
            if problem:
                print(f"fastlora bench: the {args.suite} suite cannot run: {problem}", file=sys.stderr)
                return 2
        module = importlib.import_module(SUITES[args.suite][0])
        args.rows = []
        with quiet():
            status = int(module.run(args) or 0)
        rows = results.stamp(args.rows, args.suite)
        if rows:
            results.append(args.results, rows)
            print(f"{len(rows)} result rows appended to {args.results / results.CSV_NAME} and "
                  f"{args.results / results.JSON_NAME}")
        if args.output is not None and args.suite != "memory":  # memory writes its own --output
            args.output.write_text(json.dumps({"suite": args.suite, "rows": rows}, indent=1) + "\n")
            print(f"results written to {args.output}")
        if status:
            return status
    if args.plot:
        from . import plot

        return plot.main(args.results)
    return 0
