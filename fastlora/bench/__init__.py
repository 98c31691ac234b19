"""``python -m fastlora bench``: benchmark suites.

Each suite is an entry of :data:`SUITES`: name -> (module, help). The module provides
``add_arguments(parser)`` (its own options) and ``run(args) -> int``. Suites are added by adding a
row; the dispatcher knows nothing else about them.
"""

from __future__ import annotations

import argparse
import importlib
import pathlib
import sys

SUITES = {
    "memory": ("fastlora.bench.memory",
               "peak memory of one QLoRA training step at real model scale (Llama 1B / 8B / 70B shapes), "
               "fastlora vs PEFT + bitsandbytes, estimated under FakeTensorMode on this CPU"),
}


def _parser(suite: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastlora bench",
        description="Run a benchmark suite. Suites: " + "; ".join(f"{name}: {text}" for name, (_, text)
                                                                   in SUITES.items()),
        epilog="`python -m fastlora bench --suite NAME --help` lists that suite's own options.")
    parser.add_argument("--suite", required=True, metavar="NAME",
                        help=f"which suite to run: {', '.join(SUITES)}")
    parser.add_argument("--output", type=pathlib.Path, default=None,
                        help="also write the results as JSON to this file")
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
    args = _parser(suite).parse_args(argv)  # argparse exits 2 with a message on bad options
    if args.output is not None:
        folder = args.output.parent if str(args.output.parent) else pathlib.Path(".")
        if not folder.is_dir():
            print(f"fastlora bench: --output folder {str(folder)!r} does not exist", file=sys.stderr)
            return 2
    module = importlib.import_module(SUITES[args.suite][0])
    return int(module.run(args) or 0)
