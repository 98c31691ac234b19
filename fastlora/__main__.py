"""Command line: ``python -m fastlora <command> [options]`` (also installed as ``fastlora``)."""

from __future__ import annotations

import sys

COMMANDS = {
    "demo": ("fastlora.demo", "fine-tune a small model with fastlora's QLoRA vs PEFT + bitsandbytes: table, plot"),
    "info": ("fastlora.info", "versions, compiled extension, CPU features, GPU and available backends"),
    "roundtrip": ("fastlora.roundtrip", "quantize a real-sized weight to 4 bits and back: error and speed"),
    "compile-check": ("fastlora.compile_check",
                      "compile every Triton and CUDA kernel ahead of time for sm_80/sm_90; resource table"),
    "bench": ("fastlora.bench", "benchmark suites: kernels, train, memory, offload, compile (results folder, --plot)"),
}


def _usage() -> str:
    lines = ["usage: python -m fastlora <command> [options]", "", "commands:"]
    lines += [f"  {name:<15}{help_text}" for name, (_, help_text) in COMMANDS.items()]
    lines += ["", "`python -m fastlora <command> --help` explains each command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"fastlora: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    import importlib

    module = importlib.import_module(COMMANDS[command][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
