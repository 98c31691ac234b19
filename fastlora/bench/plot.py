"""``python -m fastlora bench --plot``: PNG charts from a results folder (:mod:`fastlora.bench.results`).

* ``speedup.png``: per op (and shape, dtype, device), peer time / fastlora time for each fastlora
  provider, from the latest run of each suite that has both (kernels, train); 1 = as fast as the peer.
* ``memory.png``: the memory suite's latest run, step peak in GiB per configuration and provider.

Needs matplotlib (an optional dependency); without it: a message and exit status 2.
"""

from __future__ import annotations

import pathlib
import sys

from . import results

GiB = 2**30


def _latest_runs(rows: list[dict]) -> list[dict]:
    """The rows of each suite's latest run."""
    latest: dict[str, str] = {}
    for r in rows:
        latest[r["suite"]] = max(latest.get(r["suite"], ""), r["run_id"])
    return [r for r in rows if r["run_id"] == latest[r["suite"]]]


SPEEDUP_TICKS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 1.5, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000)


def matplotlib_ticker():
    import matplotlib.ticker

    return matplotlib.ticker


def _speedup_chart(plt, rows: list[dict], path: pathlib.Path) -> bool:
    items = results.speedups(_latest_runs(rows))
    if not items:
        return False
    labels = [f"{i['op']} | {i['shape']} {i['dtype']} | {i['fastlora']} vs {i['peer']}" for i in items]
    values = [i["speedup"] for i in items]
    fig, ax = plt.subplots(figsize=(11, 0.35 * len(items) + 1.5))
    colors = ["tab:green" if v >= 1 else "tab:red" for v in values]
    ax.barh(range(len(items)), values, color=colors)
    ax.set_yticks(range(len(items)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    lo, hi = min(0.9, min(values) / 1.2), max(1.1, max(values) * 1.3)  # room for the value labels
    ax.set_xlim(lo, hi)
    # Labelled ticks from a fixed readable set (log-scale minor ticks crowd into each other within a decade).
    ticker = matplotlib_ticker()
    ax.xaxis.set_major_locator(ticker.FixedLocator([t for t in SPEEDUP_TICKS if lo <= t <= hi]))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel("speedup = peer time / fastlora time (log scale; > 1: fastlora faster)")
    devices = sorted({i["device"] for i in items})
    ax.set_title(f"fastlora vs peers, latest run per suite ({', '.join(devices)})", fontsize=9)
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:.2f}x", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def _memory_chart(plt, rows: list[dict], path: pathlib.Path) -> bool:
    mem = [r for r in _latest_runs(rows) if r["suite"] == "memory" and r["metric"] == "step peak"]
    if not mem:
        return False
    shapes = list(dict.fromkeys(r["shape"] for r in mem))
    providers = list(dict.fromkeys(r["provider"] for r in mem))
    width = 0.8 / len(providers)
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(shapes)), 4.5))
    for j, provider in enumerate(providers):
        values = [next((r["value"] / GiB for r in mem if r["shape"] == s and r["provider"] == provider), 0.0)
                  for s in shapes]
        xs = [i + (j - (len(providers) - 1) / 2) * width for i in range(len(shapes))]
        ax.bar(xs, values, width, label=provider)
        for x, v in zip(xs, values, strict=True):
            ax.text(x, v, f"{v:.1f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(shapes)), shapes, fontsize=7, rotation=15)
    ax.set_ylabel("peak memory of one training step (GiB)")
    ax.set_title("QLoRA step peak memory per provider (memory suite, estimated)", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def draw(folder: pathlib.Path) -> list[pathlib.Path]:
    """Draw the charts the folder's results allow; returns the PNG paths written."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    rows = results.load(folder)
    written = []
    for name, chart in (("speedup.png", _speedup_chart), ("memory.png", _memory_chart)):
        if chart(plt, rows, folder / name):
            written.append(folder / name)
    return written


def main(folder: pathlib.Path) -> int:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("fastlora bench --plot needs matplotlib: pip install matplotlib", file=sys.stderr)
        return 2
    if not results.load(folder):
        print(f"fastlora bench --plot: no results in {str(folder)!r}; run a suite first "
              "(python -m fastlora bench --suite kernels --results DIR)", file=sys.stderr)
        return 2
    written = draw(folder)
    if not written:
        print(f"fastlora bench --plot: the results in {str(folder)!r} have nothing to chart (no fastlora vs peer "
              "times, no memory suite)", file=sys.stderr)
        return 2
    for path in written:
        print(f"chart written to {path}")
    return 0
