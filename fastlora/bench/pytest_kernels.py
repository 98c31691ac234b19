"""The kernels suite as pytest-benchmark tests: what ``python -m fastlora bench --suite kernels`` runs underneath
(in a pytest process of its own) and what ``python -m pytest bench/`` collects through bench/bench_kernels_suite.py.

One test per timed case, ``test_case[<op>-<pass>-<dtype>-<provider>]`` (:func:`fastlora.bench.kernels.plan`), and
per dtype of the cases (:func:`fastlora.bench.kernels.ceiling_dtypes`) the two ceilings,
``test_ceiling[<dtype>-gemm|copy]``. Each is timed by pytest-benchmark's ``benchmark.pedantic``, one call per
round: a round count from the time budget (one untimed warm-up call first, then as many rounds as fit the budget,
3 to ``max_runs``; one round and no warm-up with a budget of 0), an untimed ``setup`` where the case has one (the
forward before a timed backward), the GPU synchronized inside the timed call. ``extra_info`` carries what a result
row needs (op, pass, dtype, provider, role, backend).

Configuration: the JSON of a :class:`fastlora.bench.kernels.SuiteConfig` in ``$FASTLORA_KERNELS_SUITE`` (the CLI
sets it), else the suite's defaults (``FASTLORA_BENCH_QUICK=1``: its --quick sizes). The tensors of one (op,
dtype) are built when its first case runs and dropped when the next (op, dtype) starts.
"""

from __future__ import annotations

import math
import os
import time

import pytest
import torch

from fastlora.bench import kernels, roofline
from fastlora.bench.lora_setup import env_quick

CONFIG_ENV = kernels.CONFIG_ENV


def suite_config() -> kernels.SuiteConfig:
    text = os.environ.get(CONFIG_ENV)
    if text:
        return kernels.SuiteConfig.from_json(text)
    quick = env_quick()
    tokens, (k, n) = kernels.QUICK if quick else kernels.DEFAULT
    return kernels.SuiteConfig(list(kernels.OPS), ["fp32"], tokens, k, n, seconds=0.0 if quick else 0.5,
                               max_runs=1 if quick else 15)


def pytest_generate_tests(metafunc):
    cfg = suite_config()
    if "case" in metafunc.fixturenames:
        cases = kernels.plan(cfg)
        metafunc.parametrize("case", cases, ids=[c.id for c in cases])
    if "ceiling" in metafunc.fixturenames:
        pairs = [(dtype, kind) for dtype in kernels.ceiling_dtypes(cfg) for kind in ("gemm", "copy")]
        metafunc.parametrize("ceiling", pairs, ids=[f"{d}-{k}" for d, k in pairs])


def _synced(fn, device: str):
    if not device.startswith("cuda"):
        return fn

    def call(*args):
        out = fn(*args)
        torch.cuda.synchronize()
        return out

    return call


def _pedantic(benchmark, cfg: kernels.SuiteConfig, fn, setup=None) -> None:
    fn = _synced(fn, cfg.device)
    args = (lambda: ((_synced(setup, cfg.device)(),), {})) if setup is not None else None
    if cfg.seconds <= 0 or cfg.max_runs == 1:
        rounds, warmup = 1, 0
    else:
        a, kw = args() if args else ((), {})
        t0 = time.perf_counter()
        fn(*a, **kw)
        once = time.perf_counter() - t0
        rounds = max(min(3, cfg.max_runs), min(cfg.max_runs, math.ceil(cfg.seconds / max(once, 1e-9))))
        if once >= cfg.seconds:
            rounds = 1  # a slow reference must not hold the suite up for minutes
        warmup = 0  # the calibration call was the warm-up
    if args is None:
        benchmark.pedantic(fn, rounds=rounds, warmup_rounds=warmup, iterations=1)
    else:
        benchmark.pedantic(fn, setup=args, rounds=rounds, warmup_rounds=warmup, iterations=1)


_built: dict[tuple[str, str], tuple[dict, str | None]] = {}
_timed: list[dict] = []  # this process's results in the form of pytest-benchmark's JSON report, for the summary


def _record(benchmark) -> None:
    if benchmark.stats:  # None / empty with --benchmark-disable
        s = benchmark.stats.stats
        _timed.append({"extra_info": dict(benchmark.extra_info),
                       "stats": {"median": s.median, "min": s.min, "rounds": s.rounds}})


def bench_summary() -> str:
    """The suite's table (ceilings, ratios, TFLOP/s and GB/s) of what ran in this process (bench/conftest.py
    prints it after pytest-benchmark's own tables)."""
    if not _timed:
        return ""
    return kernels.format_rows(kernels.rows_from_benchmarks({"benchmarks": _timed}, suite_config()))


def _group(op: str, dtype: str, cfg: kernels.SuiteConfig) -> tuple[dict, str | None]:
    if (op, dtype) not in _built:
        _built.clear()  # one (op, dtype) alive at a time: the cases run in plan order
        torch.manual_seed(0)
        _built[(op, dtype)] = kernels.build(op, dtype, cfg)
    return _built[(op, dtype)]


def test_ceiling(ceiling, benchmark):
    cfg = suite_config()
    dtype, kind = ceiling
    benchmark.extra_info.update(ceiling=kind, dtype=dtype)
    _pedantic(benchmark, cfg, roofline.ceiling_operation(kind, cfg.device, kernels.DTYPES[dtype]))
    _record(benchmark)


def test_case(case, benchmark):
    cfg = suite_config()
    built, peer_missing = _group(case.op, case.dtype, cfg)
    if (case.pass_, case.provider) not in built:
        pytest.skip(f"peer left out: {peer_missing}")
    provider, fn, setup = built[(case.pass_, case.provider)]
    benchmark.extra_info.update(op=case.op, dtype=case.dtype, provider=provider.name, role=provider.role,
                                backend=provider.backend)
    benchmark.extra_info["pass"] = case.pass_
    _pedantic(benchmark, cfg, fn, setup)
    _record(benchmark)
