"""``python -m fastlora bench --suite train``: one QLoRA training step, fastlora vs PEFT + bitsandbytes.

The model (:mod:`fastlora.bench.train_setup`): a random-init Llama from a config (nothing downloaded),
its seven projections bitsandbytes nf4 double quant, PEFT LoRA r=16, alpha 16 on all seven, fp32
adapters; lora_B drawn from N(0, 0.02²) so the first step already runs every LoRA term. A step =
forward + causal-LM loss + backward + AdamW (foreach=False) on the adapters. Providers: ``peft+bnb``
(the PEFT model) and ``fastlora`` (a deep copy passed to ``fastlora.patch``). Their steps alternate
(A B, B A, ...) so both see the same load on a shared machine. Reported per (dtype, lora_dropout): median
ms/step, tokens/s, bytes saved for backward by one forward + loss, the initial loss of both (same
weights and batch), and the ratios. The pytest-benchmark twin is bench/bench_train_step.py.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from . import results
from . import train_setup as ts
from .arg_types import positive_int

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROVIDERS = ("peft+bnb", "fastlora")
ROLES = {"peft+bnb": "peer", "fastlora": "fastlora"}
B_STD = 0.02
MiB = 1 << 20


def run_config(spec: ts.Spec, dtype: str, dropout: float, *, steps: int, warmup: int, backend: str,
               progress=print) -> dict:
    """Both providers on one configuration: {"ms": {provider: [step ms]}, "saved": {provider: bytes},
    "initial_loss": {provider: loss}, "summary": patch summary, "fallback_calls": int}."""
    peft_model = ts.peft_model(spec, dtype=DTYPES[dtype], dropout=dropout, rank=16, alpha=16, b_std=B_STD)
    fast_model, handle = ts.patched_copy(peft_model, backend=backend)
    models = {"peft+bnb": peft_model, "fastlora": fast_model}
    ids = ts.token_batch(spec, seed=1)
    initial = {}
    for name, model in models.items():
        torch.manual_seed(0)
        with torch.no_grad():
            initial[name] = model(input_ids=ids, labels=ids).loss.item()
    saved = {name: ts.saved_for_backward(model, ids)["bytes"] for name, model in models.items()}
    train_steps = {name: ts.TrainStep(model) for name, model in models.items()}
    times: dict[str, list[float]] = {p: [] for p in PROVIDERS}
    for i in range(warmup + steps):
        order = PROVIDERS if i % 2 == 0 else PROVIDERS[::-1]
        for provider in order:
            t0 = time.perf_counter()
            loss = train_steps[provider](ids).item()
            ms = (time.perf_counter() - t0) * 1e3
            if i >= warmup:
                times[provider].append(ms)
            progress(f"  step {i + 1}{' (warm-up)' if i < warmup else ''} {provider}: {ms:.1f} ms, loss {loss:.5f}")
    return {"ms": times, "saved": saved, "initial_loss": initial, "summary": handle.summary(),
            "fallback_calls": sum(handle.report()["fallback_calls"].values())}


def shape_label(spec: ts.Spec) -> str:
    return f"h{spec.hidden} i{spec.intermediate} L{spec.layers} {spec.batch}x{spec.seq}"


def to_rows(spec: ts.Spec, dtype: str, dropout: float, out: dict) -> list[dict]:
    rows = []
    op = f"train_step p{dropout:g}"
    for provider in PROVIDERS:
        extra = {"lora_dropout": dropout, "initial_loss": out["initial_loss"][provider], "step_ms": out["ms"][provider],
                 "model": spec.describe()}
        if provider == "fastlora":
            extra.update(patch_summary=out["summary"], fallback_calls=out["fallback_calls"])
        med = statistics.median(out["ms"][provider])
        rows.append(results.row(op, provider, ROLES[provider], shape_label(spec), dtype, "median step time", med, "ms",
                                **extra))
        rows.append(results.row(op, provider, ROLES[provider], shape_label(spec), dtype, "tokens/s",
                                spec.tokens / (med / 1e3), "tokens/s", lora_dropout=dropout))
        rows.append(results.row(op, provider, ROLES[provider], shape_label(spec), dtype, "saved for backward",
                                out["saved"][provider], "bytes", lora_dropout=dropout))
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'config':<17}{'shape':<26}{'dtype':<6}{'provider':<10}{'ms/step':>10}{'min ms':>10}{'tokens/s':>10}"
             f"{'saved MiB':>11}{'initial loss':>14}"]
    lines.append("-" * len(lines[0]))
    by_key: dict[tuple, dict] = {}
    for r in rows:
        by_key.setdefault((r["op"], r["shape"], r["dtype"]), {}).setdefault(r["provider"], {})[r["unit"]] = r
    for (op, shape, dtype), provs in by_key.items():
        for provider in PROVIDERS:
            p = provs[provider]
            lines.append(f"{op:<17}{shape:<26}{dtype:<6}{provider:<10}{p['ms']['value']:>10.1f}"
                         f"{min(p['ms']['extra']['step_ms']):>10.1f}"
                         f"{p['tokens/s']['value']:>10.0f}{p['bytes']['value'] / MiB:>11.2f}"
                         f"{p['ms']['extra']['initial_loss']:>14.6f}")
        a, b = provs["peft+bnb"], provs["fastlora"]
        saved = b["bytes"]["value"] / a["bytes"]["value"] if a["bytes"]["value"] else float("nan")
        medians = a["ms"]["value"] / b["ms"]["value"]
        fastest = min(a["ms"]["extra"]["step_ms"]) / min(b["ms"]["extra"]["step_ms"])
        lines.append(f"  speed PEFT/fastlora {medians:.2f}x of the medians, {fastest:.2f}x of "
                     "the fastest steps (other load on the machine only adds time); saved-for-backward "
                     f"fastlora/PEFT {saved:.2f}x; {b['ms']['extra']['patch_summary']}; fallback calls "
                     f"{b['ms']['extra']['fallback_calls']}")
    return "\n".join(lines)


def _dropouts(text: str) -> list[float]:
    try:
        values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated floats in [0, 1), got {text!r}") from None
    if not values or any(not 0.0 <= v < 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated floats in [0, 1), got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(ts.PRESETS), default=None,
                        help="model and batch size: full (hidden 1024, 4 layers, 2x512 tokens), small (hidden 256, "
                             "2 layers, 2x128), tiny (hidden 64, 2 layers, 2x32); default small (tiny with --quick)")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "both"), default="fp32",
                        help="model / activation dtype (adapters stay fp32); default fp32")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="timed steps per provider; default 5 (1 with --quick)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per provider first; default 1 "
                                                                   "(0 with --quick)")
    parser.add_argument("--dropout", type=_dropouts, default=[0.0],
                        help="lora_dropout value(s), comma separated; default 0")
    parser.add_argument("--backend", default="auto", help="fastlora.patch backend; default auto")
    parser.add_argument("--quick", action="store_true", help="the tiny preset, one step: checks the suite in seconds")


def run(args) -> int:
    preset = args.preset or ("tiny" if args.quick else "small")
    steps = args.steps or (1 if args.quick else 5)
    warmup = args.warmup if args.warmup is not None else (0 if args.quick else 1)
    if warmup < 0:
        print(f"fastlora bench: --warmup must be >= 0, got {warmup}", file=sys.stderr)
        return 2
    spec = ts.PRESETS[preset]
    dtypes = ("fp32", "bf16") if args.dtype == "both" else (args.dtype,)

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    rows = []
    for dtype in dtypes:
        for dropout in args.dropout:
            progress(f"train suite: {dtype}, lora_dropout {dropout:g}, {spec.describe()}")
            try:
                out = run_config(spec, dtype, dropout, steps=steps, warmup=warmup, backend=args.backend,
                                 progress=progress)
            except ValueError as exc:  # e.g. a backend that cannot run here
                print(f"fastlora bench: {exc}", file=sys.stderr)
                return 2
            rows += to_rows(spec, dtype, dropout, out)
    print(format_rows(rows))
    args.rows.extend(rows)
    return 0
