"""The demo's results: the side-by-side table (markdown + JSON), the loss curves (CSV + JSON) and their PNG
plot."""

from __future__ import annotations

import csv
import json
import math
import os

from .train import RunResult

FASTLORA, PEFT = "fastlora", "PEFT + bitsandbytes"
MIB = 2**20


def _metrics(run: RunResult) -> dict:
    return {
        "step_time_ms": run.step_time * 1e3,
        "tokens_per_s": run.tokens_per_second,
        "saved_activations_mib": run.saved_bytes / MIB,
        "peak_step_memory_mib": run.peak_step_bytes / MIB,
        "weights_and_optimizer_mib": run.resident_bytes / MIB,
        "train_loss_first": run.first_loss,
        "train_loss_final": run.final_loss,
        "eval_loss_start": run.eval_loss_start,
        "eval_loss_end": run.eval_loss_end,
    }


# (key, label, format, how the ratio reads: "faster" = PEFT / fastlora for times, "ratio" = fastlora / PEFT)
_ROWS = [
    ("step_time_ms", "step time (ms, median)", "{:.1f}", "faster"),
    ("tokens_per_s", "tokens / s", "{:,.0f}", "ratio"),
    ("saved_activations_mib", "saved for backward (MiB)", "{:.2f}", "ratio"),
    ("peak_step_memory_mib", "peak memory of a step (MiB)", "{:.2f}", "ratio"),
    ("weights_and_optimizer_mib", "weights + optimizer state (MiB)", "{:.2f}", "ratio"),
    ("train_loss_final", "train loss, last 10% of steps", "{:.3f}", "ratio"),
    ("eval_loss_end", "held-out loss at the end", "{:.3f}", "ratio"),
]


def ratios(ours: dict, theirs: dict) -> dict:
    """fastlora / PEFT for every metric; for the step time PEFT / fastlora (the speedup)."""
    out = {}
    for key, _, _, kind in _ROWS:
        a, b = ours[key], theirs[key]
        if kind == "faster":
            a, b = b, a
        out[key] = a / b if b and math.isfinite(a) and math.isfinite(b) else math.nan
    return out


def build_table(fast: RunResult, peft: RunResult | None, settings: dict, environment: dict) -> dict:
    """The table as data: settings, environment, each run's metrics and the ratios."""
    table = {"settings": settings, "environment": environment, "runs": {FASTLORA: _metrics(fast)}}
    if peft is not None:
        table["runs"][PEFT] = _metrics(peft)
        table["ratios"] = ratios(table["runs"][FASTLORA], table["runs"][PEFT])
    return table


def _ratio_text(value: float, kind: str) -> str:
    if not math.isfinite(value):
        return "n/a"
    return f"{value:.2f}x faster" if kind == "faster" else f"{value:.2f}x"


def markdown(table: dict) -> str:
    """The table in markdown, with the settings and environment above it and how it was measured below."""
    runs = table["runs"]
    compare = PEFT in runs
    s, env = table["settings"], table["environment"]
    head = (f"fastlora demo: preset {s['preset']}, {s['steps']} steps, batch {s['batch']} x {s['seq_len']} tokens, "
            f"LoRA r={s['rank']} alpha={s['alpha']} on all linears, NF4 base, NEFTune alpha={s['neftune_alpha']}, "
            f"{s['dtype']} on {env['device']}\n")
    if compare:
        lines = [f"| | {FASTLORA} | {PEFT} | {FASTLORA} vs PEFT |", "|---|---:|---:|---:|"]
    else:
        lines = [f"| | {FASTLORA} |", "|---|---:|"]
    for key, label, fmt, kind in _ROWS:
        row = f"| {label} | {fmt.format(runs[FASTLORA][key])} |"
        if compare:
            row += f" {fmt.format(runs[PEFT][key])} | {_ratio_text(table['ratios'][key], kind)} |"
        lines.append(row)
    foot = ("\nStep time: median over the steps after the first (warm-up) and the measured one; the runs are one "
            "after the other, so other load on the machine skews the time ratio. Saved for backward: "
            "distinct storages autograd keeps from one forward (saved_tensors_hooks), parameters and buffers left "
            "out. Peak memory of a step: " + ("CUDA allocator peak above the memory in use before the step."
                                             if env["device"].startswith("cuda") else
                                             "tensors created during one step (forward, backward, optimizer) at "
                                             "their peak, tracked per storage at the dispatcher; memory a compiled "
                                             "kernel allocates and frees inside one op is not seen.")
            + (" Loss: both runs start from the same weights and adapters and see the same batches; NEFTune's noise "
               "is each run's own draw (fastlora's Philox stream, transformers' uniform_), so with NEFTune on the "
               "losses agree in distribution, not step by step (with --neftune-alpha 0 they match)."
               if compare and s["neftune_alpha"] else "")
            + f"\nMachine: {env['cpu']}, {env['threads']} torch threads; torch {env['torch']}, transformers "
              f"{env['transformers']}, peft {env['peft']}, bitsandbytes {env['bitsandbytes']}.\n")
    return head + "\n" + "\n".join(lines) + "\n" + foot


def write_curves(folder: str, runs: dict[str, RunResult]) -> list[str]:
    """loss_curves.csv (step, one loss column per run) and loss_curves.json ({run: [loss per step]})."""
    names = list(runs)
    steps = max(len(r.losses) for r in runs.values())
    csv_path, json_path = os.path.join(folder, "loss_curves.csv"), os.path.join(folder, "loss_curves.json")
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", *names])
        for i in range(steps):
            writer.writerow([i, *(f"{runs[n].losses[i]:.6f}" if i < len(runs[n].losses) else "" for n in names)])
    with open(json_path, "w") as f:
        json.dump({n: runs[n].losses for n in names}, f)
    return [csv_path, json_path]


def write_table(folder: str, table: dict) -> list[str]:
    md_path, json_path = os.path.join(folder, "table.md"), os.path.join(folder, "table.json")
    with open(md_path, "w") as f:
        f.write(markdown(table))
    with open(json_path, "w") as f:
        json.dump(table, f, indent=2)
    return [md_path, json_path]


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_curves(folder: str, runs: dict[str, RunResult]) -> str | None:
    """loss_curves.png: the training loss of every run per step (thin) and its moving average (thick).
    Returns the path, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    colors = ("tab:blue", "tab:orange", "tab:green")
    for i, (name, run) in enumerate(runs.items()):
        color = colors[i % len(colors)]
        steps = range(len(run.losses))
        window = max(1, len(run.losses) // 20)
        ax.plot(steps, run.losses, color=color, alpha=0.3, linewidth=0.8)
        ax.plot(steps, _smooth(run.losses, window), color=color, linewidth=2, label=f"{name} (moving avg {window})")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats / byte)")
    ax.set_title("fastlora demo: QLoRA fine-tuning, same weights and batches")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = os.path.join(folder, "loss_curves.png")
    fig.savefig(path)
    plt.close(fig)
    return path
