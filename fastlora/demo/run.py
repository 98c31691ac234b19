"""The demo from parsed options to the files in the results folder (see :mod:`fastlora.demo.cli`)."""

from __future__ import annotations

import os
import sys

import torch

from .._quiet import quiet
from . import corpus, models, presets, report, train
from .environment import environment
from .generate import GENERATED_BYTES, PROMPT, greedy

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _say(text: str = "") -> None:
    print(text, flush=True)


def run(args, device: torch.device, output: str) -> dict:
    """Train, compare, write every result file into ``output``; returns the table (as data)."""
    with quiet():
        return _run(args, device, output)


def _run(args, device: torch.device, output: str) -> dict:
    preset = presets.PRESETS[args.preset]
    tokenizer = corpus.ByteTokenizer()
    text = corpus.load_corpus()
    batches = corpus.Batches(tokenizer.encode(text), batch=args.batch, seq_len=args.seq_len, seed=args.seed)
    neftune = args.neftune_alpha if args.neftune_alpha > 0 else None
    compare_reason = "--no-compare" if args.no_compare else models.comparison_available()

    base = presets.build_model(preset, tokenizer.vocab_size, seed=args.seed, dtype=_DTYPES[args.dtype])
    n_params = sum(p.numel() for p in base.parameters())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)  # the LoRA init
        fast_model, handle = models.fastlora_model(base, rank=args.rank, alpha=args.alpha, neftune_alpha=neftune)
    peft_model = None
    if compare_reason is None:
        peft_model = models.peft_model(base, fast_model, rank=args.rank, alpha=args.alpha, neftune_alpha=neftune)
    del base
    n_lora = sum(p.numel() for p in fast_model.parameters() if p.requires_grad)

    _say(f"fastlora demo: Llama-style model '{args.preset}' ({n_params / 1e6:.2f}M parameters, random init), "
         f"{len(text) / 1e3:.0f} KB corpus, byte-level tokenizer")
    _say(f"  QLoRA: NF4 base, LoRA r={args.rank} alpha={args.alpha:g} on every projection ({n_lora:,} trainable), "
         f"NEFTune alpha={args.neftune_alpha:g}, AdamW lr={args.lr:g}; {args.steps} steps of {args.batch} x "
         f"{args.seq_len} tokens, {args.dtype} on {device}")
    _say(f"  {handle.summary()}")
    if compare_reason is not None:
        _say(f"  PEFT + bitsandbytes comparison skipped: {compare_reason}")

    results = {}
    for name, model in ((report.FASTLORA, fast_model), (report.PEFT, peft_model)):
        if model is None:
            continue
        model.to(device)
        results[name] = train.train(name, model, batches, steps=args.steps, lr=args.lr, device=device,
                                    seed=args.seed)
        if model is not fast_model:
            model.to("cpu")

    adapter_dir = os.path.join(output, "adapter")
    handle.save_adapter(adapter_dir)
    generated = greedy(fast_model, tokenizer, PROMPT, GENERATED_BYTES, device)
    with open(os.path.join(output, "generation.txt"), "w", encoding="utf-8") as f:
        f.write(PROMPT + generated + "\n")

    settings = {"preset": args.preset, "steps": args.steps, "batch": args.batch, "seq_len": args.seq_len,
                "rank": args.rank, "alpha": args.alpha, "lr": args.lr, "neftune_alpha": args.neftune_alpha,
                "dtype": args.dtype, "seed": args.seed, "parameters": n_params, "trainable": n_lora,
                "corpus_bytes": len(text.encode("utf-8")),
                "compare": compare_reason is None, "compare_skipped": compare_reason}
    table = report.build_table(results[report.FASTLORA], results.get(report.PEFT), settings, environment(device))
    written = report.write_table(output, table) + report.write_curves(output, results)
    plot = report.plot_curves(output, results)
    if plot is None:
        print("matplotlib is not installed: loss_curves.png skipped (pip install matplotlib)", file=sys.stderr)
    else:
        written.append(plot)

    _say()
    _say(report.markdown(table))
    _say(f"Generation (greedy, {GENERATED_BYTES} bytes) from the tuned model:")
    _say(f"  {PROMPT!r} -> {generated!r}")
    _say()
    _say(f"Results in {output}:")
    for path in [*written, os.path.join(output, "generation.txt"), adapter_dir + os.sep + " (PEFT adapter)"]:
        _say(f"  {os.path.relpath(path, output)}")
    return table
