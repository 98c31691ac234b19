"""The dispatch crossover of the LoRA forward on a GPU: up to how many tokens the CUDA small-M kernel beats the
large-M path, per shape (``python -m fastlora bench --suite kernels --crossover [--save-tuned]``).

For each K -> N shape and each token count M in :data:`ROWS` (the CUDA kernel takes M <= 16), the forward of a
QLoRA projection (NF4 double quant, r=16, fp32 adapters, under ``torch.no_grad`` as in generation) is timed on
both paths: ``backend="cuda"`` (the fused small-M kernel) and ``backend="triton"`` (the weight decoded once into a
workspace, cuBLAS, the Triton epilogue). The crossover is the largest M up to which the small-M path is at least
as fast at every measured M (0: slower already at M=1). ``--save-tuned`` writes it for this GPU
(:mod:`fastlora.tuning`), where ``backend="auto"`` then reads it.
"""

from __future__ import annotations

import datetime
import sys

import torch

from . import lora_setup as ls
from . import results
from .timing import measure

ROWS = (1, 2, 4, 8, 12, 16)
# Llama-3-8B's projections (q/o, k/v, gate/up, down): the shapes a crossover is saved for by default
DEFAULT_SHAPES = ((4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096))
PATHS = (("fastlora:cuda small-M", "cuda"), ("fastlora:triton large-M", "triton"))


def crossover(times: dict[int, tuple[float, float]]) -> int:
    """``times``: M -> (small-M ms, large-M ms). The largest M up to which small-M is never slower; 0 if never."""
    best = 0
    for m in sorted(times):
        small, large = times[m]
        if small > large:
            break
        best = m
    return best


def sweep(shapes, dtype_name: str, device: str, *, budget_s: float, max_runs: int, paths=PATHS,
          rows=ROWS, progress=print) -> tuple[list[dict], dict[str, int]]:
    """Time both paths at every M for every shape; returns (result rows, {"KxN": crossover})."""
    from fastlora.ops import lora_linear

    from .kernels import DTYPES

    dtype = DTYPES[dtype_name]
    out_rows, found = [], {}
    where = device if device != "cpu" else None
    for k, n in shapes:
        prob = ls.make_problem(max(rows), k, n)
        q, a, b = prob.qweight.to(device), prob.lora_A.to(device), prob.lora_B.to(device)
        g = torch.Generator().manual_seed(k * 31 + n)
        times = {}
        for m in rows:
            x = torch.randn(m, k, generator=g).to(dtype).to(device)
            pair = []
            for provider, backend in paths:
                def forward(x=x, q=q, a=a, b=b, backend=backend):
                    with torch.no_grad():
                        return lora_linear(x, q, a, b, ls.SCALING, backend=backend)

                t = measure(forward, warmup=0 if max_runs == 1 else 1, min_runs=min(3, max_runs), max_runs=max_runs,
                            budget_s=budget_s, device=device)
                pair.append(t.median_ms)
                out_rows.append(results.row("lora_linear fwd crossover", provider, "fastlora", f"M{m} {k}->{n}",
                                            dtype_name, "median time", t.median_ms, "ms", device=where,
                                            min_ms=t.min_ms, runs=t.runs, backend=backend, tokens=m))
            times[m] = tuple(pair)
            progress(f"  {k}->{n} M={m:<3} small-M {pair[0]:8.4f} ms  large-M {pair[1]:8.4f} ms")
        found[f"{k}x{n}"] = best = crossover(times)
        out_rows.append(results.row("lora_linear fwd crossover", "fastlora", "fastlora", f"{k}->{n}", dtype_name,
                                    "small-M path up to", best, "rows", device=where,
                                    times={str(m): list(v) for m, v in times.items()}))
        progress(f"  {k}->{n}: the small-M path is at least as fast up to M={best}")
    return out_rows, found


def tuned_table(found: dict[str, int], existing: dict) -> dict:
    """The saved table: this run's shapes over those saved before; ``default`` the smallest crossover of all."""
    from fastlora import tuning

    table = {key: v for key, v in existing.get(tuning.CUDA_ROWS_KEY, {}).items() if key != "default"}
    table.update(found)
    table["default"] = min(table.values())
    return table


def save(found: dict[str, int], device_name: str, capability: tuple[int, int], dtypes: list[str]) -> str:
    """Save the crossovers for this GPU (merged with what was saved for it before); returns the file's path."""
    import fastlora
    from fastlora import tuning

    key = tuning.device_key(device_name, capability)
    data = {"device": device_name, "capability": list(capability),
            tuning.CUDA_ROWS_KEY: tuned_table(found, tuning.load(key)),
            "measured": {"fastlora_version": fastlora.__version__, "git_commit": results.git_commit(),
                         "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                         "dtypes": dtypes, "rows": list(ROWS), "this_run": found}}
    return str(tuning.save(key, data))


def run(args) -> int:
    """``--crossover`` of the kernels suite (its options: fastlora.bench.kernels.add_arguments)."""
    from fastlora import backends

    if args.device != "cuda" or not backends.available("cuda")["cuda"]:
        print("fastlora bench: --crossover needs --device cuda on a CUDA GPU with fastlora's CUDA extension built "
              "(it compares the CUDA small-M kernel with the large-M path)", file=sys.stderr)
        return 2
    dtypes = args.dtype or ["bf16"]
    shapes = [args.shape] if args.shape else list(DEFAULT_SHAPES)
    found: dict[str, int] = {}
    for dtype_name in dtypes:
        print(f"crossover: {dtype_name}, {torch.cuda.get_device_name()}", file=sys.stderr, flush=True)
        rows, per_shape = sweep(shapes, dtype_name, args.device, budget_s=0.0 if args.quick else args.seconds,
                                max_runs=1 if args.quick else 15,
                                progress=lambda line: print(line, file=sys.stderr, flush=True))
        args.rows.extend(rows)
        for shape, m in per_shape.items():
            found[shape] = min(found.get(shape, m), m)
    for shape, m in found.items():
        print(f"{shape}: CUDA small-M kernel at least as fast up to M={m} ({', '.join(dtypes)})")
    if args.save_tuned:
        path = save(found, torch.cuda.get_device_name(), torch.cuda.get_device_capability(), dtypes)
        print(f"tuned default saved to {path}")
    return 0
