"""``python -m fastlora bench --suite kernels``: every op, fastlora's backends vs the torch reference vs
the library users run today, on the same inputs.

Ops (M tokens, a K -> N projection; ``--tokens`` and ``--shape KxN`` set them):

* ``dequantize_4bit``: an (N, K) NF4 double-quant weight (blocksize 64) to the dtype;
  ``fastlora.nf4.dequantize`` per backend vs bitsandbytes ``functional.dequantize_4bit``.
* ``lora_linear`` fwd / bwd / full: x (M, K) through a QLoRA projection (r=16, alpha 32, fp32 adapters,
  the same NF4 tensors); ``fastlora.ops.lora_linear`` per backend vs PEFT's ``lora.bnb.Linear4bit`` over
  a bitsandbytes ``Linear4bit``. fwd: the forward of a training step (autograd records it); bwd: its
  backward alone (the forward runs untimed before each run); full: both.
* ``neftune_embedding`` fwd: M token ids into an (N, K) table, alpha 5;
  ``fastlora.ops.neftune_embedding`` per backend vs transformers' ``neftune_post_forward_hook``
  after ``F.embedding``.
* ``gated_mlp`` fwd / bwd / full: ``down(silu(gate(x)) * up(x))``, hidden K, intermediate N, QLoRA on
  all three; ``fastlora.ops.lora_gated_mlp`` per backend vs three PEFT layers composed as LlamaMLP.

Providers: ``fastlora:<backend>`` for every backend that runs on the device here (cpp on a CPU with the
compiled extension; cuda / triton on a GPU), ``torch-reference`` (fastlora's reference backend: plain
torch, the ground truth) and the peer (``bitsandbytes``, ``peft``, ``transformers``). A provider whose
library is missing is left out with a note.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys

import torch
import torch.nn.functional as F

from . import crossover, results, roofline
from .arg_types import positive_int
from .timing import measure

OPS = ("dequantize_4bit", "lora_linear", "neftune_embedding", "gated_mlp")
PASSES = ("fwd", "bwd", "full")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT = (256, (1024, 2816))  # tokens, (K, N): runs in about a minute on a 2-core CPU
QUICK = (32, (128, 256))
NEFTUNE_ALPHA = 5.0


@dataclasses.dataclass
class Provider:
    name: str
    role: str
    backend: str | None  # fastlora backend; None for the peer


def fastlora_providers(device: str) -> list[Provider]:
    from fastlora import backends

    have = backends.available("cuda" if device.startswith("cuda") else "cpu")
    out = [Provider(f"fastlora:{b}", "fastlora", b) for b in ("cuda", "triton", "cpp") if have[b]]
    return out + [Provider("torch-reference", "reference", "reference")]


def _peer_missing(*modules: str) -> str | None:
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            return f"{name} is not installed ({exc})"
    return None


# --------------------------------------------------------------------------------------------------
# the ops: each yields (pass, provider, fn, setup)


def dequantize_cases(tokens, k, n, dtype, device, providers):
    from fastlora import nf4

    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g) * 0.02
    q = nf4.quantize(w, 64, "nf4", True).to(device)
    for p in providers:
        yield "fwd", p, (lambda b=p.backend: nf4.dequantize(q, dtype, backend=b)), None
    import bitsandbytes.functional as bnbF

    packed, state = bnbF.quantize_4bit(w.to(dtype).to(device), blocksize=64, quant_type="nf4",
                                       compress_statistics=True)
    yield "fwd", Provider("bitsandbytes", "peer", None), (lambda: bnbF.dequantize_4bit(packed, state)), None


def _passes(forward, dy, leaves):
    """(pass, fn, setup) for a forward with autograd: fwd, bwd (forward untimed in setup), full."""
    def reset():
        for t in leaves:
            t.grad = None

    def fwd_setup():
        reset()
        return forward()

    yield "fwd", (lambda: forward()), None
    yield "bwd", (lambda y: y.backward(dy)), fwd_setup
    yield "full", (lambda: (reset(), forward().backward(dy))), None


def lora_linear_cases(tokens, k, n, dtype, device, providers):
    from fastlora.bench import lora_setup as ls
    from fastlora.ops import lora_linear

    prob = ls.make_problem(tokens, k, n)
    x0, dy = (t.to(device) for t in prob.inputs(dtype))
    q = prob.qweight.to(device)
    for p in providers:
        x, a, b = (t.to(device).detach().requires_grad_(True) for t in (x0, prob.lora_A, prob.lora_B))

        def forward(x=x, a=a, b=b, backend=p.backend):
            return lora_linear(x, q, a, b, ls.SCALING, dropout_p=0.0, training=True, backend=backend)

        for name, fn, setup in _passes(forward, dy, [x, a, b]):
            yield name, p, fn, setup
    layer = ls.peft_layer(prob, dtype).to(device)
    x = x0.detach().requires_grad_(True)
    leaves = [x, *(t for t in layer.parameters() if t.requires_grad)]
    for name, fn, setup in _passes(lambda: layer(x), dy, leaves):
        yield name, Provider("peft", "peer", None), fn, setup


def _hf_neftune_hook():
    from transformers.integrations.neftune import neftune_post_forward_hook

    return neftune_post_forward_hook


def neftune_cases(tokens, k, n, dtype, device, providers):
    from fastlora.ops import neftune_embedding

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(n, k, generator=g).to(dtype).to(device)
    ids = torch.randint(0, n, (1, tokens), generator=g).to(device)
    for p in providers:
        yield "fwd", p, (lambda b=p.backend: neftune_embedding(ids, weight, NEFTUNE_ALPHA, backend=b)), None
    hook = _hf_neftune_hook()
    module = torch.nn.Module()  # the hook reads module.training and module.neftune_noise_alpha
    module.neftune_noise_alpha = NEFTUNE_ALPHA
    yield "fwd", Provider("transformers", "peer", None), (lambda: hook(module, (ids,), F.embedding(ids, weight))), None


def gated_mlp_cases(tokens, k, n, dtype, device, providers):
    from fastlora.bench import lora_setup as ls
    from fastlora.ops.lora_gated_mlp import lora_gated_mlp
    from fastlora.ops.lora_projection import LoraProjection

    probs = {"gate": ls.make_problem(tokens, k, n, seed=1), "up": ls.make_problem(tokens, k, n, seed=2),
             "down": ls.make_problem(tokens, n, k, seed=3)}
    g = torch.Generator().manual_seed(7)
    x0 = torch.randn(tokens, k, generator=g).to(dtype).to(device)
    dy = (torch.randn(tokens, k, generator=g) * 0.01).to(dtype).to(device)
    for p in providers:
        x = x0.detach().requires_grad_(True)
        adapters = {name: [t.to(device).detach().requires_grad_(True) for t in (pr.lora_A, pr.lora_B)]
                    for name, pr in probs.items()}
        projs = {name: LoraProjection(pr.qweight.to(device), *adapters[name], ls.SCALING) for name, pr in probs.items()}

        def forward(x=x, projs=projs, backend=p.backend):
            return lora_gated_mlp(x, projs["gate"], projs["up"], projs["down"], backend=backend)

        leaves = [x, *(t for pair in adapters.values() for t in pair)]
        for name, fn, setup in _passes(forward, dy, leaves):
            yield name, p, fn, setup
    layers = {name: ls.peft_layer(pr, dtype).to(device) for name, pr in probs.items()}
    x = x0.detach().requires_grad_(True)
    leaves = [x, *(t for layer in layers.values() for t in layer.parameters() if t.requires_grad)]

    def peft_forward():
        return layers["down"](F.silu(layers["gate"](x)) * layers["up"](x))

    for name, fn, setup in _passes(peft_forward, dy, leaves):
        yield name, Provider("peft", "peer", None), fn, setup


CASES = {  # op -> (builder, the peer's modules, shape label)
    "dequantize_4bit": (dequantize_cases, ("bitsandbytes",), lambda m, k, n: f"{n}x{k}"),
    "lora_linear": (lora_linear_cases, ("bitsandbytes", "peft"), lambda m, k, n: f"M{m} {k}->{n}"),
    "neftune_embedding": (neftune_cases, ("transformers",), lambda m, k, n: f"M{m} vocab{n} d{k}"),
    "gated_mlp": (gated_mlp_cases, ("bitsandbytes", "peft"), lambda m, k, n: f"M{m} {k}->{n}->{k}"),
}


def ceiling_rows(c: roofline.Ceilings) -> list[dict]:
    device = c.device if c.device != "cpu" else None
    return [results.row("GEMM ceiling", "torch.mm", "reference", f"{c.gemm_n}x{c.gemm_n}x{c.gemm_n}", c.dtype,
                        "TFLOP/s", c.gemm_tflops, "TFLOP/s", device=device),
            results.row("copy ceiling", "Tensor.copy_", "reference", f"{c.copy_bytes >> 20} MiB", c.dtype, "GB/s",
                        c.copy_gbs, "GB/s", device=device)]


def run_suite(ops, dtypes, tokens, k, n, device, *, budget_s, max_runs, reference: bool = True,
              progress=print) -> tuple[list[dict], list[str]]:
    """Time every (op, pass, provider, dtype), each with its achieved TFLOP/s and GB/s against the device's
    measured ceilings (:mod:`fastlora.bench.roofline`); returns (result rows, notes)."""
    rows, notes = [], []
    providers = [p for p in fastlora_providers(device) if reference or p.role != "reference"]
    ceilings = {}
    for dtype_name in dtypes:
        ceilings[dtype_name] = c = roofline.measure_ceilings(device, DTYPES[dtype_name], dtype_name,
                                                             budget_s=budget_s, max_runs=max_runs)
        progress(f"  ceilings {dtype_name}: GEMM {c.gemm_tflops:.3g} TFLOP/s (torch.mm {c.gemm_n}^3), copy "
                 f"{c.copy_gbs:.3g} GB/s ({c.copy_bytes >> 20} MiB)")
        rows += ceiling_rows(c)
    for op in ops:
        builder, peer_modules, label = CASES[op]
        missing = _peer_missing(*peer_modules)
        if missing:
            notes.append(f"{op}: peer left out: {missing}")
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            cases = builder(tokens, k, n, dtype, device, providers)
            while True:
                try:
                    name, provider, fn, setup = next(cases)
                except StopIteration:
                    break
                except ImportError as exc:  # the peer's library, imported when its case is built
                    notes.append(f"{op} {dtype_name}: peer left out: {exc}")
                    break
                op_name = op if op in ("dequantize_4bit", "neftune_embedding") else f"{op} {name}"
                t = measure(fn, setup=setup, warmup=0 if max_runs == 1 else 1, min_runs=min(3, max_runs),
                            max_runs=max_runs,
                            budget_s=budget_s, device=device)
                rates = roofline.achieved(roofline.work(op, name, tokens, k, n, dtype), t.median_ms,
                                          ceilings[dtype_name])
                progress(f"  {op_name:<20} {dtype_name} {provider.name:<16} {t.median_ms:10.3f} ms ({t.runs} runs)")
                common = (op_name, provider.name, provider.role, label(tokens, k, n), dtype_name)
                where = device if device != "cpu" else None
                rows.append(results.row(*common, "median time", t.median_ms, "ms", device=where, min_ms=t.min_ms,
                                        runs=t.runs, backend=provider.backend, **rates))
                if rates["tflops"] is not None:
                    rows.append(results.row(*common, "achieved TFLOP/s", rates["tflops"], "TFLOP/s", device=where,
                                            fraction_of_ceiling=rates["gemm_fraction"]))
                rows.append(results.row(*common, "achieved GB/s", rates["gbs"], "GB/s", device=where,
                                        fraction_of_ceiling=rates["copy_fraction"]))
    return rows, notes


def _rate(value, fraction) -> str:
    return f"{'':>9}{'':>7}" if value is None else f"{value:>9.3g}{100 * fraction:>6.0f}%"


def format_rows(rows: list[dict]) -> str:
    """The ceilings, then one line per (op, shape, dtype, provider): median ms, x torch-reference, peer / this,
    achieved TFLOP/s and GB/s with their percentages of the ceilings."""
    lines = [f"ceiling {r['dtype']}: {r['op']} {r['value']:.3g} {r['unit']} ({r['provider']}, {r['shape']})"
             for r in rows if r["op"] in ("GEMM ceiling", "copy ceiling")]
    lines.append(f"{'op':<20}{'shape':<26}{'dtype':<6}{'provider':<17}{'median ms':>11}{'ref/this':>10}"
                 f"{'peer/this':>11}{'TFLOP/s':>9}{'%gemm':>7}{'GB/s':>9}{'%copy':>7}")
    lines.append("-" * len(lines[-1]))
    by_key: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["unit"] == "ms":
            by_key.setdefault((r["op"], r["shape"], r["dtype"]), []).append(r)
    for (op, shape, dtype), group in by_key.items():
        ref = next((r["value"] for r in group if r["role"] == "reference"), None)
        peer = next((r["value"] for r in group if r["role"] == "peer"), None)
        for r in group:
            t = r["value"]
            rr = f"{ref / t:>10.2f}" if ref and r["role"] != "reference" else f"{'':>10}"
            pr = f"{peer / t:>11.2f}" if peer and r["role"] != "peer" else f"{'':>11}"
            x = r["extra"]
            rates = (_rate(x["tflops"], x["gemm_fraction"]) + _rate(x["gbs"], x["copy_fraction"])
                     if "gbs" in x else "")
            lines.append(f"{op:<20}{shape:<26}{dtype:<6}{r['provider']:<17}{t:>11.3f}{rr}{pr}{rates}")
    lines.append("ratios > 1: this provider is faster than the torch reference (ref/this) or the peer (peer/this); "
                 "TFLOP/s and GB/s from each case's flops and least bytes moved (fastlora/bench/roofline.py), % of "
                 "the measured ceilings")
    return "\n".join(lines)


def _shape(text: str) -> tuple[int, int]:
    parts = text.lower().replace(",", "x").split("x")
    try:
        k, n = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected KxN, e.g. 4096x14336, got {text!r}") from None
    if k < 64 or n < 64 or k % 64 or n % 64:
        raise argparse.ArgumentTypeError(f"K and N must be positive multiples of the blocksize 64, got {k}x{n}")
    return k, n


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS), help="which ops; default all")
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=None,
                        help="activation / output dtype(s); default fp32 (PEFT's bf16 GEMMs are very slow on CPUs "
                             "without native bf16), bf16 with --crossover")
    parser.add_argument("--tokens", type=positive_int, default=None,
                        help=f"tokens M per call; default {DEFAULT[0]} ({QUICK[0]} with --quick)")
    parser.add_argument("--shape", type=_shape, default=None, metavar="KxN",
                        help=f"in x out features K x N (dequantize: an (N, K) weight; NEFTune: vocab N, dim K; "
                             f"gated MLP: hidden K, intermediate N), multiples of 64; default "
                             f"{DEFAULT[1][0]}x{DEFAULT[1][1]} ({QUICK[1][0]}x{QUICK[1][1]} with --quick); "
                             "real sizes e.g. --tokens 1024 --shape 4096x14336")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes and one timed run per case: checks the suite in seconds")
    parser.add_argument("--seconds", type=float, default=0.5,
                        help="time budget per case: runs repeat until it is spent (3..15 runs); default 0.5")
    parser.add_argument("--no-reference", action="store_true",
                        help="leave out the torch reference (plain torch, slow: the NEFTune reference draws its "
                             "Philox noise with int64 arithmetic, minutes per call at real sizes)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the ops run; default cpu")
    parser.add_argument("--crossover", action="store_true",
                        help="instead of the ops: on a GPU (--device cuda, CUDA extension built), time the 4-bit LoRA "
                             "forward on the CUDA small-M kernel and on the large-M path at M = "
                             f"{', '.join(map(str, crossover.ROWS))} and report per shape up to which M the small-M "
                             "path is faster (shapes: --shape, default Llama-3-8B's "
                             f"{', '.join(f'{k}x{n}' for k, n in crossover.DEFAULT_SHAPES)})")
    parser.add_argument("--save-tuned", action="store_true",
                        help="with --crossover: save the crossovers as this GPU's tuned default, which "
                             "backend='auto' then follows (file in $FASTLORA_TUNED_DIR, default "
                             "~/.cache/fastlora/tuned; see fastlora/tuning.py)")


def run_crossover(args) -> int:
    from fastlora import backends

    if args.device != "cuda" or not backends.available("cuda")["cuda"]:
        print("fastlora bench: --crossover needs --device cuda on a CUDA GPU with fastlora's CUDA extension built "
              "(it compares the CUDA small-M kernel with the large-M path)", file=sys.stderr)
        return 2
    dtypes = args.dtype or ["bf16"]
    shapes = [args.shape] if args.shape else list(crossover.DEFAULT_SHAPES)
    found: dict[str, int] = {}
    for dtype_name in dtypes:
        print(f"crossover: {dtype_name}, {torch.cuda.get_device_name()}", file=sys.stderr, flush=True)
        rows, per_shape = crossover.sweep(shapes, dtype_name, args.device, budget_s=0.0 if args.quick else args.seconds,
                                          max_runs=1 if args.quick else 15,
                                          progress=lambda line: print(line, file=sys.stderr, flush=True))
        args.rows.extend(rows)
        for shape, m in per_shape.items():
            found[shape] = min(found.get(shape, m), m)
    for shape, m in found.items():
        print(f"{shape}: CUDA small-M kernel at least as fast up to M={m} ({', '.join(dtypes)})")
    if args.save_tuned:
        path = crossover.save(found, torch.cuda.get_device_name(), torch.cuda.get_device_capability(), dtypes)
        print(f"tuned default saved to {path}")
    return 0


def run(args) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        print("fastlora bench: --device cuda: no CUDA GPU is available here", file=sys.stderr)
        return 2
    if not math.isfinite(args.seconds) or args.seconds <= 0:
        print(f"fastlora bench: --seconds must be a positive number, got {args.seconds}", file=sys.stderr)
        return 2
    if args.save_tuned and not args.crossover:
        print("fastlora bench: --save-tuned saves what --crossover measures: give both", file=sys.stderr)
        return 2
    if args.crossover:
        return run_crossover(args)
    args.dtype = args.dtype or ["fp32"]
    tokens, (k, n) = QUICK if args.quick else DEFAULT
    tokens = args.tokens or tokens
    k, n = args.shape or (k, n)
    torch.manual_seed(0)

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    progress(f"kernels suite: M={tokens}, K={k}, N={n}, {', '.join(args.dtype)}, {args.device} "
             f"({torch.get_num_threads()} threads)")
    rows, notes = run_suite(args.ops, args.dtype, tokens, k, n, args.device,
                            budget_s=0.0 if args.quick else args.seconds, max_runs=1 if args.quick else 15,
                            reference=not args.no_reference, progress=progress)
    print(format_rows(rows))
    for note in notes:
        print(f"note: {note}")
    args.rows.extend(rows)
    return 0
