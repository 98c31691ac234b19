"""``python -m fastlora bench --suite train``: one QLoRA training step, fastlora vs PEFT + bitsandbytes.

Runs fastlora/bench/pytest_train.py (the pytest-benchmark tests bench/bench_train_step.py collects too) in a
pytest process of its own (:mod:`fastlora.bench.pytest_run`) and turns its records into result rows. The model
(:mod:`fastlora.bench.train_setup`): a random-init Llama from a config (nothing downloaded), its seven
projections bitsandbytes nf4 double quant, PEFT LoRA r=16, alpha 16 on all seven, fp32 adapters; lora_B drawn
from N(0, 0.02²) so the first step already runs every LoRA term. A step = forward + causal-LM loss + backward +
AdamW (foreach=False) on the adapters. Providers: ``peft+bnb`` (the PEFT model) and ``fastlora`` (a deep copy
passed to ``fastlora.patch``), timed beside the floor (``train_setup.floor_model``: the same model dense and
frozen, no adapters; PEFT/floor bounds any speed-up that leaves the model's GEMMs, attention and norms to
torch); their steps alternate (A B F, F B A, ...) so all see the same load on a shared machine.
Reported per (dtype, lora_dropout): median ms/step, tokens/s, bytes saved for backward by one forward + loss, the
initial loss of both (same weights and batch; the run fails where they disagree), and the ratios.
"""

from __future__ import annotations

import argparse
import json
import sys

from . import pytest_run, results
from . import train_setup as ts
from .arg_types import positive_int

ROLES = {"peft+bnb": "peer", "fastlora": "fastlora", ts.FLOOR: "reference"}
MiB = 1 << 20
RECORDS = "train_records.json"  # in the scratch folder of the pytest process


def shape_label(spec: ts.Spec) -> str:
    return f"h{spec.hidden} i{spec.intermediate} L{spec.layers} {spec.batch}x{spec.seq}"


def to_rows(rec: dict) -> list[dict]:
    """Result rows from one record of fastlora.bench.pytest_train.results() (one dtype and lora_dropout)."""
    spec, dtype, dropout = ts.Spec(**rec["model"]), rec["dtype"], rec["lora_dropout"]
    rows = []
    op = f"train_step p{dropout:g}"
    for provider in ts.PROVIDERS:
        r = rec[provider]
        if r["ms_per_step"] is None or r["saved"] is None:
            continue  # that provider's tests did not run (deselected or failed before measuring)
        extra = {"lora_dropout": dropout, "initial_loss": rec["initial_loss"][provider], "step_ms": r["step_ms"],
                 "model": spec.describe(), "cpu_ms_per_step": r["cpu_ms_per_step"], "losses": r["losses"],
                 "peak_rss_delta": r["peak_rss_delta"], "emulated_no_native_bf16": rec["emulated_no_native_bf16"]}
        if provider == "fastlora":
            extra.update(patch_summary=rec["patch_summary"], fallback_calls=rec["fallback_calls"])
        common = (op, provider, ROLES[provider], shape_label(spec), dtype)
        rows.append(results.row(*common, "median step time", r["ms_per_step"], "ms", **extra))
        rows.append(results.row(*common, "tokens/s", r["tokens_per_s"], "tokens/s", lora_dropout=dropout))
        rows.append(results.row(*common, "saved for backward", r["saved"]["bytes"], "bytes", lora_dropout=dropout))
    floor = rec.get(ts.FLOOR)
    if floor and floor["ms_per_step"] is not None:
        rows.append(results.row(op, ts.FLOOR, ROLES[ts.FLOOR], shape_label(spec), dtype, "median step time",
                                floor["ms_per_step"], "ms", lora_dropout=dropout, step_ms=floor["step_ms"],
                                model=spec.describe(), what="the same model dense and frozen, no adapters "
                                "(train_setup.floor_model)"))
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'config':<17}{'shape':<26}{'dtype':<6}{'provider':<10}{'ms/step':>10}{'min ms':>10}{'tokens/s':>10}"
             f"{'saved MiB':>11}{'initial loss':>14}"]
    lines.append("-" * len(lines[0]))
    by_key: dict[tuple, dict] = {}
    for r in rows:
        by_key.setdefault((r["op"], r["shape"], r["dtype"]), {}).setdefault(r["provider"], {})[r["unit"]] = r
    for (op, shape, dtype), provs in by_key.items():
        for provider in ts.PROVIDERS:
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
        if ts.FLOOR in provs:
            floor = min(provs[ts.FLOOR]["ms"]["extra"]["step_ms"])
            lines.append(f"  {ts.FLOOR} (the same model dense and frozen, no adapters) fastest step {floor:.1f} ms: "
                         f"PEFT/floor {min(a['ms']['extra']['step_ms']) / floor:.2f}x = the most any implementation "
                         "leaving the model's own GEMMs, attention and norms to torch can gain; fastlora/floor "
                         f"{min(b['ms']['extra']['step_ms']) / floor:.2f}x")
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
    parser.add_argument("--emulate-no-bf16", action="store_true",
                        help="emulate a CPU without native bf16 GEMMs (torch's oneDNN off for both providers, "
                        "FASTLORA_CPU_BF16_GEMM=0 for fastlora): what the bf16 target is about, on a CPU that has them")
    parser.add_argument("--quick", action="store_true", help="the tiny preset, one step: checks the suite in seconds")


def run(args) -> int:
    preset = args.preset or ("tiny" if args.quick else "small")
    steps = args.steps or (1 if args.quick else 5)
    warmup = args.warmup if args.warmup is not None else (0 if args.quick else 1)
    if warmup < 0:
        print(f"fastlora bench: --warmup must be >= 0, got {warmup}", file=sys.stderr)
        return 2
    dtypes = "fp32,bf16" if args.dtype == "both" else args.dtype
    env = {f"FASTLORA_TRAIN_BENCH_{k}": str(v) for k, v in {
        "DTYPES": dtypes, "DROPOUTS": ",".join(f"{p:g}" for p in args.dropout), "STEPS": steps, "WARMUP": warmup,
        "PRESET_FP32": preset, "PRESET_BF16": preset, "BACKEND": args.backend,
        "NO_NATIVE_BF16": int(args.emulate_no_bf16)}.items()}
    env["FASTLORA_TRAIN_BENCH_JSON"] = "{scratch}/" + RECORDS

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    def records(folder):
        path = folder / RECORDS
        return json.loads(path.read_text()) if path.exists() else []

    progress(f"train suite: {dtypes}, lora_dropout {', '.join(f'{p:g}' for p in args.dropout)}, "
             f"{ts.PRESETS[preset].describe()}"
             f"{'; emulating a CPU without native bf16 GEMMs' if args.emulate_no_bf16 else ''}; pytest-benchmark in a "
             "process of its own")
    status, _, recs = pytest_run.run("fastlora.bench.pytest_train", env, progress, read=records)
    rows = [row for rec in recs for row in to_rows(rec)]
    if rows:
        print(format_rows(rows))
    args.rows.extend(rows)
    if status != 0:
        print(f"fastlora bench: the train suite's pytest run ended with status {status} (see above: a backend that "
              "cannot run here, or fastlora's and PEFT's initial losses disagreeing)", file=sys.stderr)
        return 2 if not rows else 1
    return 0
