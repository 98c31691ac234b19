"""``python -m fastlora demo``: fine-tune a small Llama-style model with fastlora's QLoRA (NF4 base, LoRA on
every projection, NEFTune) on the shipped corpus, and the same run with PEFT + bitsandbytes beside it.

Nothing is downloaded: the model is built from a config (:mod:`fastlora.demo.presets`), the tokenizer is
byte-level and the text ships in the package (:mod:`fastlora.demo.corpus`). Both runs start from the same
weights (same NF4 codes, same initial LoRA A / B) and see the same batches in the same order.

Writes to ``--output``: ``table.md`` / ``table.json`` (the side-by-side table), ``loss_curves.csv`` /
``loss_curves.json`` / ``loss_curves.png``, ``adapter/`` (the tuned LoRA adapter in PEFT's format) and
``generation.txt``. User errors print one message and return 2 (no traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from .errors import DemoError
from .presets import DEFAULT_PRESET, PRESETS

DEFAULT_OUTPUT = "fastlora-demo-results"
PROG = "python -m fastlora demo"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would sys.exit(2): the command line prints it as a user error
        raise DemoError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    presets = "; ".join(f"{name}: {p.about}, {p.steps} steps of {p.batch} x {p.seq_len} tokens, lr {p.lr:g}"
                        for name, p in PRESETS.items())
    parser = _Parser(
        prog=PROG,
        description="Fine-tune a small Llama-style model (built from a config, random weights) with fastlora's "
                    "QLoRA: NF4 4-bit base, LoRA on every projection, NEFTune noise, AdamW, on a text corpus that "
                    "ships with fastlora (byte-level tokenizer, nothing downloaded). Then the same run with PEFT + "
                    "bitsandbytes, and a side-by-side table. Writes the table, loss curves, a plot, the adapter (PEFT "
                    "format) and a short generation to --output.",
    )
    parser.add_argument("--preset", default=DEFAULT_PRESET, metavar="NAME",
                        help=f"model size, with its default steps / batch / sequence length / learning rate (default "
                             f"%(default)s). {presets}")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the preset's; "
                        "at least 3: the first warms up, the second is measured)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default: the preset's)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens (bytes) per sequence (default: the preset's)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank r (default %(default)s)")
    parser.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha: the adapters are scaled by alpha / r "
                                                                   "(default %(default)g)")
    parser.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default: the preset's)")
    parser.add_argument("--neftune-alpha", type=float, default=5.0,
                        help="NEFTune noise alpha on the input embeddings during training; 0 turns NEFTune off "
                             "(default %(default)g)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                        help="compute dtype of the model (LoRA weights stay fp32). On a CPU bf16 is slow, and much "
                             "slower for the PEFT + bitsandbytes run: use fp32 there, bf16 on a GPU "
                             "(default %(default)s)")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, metavar="DIR",
                        help="results folder, created if needed; files of an earlier run are overwritten "
                             "(default ./%(default)s)")
    parser.add_argument("--no-compare", action="store_true",
                        help="skip the PEFT + bitsandbytes run (it is skipped anyway when they are not installed)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where to train: auto (default) picks cuda when a GPU is available, else cpu")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the model's weights, the LoRA init, the batch order and the NEFTune noise "
                             "(default %(default)s)")
    return parser


def _check_positive(name: str, value, minimum=1) -> None:
    if value < minimum:
        raise DemoError(f"{name} must be at least {minimum}, got {value}")


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the preset's defaults and check every option; raises DemoError naming the bad one."""
    if args.preset not in PRESETS:
        raise DemoError(f"unknown --preset {args.preset!r}; choose one of: {', '.join(PRESETS)} (--help describes "
                        f"them)")
    preset = PRESETS[args.preset]
    for key in ("steps", "batch", "seq_len", "lr"):
        if getattr(args, key) is None:
            setattr(args, key, getattr(preset, key))
    _check_positive("--steps", args.steps, 3)
    _check_positive("--batch", args.batch)
    _check_positive("--seq-len", args.seq_len, 2)
    _check_positive("--rank", args.rank)
    if not args.alpha > 0:
        raise DemoError(f"--alpha must be > 0, got {args.alpha}")
    if not args.lr > 0:
        raise DemoError(f"--lr must be > 0, got {args.lr}")
    if not args.neftune_alpha >= 0:
        raise DemoError(f"--neftune-alpha must be >= 0 (0 turns NEFTune off), got {args.neftune_alpha}")
    return args


def pick_device(name: str):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
        raise DemoError(f"--device cuda: no CUDA GPU is available (torch {torch.__version__}, {built}); "
                        f"use --device cpu")
    return torch.device(name)


def prepare_output(path: str) -> str:
    """Create the results folder and check that a file can be written in it; returns its absolute path."""
    path = os.path.abspath(path)
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as e:
        raise DemoError(f"--output {path}: cannot write the results there ({e.strerror or e})") from None
    return path


def _require_transformers() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise DemoError("the demo builds its model with transformers, which is not installed: "
                        "pip install 'fastlora[demo]'") from None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help
            return int(e.code or 0)
        resolve(args)
        _require_transformers()
        from .run import run

        run(args, pick_device(args.device), prepare_output(args.output))
    except DemoError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    return 0
