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
* ``lora_qkv`` fwd / bwd / full: attention's q, k, v of hidden size K, Llama-style grouped-query attention
  (q K -> K, k and v K -> K/4; N is not used), QLoRA on all three; ``fastlora.ops.lora_qkv`` per backend vs
  three PEFT ``lora.bnb.Linear4bit`` layers called one by one on the same x, as PEFT computes them.
* ``linear_4bit`` fwd / bwd / full: x (M, K) through a frozen NF4 K -> N linear without adapter (the weight of
  lora_linear's case); ``fastlora.ops.linear_4bit`` per backend vs a bitsandbytes ``Linear4bit``. Nothing is
  trainable but x: bwd is dx alone.
* ``dora_linear`` fwd / bwd / full: lora_linear's projection with DoRA's magnitude vector (fp32, the row norms
  ‖W + s·BA‖); ``fastlora.ops.dora_linear`` per backend vs PEFT's DoRA layer (``LoraConfig(use_dora=True)``
  over a bitsandbytes ``Linear4bit``).
* ``frozen_linear`` fwd / bwd / full: a frozen bf16 K -> N dense linear, always bf16 whatever ``--dtype`` says
  (its only dtype), CPU only (left out on a GPU); bwd is dx alone. ``fastlora.ops.frozen_linear`` (fp32 GEMMs
  over blocks of W, one provider ``fastlora``: it has no backends) vs torch's bf16 ``F.linear``, the call it
  replaces. fastlora patches it in only where torch's bf16 GEMMs are slow (CPUs without native bf16:
  ``fastlora.ops.frozen_linear.torch_bf16_gemms_slow``); its rows say whether that holds on this CPU.

Providers: ``fastlora:<backend>`` for every backend that runs on the device here (cpp on a CPU with the
compiled extension; cuda / triton on a GPU), ``torch-reference`` (fastlora's reference backend: plain
torch, the ground truth; for frozen_linear the same fp32 math untiled) and the peer (``bitsandbytes``,
``peft``, ``transformers``, ``torch``). A provider whose library is missing is left out with a note. The
builders are in :mod:`fastlora.bench.kernel_cases`.

Timing: pytest-benchmark. :func:`plan` names every case before anything is built, :func:`build` makes the
callables of one (op, dtype); fastlora/bench/pytest_kernels.py turns them into pytest-benchmark tests, which
:func:`run` executes in a pytest process of its own (:mod:`fastlora.bench.pytest_run`);
:func:`rows_from_benchmarks` reads its JSON report back into result rows, with each case's achieved
TFLOP/s and GB/s against the device's ceilings (:mod:`fastlora.bench.roofline`, timed the same way).
``--crossover`` (a GPU's small-M / large-M dispatch crossover, :mod:`fastlora.bench.crossover`) is timed
with :func:`fastlora.bench.timing.measure` instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys

import torch

from . import crossover, lora_setup, pytest_run, results, roofline
from . import kernel_cases as kc
from .arg_types import positive_int
from .kernel_cases import Provider

OPS = ("dequantize_4bit", "lora_linear", "neftune_embedding", "gated_mlp", "lora_qkv", "linear_4bit", "dora_linear",
       "frozen_linear")
PASSES = ("fwd", "bwd", "full")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT = (256, (1024, 2816))  # tokens, (K, N): runs in about a minute on a 2-core CPU
# On a GPU, a training-size call (Llama-3-8B's MLP up-projection at 4096 tokens): at the CPU's sizes an H100 measured
# launch overhead, not kernels (0-1% of its GEMM and copy ceilings, 2026-11-27).
DEFAULT_GPU = (4096, (4096, 14336))
QUICK = (32, (128, 256))


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


def _qkv_label(m: int, k: int, n: int) -> str:
    q, kv, _ = lora_setup.qkv_out_features(k)
    return f"M{m} {k}->{q}+{kv}+{kv}"


CASES = {  # op -> (builder, the peer's modules, shape label)
    "dequantize_4bit": (kc.dequantize_cases, ("bitsandbytes",), lambda m, k, n: f"{n}x{k}"),
    "lora_linear": (kc.lora_linear_cases, ("bitsandbytes", "peft"), lambda m, k, n: f"M{m} {k}->{n}"),
    "neftune_embedding": (kc.neftune_cases, ("transformers",), lambda m, k, n: f"M{m} vocab{n} d{k}"),
    "gated_mlp": (kc.gated_mlp_cases, ("bitsandbytes", "peft"), lambda m, k, n: f"M{m} {k}->{n}->{k}"),
    "lora_qkv": (kc.lora_qkv_cases, ("bitsandbytes", "peft"), _qkv_label),
    "linear_4bit": (kc.linear_4bit_cases, ("bitsandbytes",), lambda m, k, n: f"M{m} {k}->{n}"),
    "dora_linear": (kc.dora_linear_cases, ("bitsandbytes", "peft"), lambda m, k, n: f"M{m} {k}->{n}"),
    "frozen_linear": (kc.frozen_linear_cases, (), lambda m, k, n: f"M{m} {k}->{n}"),
}


CONFIG_ENV = "FASTLORA_KERNELS_SUITE"  # a SuiteConfig's JSON, read by fastlora.bench.pytest_kernels
SINGLE_PASS = ("dequantize_4bit", "neftune_embedding")  # ops timed as one forward call
PEER_PROVIDERS = {"dequantize_4bit": "bitsandbytes", "lora_linear": "peft", "neftune_embedding": "transformers",
                  "gated_mlp": "peft", "lora_qkv": "peft", "linear_4bit": "bitsandbytes", "dora_linear": "peft",
                  "frozen_linear": "torch"}
# frozen_linear: bf16 only, CPU only, no backends (one "fastlora" provider); the other ops take --dtype and run on
# --device with fastlora_providers
OWN_DTYPES = {"frozen_linear": ("bf16",)}
CPU_ONLY = ("frozen_linear",)
NO_BACKENDS = ("frozen_linear",)


@dataclasses.dataclass(frozen=True)
class SuiteConfig:
    """What one run of the suite measures (JSON-able: it travels to the pytest-benchmark process)."""
    ops: list[str]
    dtypes: list[str]
    tokens: int
    k: int
    n: int
    device: str = "cpu"
    seconds: float = 0.5  # time budget per case (0: one timed run, no warm-up)
    max_runs: int = 15
    reference: bool = True

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> SuiteConfig:
        return cls(**json.loads(text))


@dataclasses.dataclass(frozen=True)
class PlannedCase:
    """One timed case, known before any tensor is built (a pytest-benchmark test id)."""
    op: str
    pass_: str
    dtype: str
    provider: str

    @property
    def id(self) -> str:
        return f"{self.op}-{self.pass_}-{self.dtype}-{self.provider}"


def op_label(op: str, pass_: str) -> str:
    return op if op in SINGLE_PASS else f"{op} {pass_}"


def providers_of(cfg: SuiteConfig, op: str) -> list[Provider]:
    own = [Provider("fastlora", "fastlora", None), Provider("torch-reference", "reference", None)]
    return [p for p in (own if op in NO_BACKENDS else fastlora_providers(cfg.device))
            if cfg.reference or p.role != "reference"]


def ops_of(cfg: SuiteConfig) -> list[str]:
    """The ops of a run that run on its device (a CPU-only op is left out on a GPU)."""
    return [op for op in cfg.ops if cfg.device == "cpu" or op not in CPU_ONLY]


def dtypes_of(op: str, cfg: SuiteConfig) -> list[str]:
    return list(OWN_DTYPES.get(op, cfg.dtypes))


def ceiling_dtypes(cfg: SuiteConfig) -> list[str]:
    """The dtypes whose ceilings a run measures: those of its cases."""
    return list(dict.fromkeys(d for op in ops_of(cfg) for d in dtypes_of(op, cfg)))


def plan(cfg: SuiteConfig) -> list[PlannedCase]:
    """Every (op, dtype, pass, provider) of a run, in the order they are timed (ops, dtypes, then as each op's
    builder yields them: fastlora's providers and the reference per pass, the peer last)."""
    out = []
    for op in ops_of(cfg):
        passes = ("fwd",) if op in SINGLE_PASS else PASSES
        names = [p.name for p in providers_of(cfg, op)]
        for dtype in dtypes_of(op, cfg):
            for provider in [*names, PEER_PROVIDERS[op]]:
                out += [PlannedCase(op, pass_, dtype, provider) for pass_ in passes]
    return out


def build(op: str, dtype: str, cfg: SuiteConfig) -> tuple[dict[tuple[str, str], tuple], str | None]:
    """The callables of one (op, dtype): {(pass, provider name): (Provider, fn, setup)}, and why the peer is
    missing (None when it is there). ``fn(setup())`` (or ``fn()`` without setup) is one timed call."""
    builder = CASES[op][0]
    cases = builder(cfg.tokens, cfg.k, cfg.n, DTYPES[dtype], cfg.device, providers_of(cfg, op))
    out, missing = {}, _peer_missing(*CASES[op][1])
    while True:
        try:
            name, provider, fn, setup = next(cases)
        except StopIteration:
            break
        except ImportError as exc:  # the peer's library, imported when its case is built
            missing = str(exc)
            break
        out[(name, provider.name)] = (provider, fn, setup)
    return out, missing


def shape_label(op: str, cfg: SuiteConfig) -> str:
    return CASES[op][2](cfg.tokens, cfg.k, cfg.n)


def op_note(op: str) -> str | None:
    """What the rows of ``op`` must say besides their numbers (frozen_linear: whether fastlora patches it in on
    this CPU), or None."""
    if op != "frozen_linear":
        return None
    from fastlora.ops.frozen_linear import torch_bf16_gemms_slow

    here = ("they are here" if torch_bf16_gemms_slow() else
            "not here: this CPU runs them natively, so fastlora leaves torch's F.linear in place")
    return f"fastlora patches it in only where torch's bf16 GEMMs are slow (CPUs without native bf16); {here}"


def ceiling_rows(c: roofline.Ceilings) -> list[dict]:
    device = c.device if c.device != "cpu" else None
    return [results.row("GEMM ceiling", "torch.mm", "reference", f"{c.gemm_n}x{c.gemm_n}x{c.gemm_n}", c.dtype,
                        "TFLOP/s", c.gemm_tflops, "TFLOP/s", device=device),
            results.row("copy ceiling", "Tensor.copy_", "reference", f"{c.copy_bytes >> 20} MiB", c.dtype, "GB/s",
                        c.copy_gbs, "GB/s", device=device)]


def rows_from_benchmarks(report: dict, cfg: SuiteConfig) -> list[dict]:
    """Result rows from a pytest-benchmark JSON report of fastlora.bench.pytest_kernels: the ceilings, then per
    case its median time and achieved TFLOP/s and GB/s against the ceilings of its dtype."""
    where = cfg.device if cfg.device != "cpu" else None
    timed = [(b["extra_info"], b["stats"]) for b in report.get("benchmarks", [])]
    ceilings = {}
    for dtype in ceiling_dtypes(cfg):
        ms = {info["ceiling"]: stats["median"] * 1e3 for info, stats in timed
              if info.get("ceiling") and info["dtype"] == dtype}
        if set(ms) == {"gemm", "copy"}:
            ceilings[dtype] = roofline.ceilings_from(cfg.device, DTYPES[dtype], dtype, ms["gemm"], ms["copy"])
    rows = [r for c in ceilings.values() for r in ceiling_rows(c)]
    notes = {op: op_note(op) for op in cfg.ops}  # one probe of the CPU's bf16 GEMMs, not one per row
    for info, stats in timed:
        if info.get("ceiling"):
            continue
        op, pass_, dtype = info["op"], info["pass"], info["dtype"]
        median_ms = stats["median"] * 1e3
        common = (op_label(op, pass_), info["provider"], info["role"], shape_label(op, cfg), dtype)
        rates = (roofline.achieved(roofline.work(op, pass_, cfg.tokens, cfg.k, cfg.n, DTYPES[dtype]), median_ms,
                                   ceilings[dtype]) if dtype in ceilings else {})
        note = {"note": notes[op]} if notes.get(op) else {}
        rows.append(results.row(*common, "median time", median_ms, "ms", device=where, min_ms=stats["min"] * 1e3,
                                runs=stats["rounds"], backend=info["backend"], **rates, **note))
        if rates.get("tflops") is not None:
            rows.append(results.row(*common, "achieved TFLOP/s", rates["tflops"], "TFLOP/s", device=where,
                                    fraction_of_ceiling=rates["gemm_fraction"]))
        if rates:
            rows.append(results.row(*common, "achieved GB/s", rates["gbs"], "GB/s", device=where,
                                    fraction_of_ceiling=rates["copy_fraction"]))
    return rows


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
                             "without native bf16), bf16 with --crossover; frozen_linear is always bf16")
    parser.add_argument("--tokens", type=positive_int, default=None,
                        help=f"tokens M per call; default {DEFAULT[0]} ({DEFAULT_GPU[0]} with --device cuda, "
                             f"{QUICK[0]} with --quick)")
    parser.add_argument("--shape", type=_shape, default=None, metavar="KxN",
                        help=f"in x out features K x N (dequantize: an (N, K) weight; NEFTune: vocab N, dim K; "
                             f"gated MLP: hidden K, intermediate N; q/k/v: hidden K, q K -> K, k and v K -> K/4, N "
                             f"unused), multiples of 64; default "
                             f"{DEFAULT[1][0]}x{DEFAULT[1][1]} ({DEFAULT_GPU[1][0]}x{DEFAULT_GPU[1][1]} with --device "
                             f"cuda, {QUICK[1][0]}x{QUICK[1][1]} with --quick); "
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
        return crossover.run(args)
    tokens, (k, n) = QUICK if args.quick else DEFAULT_GPU if args.device == "cuda" else DEFAULT
    k, n = args.shape or (k, n)
    cfg = SuiteConfig(list(args.ops), args.dtype or ["fp32"], args.tokens or tokens, k, n, args.device,
                      0.0 if args.quick else args.seconds, 1 if args.quick else 15, not args.no_reference)

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    progress(f"kernels suite: M={cfg.tokens}, K={k}, N={n}, {', '.join(cfg.dtypes)}, {cfg.device} "
             f"({torch.get_num_threads()} threads), pytest-benchmark in a process of its own")
    status, report, _ = pytest_run.run("fastlora.bench.pytest_kernels", {CONFIG_ENV: cfg.to_json()}, progress)
    if report is None:
        print(f"fastlora bench: the pytest-benchmark run failed (exit status {status}) before writing its report",
              file=sys.stderr)
        return 1
    rows = rows_from_benchmarks(report, cfg)
    print(format_rows(rows))
    for op in cfg.ops:
        missing, note = _peer_missing(*CASES[op][1]), op_note(op)
        if op not in ops_of(cfg):
            print(f"note: {op}: left out: it runs on the CPU only")
        elif missing:
            print(f"note: {op}: peer left out: {missing}")
        elif note:
            print(f"note: {op}: {note}")
    args.rows.extend(rows)
    if status != 0:
        print(f"fastlora bench: {status} from pytest: some cases failed (see above); the others are recorded",
              file=sys.stderr)
        return 1
    return 0
