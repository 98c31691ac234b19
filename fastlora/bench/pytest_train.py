"""QLoRA training step on the CPU: fastlora vs PEFT + bitsandbytes, side by side in one process, on
pytest-benchmark. What ``python -m fastlora bench --suite train`` runs underneath (in a pytest process of its own,
reading the records back from FASTLORA_TRAIN_BENCH_JSON) and what bench/bench_train_step.py collects:

    python -m pytest bench/bench_train_step.py                  (the summary is printed at the very end)
    python bench/bench_train_step.py --help                     (same, with options as flags)
    python bench/bench_train_step.py --preset-fp32 tiny --preset-bf16 tiny --steps 2   (checks the bench itself)

Model: a random-init Llama built from a LlamaConfig (nothing downloaded; fastlora/bench/train_setup.py), its seven
projections bitsandbytes Linear4bit nf4 double quant (blocksize 64), PEFT LoRA r=16, alpha 16 on all seven,
fp32 adapters (PEFT's default). fp32 runs: everything else (norms, embeddings, lm_head) fp32, as after
prepare_model_for_kbit_training; bf16 runs: the model and the 4-bit compute dtype bf16, adapters fp32.
Presets (issue 5): fp32 "full" = hidden 1024, intermediate 2816, 4 layers, GQA 16/4 heads, 2x512 tokens;
bf16 "small" = hidden 256, intermediate 704, 2 layers, GQA 4/1 heads, 2x128 tokens; vocab 2048.
A step = forward + causal-LM loss + backward + AdamW step (foreach=False) on the adapters.
Providers:
  peft+bnb  the PEFT model, unpatched
  fastlora  the same model object deep-copied and passed to fastlora.patch(copy, backend=...): whatever
            patch accelerates today (PEFT LoRA layers; more fusions later) is what is measured
Timed beside them, the floor (train_setup.floor_model): the same Llama dense and frozen, no adapters, with a
0-d trainable tap on the first layer's q/k/v outputs so that backward runs through everything LoRA makes it
run. PEFT/floor is the most any implementation that leaves the model's own GEMMs, attention and norms to torch
can gain over PEFT; fastlora/floor is what fastlora's adapter, dropout and 4-bit work still costs.
Steps alternate (A B F, F B A, ...) so all three see the same load on a shared machine.
Reported per (dtype, lora_dropout): ms/step (median, fastest, median process CPU time) and tokens/s of
each provider, the speed ratio, bytes saved for backward by one forward + loss (saved_tensors_hooks,
unique storages, the model's parameters, buffers and quant states excluded), the peak RSS delta of one
step (in-process VmHWM), and the loss of both providers on the same initial weights and batch (sanity:
they must agree; with dropout > 0 the masks differ, fastlora draws its own Philox masks, so only closely).
Targets (issue 5): fp32 >= 1.3x faster and saved bytes <= 0.7x PEFT's; bf16 >= 5x faster. Verdicts are
printed as PASS / MISS; the speed verdict compares the fastest timed step of each provider (other load only adds time).

Environment (the CLI flags set these):
  FASTLORA_TRAIN_BENCH_DTYPES    fp32,bf16 (default both)
  FASTLORA_TRAIN_BENCH_DROPOUTS  lora_dropout values, comma separated (default 0,0.05)
  FASTLORA_TRAIN_BENCH_STEPS     timed steps per provider (default 5)
  FASTLORA_TRAIN_BENCH_WARMUP    untimed steps per provider first (default 1)
  FASTLORA_TRAIN_BENCH_PRESET_FP32 / _BF16   full | small | tiny (defaults full / small)
  FASTLORA_TRAIN_BENCH_HIDDEN / _LAYERS / _SEQ   override the presets (intermediate = 2.75x hidden,
                                 rounded to 64; heads = hidden / 64, kv heads = heads / 4)
  FASTLORA_TRAIN_BENCH_BACKEND   fastlora.patch backend (default auto)
  FASTLORA_TRAIN_BENCH_NO_NATIVE_BF16  1: emulate a CPU without native bf16 GEMMs on one that has them (torch's
                                 oneDNN off, so its bf16 GEMMs take the portable path; FASTLORA_CPU_BF16_GEMM=0
                                 for fastlora), for both providers
  FASTLORA_TRAIN_BENCH_JSON      write the results as JSON to this path (rewritten after every test, so a run
                                 cut short keeps what it measured)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time
from pathlib import Path

import pytest
import torch

from fastlora.bench import train_setup as ts
from fastlora.bench.pytest_progress import Progress

ENV = "FASTLORA_TRAIN_BENCH_"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROVIDERS = ts.PROVIDERS
TIMED = (*PROVIDERS, ts.FLOOR)  # the floor's steps are interleaved with the two providers' in every round
SPEED_TARGET = {"fp32": 1.3, "bf16": 5.0}  # PEFT time / fastlora time, at least
SAVED_TARGET = {"fp32": 0.7}  # fastlora saved bytes / PEFT's, at most
# First-step loss, same weights and batch, dropout 0: fp32 differs only in summation order; bf16
# activations round each layer's output to 2^-8 relative, which moves the loss by up to ~1e-2 of itself.
LOSS_RTOL = {"fp32": 1e-5, "bf16": 2e-2}
LOSS_RTOL_DROPOUT = 5e-2  # different dropout masks (Philox vs torch): the loss moves by a few percent at most
# lora_B drawn from N(0, 0.02²) instead of PEFT's zeros, so the LoRA branch (and its dropout) already
# changes the first loss and the loss sanity check compares real LoRA outputs; the work per step is the same.
B_STD = 0.02
MiB = 1 << 20


def _env(name: str, default: str) -> str:
    return os.environ.get(ENV + name, "") or default


def _spec(dtype: str) -> ts.Spec:
    spec = ts.PRESETS[_env(f"PRESET_{dtype.upper()}", "full" if dtype == "fp32" else "small")]
    hidden, layers, seq = (_env(k, "") for k in ("HIDDEN", "LAYERS", "SEQ"))
    if hidden:
        h = int(hidden)
        heads = max(1, h // 64)
        spec = dataclasses.replace(spec, hidden=h, intermediate=64 * math.ceil(2.75 * h / 64), heads=heads,
                                   kv_heads=max(1, heads // 4))
    if layers:
        spec = dataclasses.replace(spec, layers=int(layers))
    if seq:
        spec = dataclasses.replace(spec, seq=int(seq))
    return spec


DTYPE_NAMES = [d.strip() for d in _env("DTYPES", "fp32,bf16").split(",") if d.strip()]
DROPOUTS = [float(p) for p in _env("DROPOUTS", "0,0.05").split(",") if p.strip()]
STEPS = int(_env("STEPS", "5"))
WARMUP = int(_env("WARMUP", "1"))
BACKEND = _env("BACKEND", "auto")
NO_NATIVE_BF16 = _env("NO_NATIVE_BF16", "0") not in ("", "0")
if NO_NATIVE_BF16:  # for this process: the bench's own pytest run (or the suite's process)
    torch.backends.mkldnn.enabled = False
    os.environ["FASTLORA_CPU_BF16_GEMM"] = "0"
for _d in DTYPE_NAMES:
    if _d not in DTYPES:
        raise ValueError(f"{ENV}DTYPES: expected fp32 and/or bf16, got {_d!r}")
CONFIGS = [(d, p) for d in DTYPE_NAMES for p in DROPOUTS]

_pairs: dict[tuple, dict] = {}  # (dtype, dropout) -> models, steps, batch, initial losses
_step_times: dict[tuple, list[float]] = {}  # (dtype, dropout, provider) -> seconds of every timed step
_cpu_times: dict[tuple, list[float]] = {}  # the same steps' process CPU seconds (all threads)
_losses: dict[tuple, list[float]] = {}  # (dtype, dropout, provider) -> loss of every step run
_saved: dict[tuple, dict] = {}  # (dtype, dropout, provider) -> saved-for-backward accounting
_rss: dict[tuple, int | None] = {}
_progress = Progress("train-bench")


def _cid(config) -> str:
    return f"{config[0]}-p{config[1]:g}"






@pytest.fixture(scope="module")
def unavailable():
    try:
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
        import transformers  # noqa: F401
        from peft.tuners.lora.bnb import Linear4bit  # noqa: F401
    except ImportError as exc:
        return f"needs transformers, peft and bitsandbytes: {exc}"
    return None


def _load() -> list[float] | None:
    """1/5/15-minute load averages: other processes on the cores make every time here longer."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _pair(request, dtype: str, dropout: float) -> dict:
    """Both providers' models and steps for one configuration, built once; the initial loss of each
    (same weights, same batch, same torch seed) is taken before any training."""
    key = (dtype, dropout)
    if key not in _pairs:
        spec = _spec(dtype)
        _progress.say(request, f"    building {dtype} model: {spec.describe()}, lora_dropout {dropout:g}")
        t0 = time.perf_counter()
        peft_model = ts.peft_model(spec, dtype=DTYPES[dtype], dropout=dropout, rank=16, alpha=16,
                                   b_std=B_STD)
        fast_model, handle = ts.patched_copy(peft_model, backend=BACKEND)
        ids = ts.token_batch(spec, seed=1)
        initial = {}
        for name, model in (("peft+bnb", peft_model), ("fastlora", fast_model)):
            torch.manual_seed(0)
            with torch.no_grad():
                initial[name] = model(input_ids=ids, labels=ids).loss.item()
        _pairs[key] = {"spec": spec, "ids": ids, "load_average": _load(), "handle": handle, "initial_loss": initial,
                       "models": {"peft+bnb": peft_model, "fastlora": fast_model},
                       "steps": {"peft+bnb": ts.TrainStep(peft_model), "fastlora": ts.TrainStep(fast_model),
                                 ts.FLOOR: ts.TrainStep(ts.floor_model(spec, DTYPES[dtype]))}}
        _progress.say(request, f"    built in {time.perf_counter() - t0:.1f} s; {handle.summary()}")
    return _pairs[key]


@pytest.mark.parametrize("config", CONFIGS, ids=_cid)
def test_train_step(benchmark, request, unavailable, config):
    """One round = one step of each provider and of the floor (train_setup.floor_model), in alternating order
    (A B F, then F B A, ...), each timed on its own: on a shared machine the load drifts, and interleaving
    exposes all three to the same drift. pytest-benchmark's table times the whole round; the summary uses the
    per-provider times."""
    dtype, dropout = config
    _progress.start(request, f"train steps {dtype} lora_dropout {dropout:g}, providers interleaved")
    if unavailable:
        pytest.skip(unavailable)
    pair = _pair(request, dtype, dropout)
    ids = pair["ids"]
    timed = {provider: _step_times.setdefault((dtype, dropout, provider), []) for provider in TIMED}
    rounds = [0]

    def run():
        order = TIMED if rounds[0] % 2 == 0 else TIMED[::-1]
        parts = []
        for provider in order:
            t0, c0 = time.perf_counter(), time.process_time()
            loss = pair["steps"][provider](ids).item()
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
            _losses.setdefault((dtype, dropout, provider), []).append(loss)
            if rounds[0] >= WARMUP:
                timed[provider].append(seconds)
                _cpu_times.setdefault((dtype, dropout, provider), []).append(cpu)
            parts.append(f"{provider} {seconds:.3f} s, cpu {cpu:.3f} s (loss {loss:.5f})")
        warm = " (warm-up)" if rounds[0] < WARMUP else ""
        _progress.say(request, f"    round {rounds[0] + 1}{warm}: " + ", ".join(parts))
        rounds[0] += 1

    benchmark.group = f"train step {dtype} lora_dropout {dropout:g}: {pair['spec'].describe()}"
    benchmark.extra_info.update(dtype=dtype, dropout=dropout, tokens=pair["spec"].tokens, backend=BACKEND,
                                round="one step of each provider and of the floor")
    benchmark.pedantic(run, rounds=STEPS, iterations=1, warmup_rounds=WARMUP)
    for provider in TIMED:
        benchmark.extra_info[f"{provider} step seconds"] = timed[provider]
    _write_json()


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("config", CONFIGS, ids=_cid)
def test_saved_for_backward(benchmark, request, unavailable, config, provider):
    """Bytes one forward + loss saves for backward, and the peak RSS delta of one whole step."""
    dtype, dropout = config
    _progress.start(request, f"saved-for-backward + peak RSS {dtype} lora_dropout {dropout:g} {provider}")
    if unavailable:
        pytest.skip(unavailable)
    pair = _pair(request, dtype, dropout)
    model, ids = pair["models"][provider], pair["ids"]
    out: dict = {}
    benchmark.group = "saved-for-backward probe (one forward + loss under saved_tensors_hooks)"
    benchmark.pedantic(lambda: out.update(ts.saved_for_backward(model, ids)), rounds=1, iterations=1,
                       warmup_rounds=0)
    key = (dtype, dropout, provider)
    _saved[key] = out
    _rss[key] = ts.peak_rss_delta(lambda: pair["steps"][provider](ids))
    benchmark.extra_info.update(saved_bytes=out["bytes"], saved_by_dtype=out["by_dtype"], peak_rss_delta=_rss[key])
    rss = "-" if _rss[key] is None else f"{_rss[key] / MiB:.1f} MiB"
    _progress.say(request, f"    saved {out['bytes'] / MiB:.1f} MiB in {out['storages']} storages; peak RSS delta "
                           f"{rss}")
    _write_json()


@pytest.mark.parametrize("config", CONFIGS, ids=_cid)
def test_initial_loss_agrees(request, unavailable, config):
    """Sanity: both providers compute the same loss on the same weights and batch."""
    dtype, dropout = config
    _progress.start(request, f"initial loss {dtype} lora_dropout {dropout:g}")
    if unavailable:
        pytest.skip(unavailable)
    pair = _pair(request, dtype, dropout)
    got, want = pair["initial_loss"]["fastlora"], pair["initial_loss"]["peft+bnb"]
    rel = abs(got - want) / abs(want)
    tol = LOSS_RTOL[dtype] if dropout == 0 else LOSS_RTOL_DROPOUT
    _progress.say(request, f"    fastlora {got:.6f} vs PEFT {want:.6f}: rel diff {rel:.2e} (tolerance {tol:g})")
    _write_json()
    assert rel <= tol, (got, want)
    assert pair["handle"].report()["fallback_calls"] == {}


# ---------------------------------------------------------------------------------------------
# summary


def _verdict(value: float | None, target: float | None, at_most: bool) -> str:
    if target is None:
        return ""
    bound = f"target {'<=' if at_most else '>='} {target:g}x"
    if value is None:
        return f"{bound}: -"
    ok = value <= target if at_most else value >= target
    return f"{bound}: {'PASS' if ok else 'MISS'}"


def results() -> list[dict]:
    """One record per (dtype, dropout) that ran; what the summary prints and --json writes."""
    out = []
    for dtype, dropout in CONFIGS:
        pair = _pairs.get((dtype, dropout))
        if pair is None:
            continue
        rec: dict = {"dtype": dtype, "lora_dropout": dropout, "model": dataclasses.asdict(pair["spec"]),
                     "tokens": pair["spec"].tokens, "backend": BACKEND, "threads": torch.get_num_threads(),
                     "emulated_no_native_bf16": NO_NATIVE_BF16,
                     "patch_summary": pair["handle"].summary(), "load_average": pair["load_average"],
                     "fallback_calls": sum(pair["handle"].report()["fallback_calls"].values()),
                     "initial_loss": dict(pair["initial_loss"])}
        for provider in TIMED:
            key = (dtype, dropout, provider)
            times = _step_times.get(key) or []
            t = statistics.median(times) if times else None
            cpu = _cpu_times.get(key) or []
            rec[provider] = {"ms_per_step": None if t is None else t * 1e3,
                             "min_ms_per_step": min(times) * 1e3 if times else None,
                             "cpu_ms_per_step": statistics.median(cpu) * 1e3 if cpu else None,
                             "step_ms": [x * 1e3 for x in times],
                             "tokens_per_s": None if t is None else pair["spec"].tokens / t,
                             "losses": _losses.get(key, []), "saved": _saved.get(key),
                             "peak_rss_delta": _rss.get(key)}
        # The verdict compares each provider's fastest timed step: on a shared machine other processes only
        # ever add time, so the minimum is the closest to the step's own cost; medians and CPU time are printed too.
        rec["speedup"] = _ratio(rec, "min_ms_per_step")
        rec["speedup_of_medians"] = _ratio(rec, "ms_per_step")
        rec["cpu_time_ratio"] = _ratio(rec, "cpu_ms_per_step")
        # The most any implementation leaving the model's own GEMMs, attention and norms to torch could gain.
        rec["peft_over_floor"] = _ratio(rec, "min_ms_per_step", "peft+bnb", ts.FLOOR)
        rec["fastlora_over_floor"] = _ratio(rec, "min_ms_per_step", "fastlora", ts.FLOOR)
        sp, sf = _saved.get((dtype, dropout, "peft+bnb")), _saved.get((dtype, dropout, "fastlora"))
        rec["saved_ratio"] = sf["bytes"] / sp["bytes"] if sp and sf and sp["bytes"] else None
        rp, rf = _rss.get((dtype, dropout, "peft+bnb")), _rss.get((dtype, dropout, "fastlora"))
        rec["peak_rss_ratio"] = rf / rp if rp and rf is not None else None
        lp, lf = rec["peft+bnb"]["losses"], rec["fastlora"]["losses"]
        n = min(len(lp), len(lf))
        rec["loss_max_rel_diff"] = max((abs(a - b) / abs(b) for a, b in zip(lf[:n], lp[:n], strict=True)), default=None)
        rec["speed_verdict"] = _verdict(rec["speedup"], SPEED_TARGET.get(dtype), at_most=False)
        rec["saved_verdict"] = _verdict(rec["saved_ratio"], SAVED_TARGET.get(dtype), at_most=True)
        out.append(rec)
    return out


def _ratio(rec: dict, field: str, over: str = "peft+bnb", under: str = "fastlora") -> float | None:
    a, b = rec[over][field], rec[under][field]
    return a / b if a and b else None


def _f(value, fmt: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{fmt}}"


def _write_json() -> None:
    path = _env("JSON", "")
    if path:
        Path(path).write_text(json.dumps(results(), indent=1))


def bench_summary() -> str:
    """The ratio summary; bench/conftest.py prints it after pytest-benchmark's tables."""
    recs = results()
    if not recs:
        return ""
    path = _env("JSON", "")
    _write_json()
    lines = ["", f"QLoRA training step on this CPU ({torch.get_num_threads()} threads): r=16, alpha 16, all seven "
             f"projections, nf4 double quant, fp32 adapters, AdamW; fastlora = fastlora.patch(backend={BACKEND!r})"
             f"{'; emulating a CPU without native bf16 GEMMs (oneDNN off)' if NO_NATIVE_BF16 else ''}. "
             f"{STEPS} timed step(s) per provider after {WARMUP} warm-up, the providers' "
             "steps interleaved; 'cpu ms' = process CPU time (all threads) per step."]
    for rec in recs:
        dtype, p = rec["dtype"], rec["lora_dropout"]
        lines.append(f"{dtype} lora_dropout {p:g}: {ts.Spec(**rec['model']).describe()}")
        lines.append(f"  {rec['patch_summary']}; fallback calls {rec['fallback_calls']}; load average at build "
                     f"{rec['load_average']} -> at the summary {_load()} (on {os.cpu_count()} CPUs)")
        lines.append(f"  {'provider':<10}{'ms/step':>10}{'min ms':>10}{'cpu ms':>10}{'tokens/s':>10}{'saved MiB':>11}"
                     f"{'peak RSS MiB':>14}{'initial loss':>14}")
        for provider in TIMED:
            r = rec[provider]
            saved = r["saved"]["bytes"] / MiB if r["saved"] else None
            rss = r["peak_rss_delta"] / MiB if r["peak_rss_delta"] is not None else None
            lines.append(f"  {provider:<10}{_f(r['ms_per_step'], '.1f', 10)}{_f(r['min_ms_per_step'], '.1f', 10)}"
                         f"{_f(r['cpu_ms_per_step'], '.1f', 10)}"
                         f"{_f(r['tokens_per_s'], '.0f', 10)}"
                         f"{_f(saved, '.1f', 11)}{_f(rss, '.1f', 14)}"
                         f"{_f(rec['initial_loss'].get(provider), '.6f', 14)}")
        init = rec["initial_loss"]
        rel0 = abs(init["fastlora"] - init["peft+bnb"]) / abs(init["peft+bnb"])
        tol = LOSS_RTOL[dtype] if p == 0 else LOSS_RTOL_DROPOUT
        lines.append(f"  speed PEFT/fastlora {_f(rec['speedup'], '.2f', 0)}x of the fastest steps  "
                     f"{rec['speed_verdict']} (of the medians {_f(rec['speedup_of_medians'], '.2f', 0)}x; "
                     f"process CPU time per step {_f(rec['cpu_time_ratio'], '.2f', 0)}x)")
        target = SPEED_TARGET.get(dtype)
        beyond = (rec["peft_over_floor"] is not None and target is not None and rec["peft_over_floor"] < target)
        lines.append(f"  floor (the same model dense and frozen, no adapters: its own GEMMs, attention and norms at "
                     f"torch's speed): PEFT/floor {_f(rec['peft_over_floor'], '.2f', 0)}x = the most any "
                     f"implementation leaving those to torch can gain"
                     f"{f' (below the {target:g}x target)' if beyond else ''}; fastlora/floor "
                     f"{_f(rec['fastlora_over_floor'], '.2f', 0)}x")
        lines.append(f"  saved-for-backward fastlora/PEFT {_f(rec['saved_ratio'], '.2f', 0)}x  "
                     f"{rec['saved_verdict'] or '(no target)'}; peak RSS fastlora/PEFT "
                     f"{_f(rec['peak_rss_ratio'], '.2f', 0)}x (no target)")
        diff = rec["loss_max_rel_diff"]
        lines.append(f"  loss sanity: initial rel diff {rel0:.1e} ({'ok' if rel0 <= tol else 'BAD'}, tol {tol:g}); "
                     f"over the run's steps max rel diff {_f(diff, '.1e', 0)}"
                     + (" (dropout masks differ: not expected equal)" if p else ""))
    if path:
        lines.append(f"JSON written to {path}")
    return "\n".join(lines)
