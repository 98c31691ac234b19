"""``python -m fastlora bench``: the kernels, train and compile suites in --quick mode, the results folder
(CSV and JSON, re-read), --output, --plot and bad input. Through ``fastlora.__main__.main`` in-process."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from fastlora.__main__ import main
from fastlora.bench import SUITES, build_parser, results

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

STAMPED = set(results.KEYS)


def _run(tmp_path, *args):
    return main(["bench", *args, "--results", str(tmp_path / "res")])


def _check_results(tmp_path, suite: str) -> list[dict]:
    folder = tmp_path / "res"
    from_json = [r for r in results.load_json(folder / results.JSON_NAME) if r["suite"] == suite]
    from_csv = [r for r in results.load_csv(folder / results.CSV_NAME) if r["suite"] == suite]
    assert from_json and len(from_json) == len(from_csv)
    for a, b in zip(from_json, from_csv, strict=True):
        assert set(a) == STAMPED
        assert a["value"] == pytest.approx(b["value"])
        assert a["extra"] == b["extra"]
        assert {k: a[k] for k in STAMPED - {"value", "extra"}} == {k: b[k] for k in STAMPED - {"value", "extra"}}
        assert a["fastlora_version"] and a["git_commit"] and a["device"]
    return from_json


@pytest.fixture(scope="module")
def kernels_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("kernels")
    out = tmp_path / "run.json"
    status = _run(tmp_path, "--suite", "kernels", "--quick", "--output", str(out))
    return tmp_path, out, status


def test_kernels_suite_rows(kernels_run, capsys):
    tmp_path, out, status = kernels_run
    assert status == 0
    every_row = _check_results(tmp_path, "kernels")
    # the ceilings of fp32 (--dtype's default) and of bf16, frozen_linear's only dtype
    ceilings = {(r["op"], r["dtype"]): r for r in every_row if r["op"].endswith("ceiling")}
    assert set(ceilings) == {(c, d) for c in ("GEMM ceiling", "copy ceiling") for d in ("fp32", "bf16")}
    assert all(c["unit"] == ("TFLOP/s" if c["op"] == "GEMM ceiling" else "GB/s") for c in ceilings.values())
    assert all(c["value"] > 0 for c in ceilings.values())
    rows = [r for r in every_row if r["unit"] == "ms"]
    # every timed case also as achieved GB/s (and TFLOP/s where it multiplies matrices), from the same time
    rates = {(r["op"], r["provider"], r["unit"]): r for r in every_row if r["metric"].startswith("achieved")}
    for r in rows:
        x = r["extra"]
        gbs = rates[(r["op"], r["provider"], "GB/s")]
        assert gbs["value"] == pytest.approx(x["gbs"]) and x["gbs"] > 0
        copy_ceiling = ceilings[("copy ceiling", r["dtype"])]["value"]
        assert gbs["extra"]["fraction_of_ceiling"] == pytest.approx(x["gbs"] / copy_ceiling)
        has_flops = not r["op"].startswith(("dequantize", "neftune"))
        assert ((r["op"], r["provider"], "TFLOP/s") in rates) == has_flops == (x["tflops"] is not None)
    assert len(every_row) == len(ceilings) + len(rows) + len(rates)
    ops = {r["op"] for r in rows}
    multi_pass = ("lora_linear", "gated_mlp", "lora_qkv", "linear_4bit", "dora_linear", "frozen_linear")
    assert ops == {"dequantize_4bit", "neftune_embedding", *(f"{op} {p}" for op in multi_pass
                                                             for p in ("fwd", "bwd", "full"))}
    for op in ops:  # every op: a fastlora provider, the torch reference and the peer
        roles = {r["role"] for r in rows if r["op"] == op}
        assert roles == {"fastlora", "reference", "peer"}, op
    peers = {r["op"]: r["provider"] for r in rows if r["role"] == "peer"}
    assert set(peers.values()) == {"bitsandbytes", "peft", "transformers", "torch"}
    assert {peers[f"{op} full"] for op in ("lora_qkv", "dora_linear")} == {"peft"}
    assert (peers["linear_4bit full"], peers["frozen_linear full"]) == ("bitsandbytes", "torch")
    assert {r["shape"] for r in rows if r["op"] == "lora_qkv fwd"} == {"M32 128->128+32+32"}  # GQA: k, v = q / 4
    assert all(r["unit"] == "ms" and r["value"] > 0 for r in rows)
    assert all(r["dtype"] == ("bf16" if r["op"].startswith("frozen_linear") else "fp32") for r in rows)
    assert all("torch's bf16 GEMMs are slow" in r["extra"]["note"] for r in rows if r["op"].startswith("frozen"))
    this_run = json.loads(out.read_text())
    assert this_run["suite"] == "kernels" and this_run["rows"] == every_row
    from fastlora.bench import kernels

    table = kernels.format_rows(every_row).splitlines()
    header = table[len(ceilings)]
    assert table[0].startswith("ceiling fp32: GEMM ceiling") and "TFLOP/s" in header and "%copy" in header
    assert len(table) == len(ceilings) + 2 + len(rows) + 1  # ceilings, header + rule, one line per case, legend


def test_kernels_options_select_ops_dtypes_shape(tmp_path, capsys):
    assert _run(tmp_path, "--suite", "kernels", "--quick", "--ops", "dequantize_4bit", "--dtype", "bf16",
                "--shape", "192x128", "--tokens", "8", "--no-reference") == 0
    rows = [r for r in _check_results(tmp_path, "kernels") if r["unit"] == "ms"]
    assert {(r["op"], r["dtype"], r["shape"]) for r in rows} == {("dequantize_4bit", "bf16", "128x192")}
    assert "torch-reference" not in {r["provider"] for r in rows} and {r["role"] for r in rows} == {"fastlora", "peer"}


def test_plot_draws_speedup_png(kernels_run, capsys):
    tmp_path, _, _ = kernels_run
    assert main(["bench", "--plot", "--results", str(tmp_path / "res")]) == 0
    png = tmp_path / "res" / "speedup.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(png) in capsys.readouterr().out


def test_speedups_pair_fastlora_with_peer():
    base = {"suite": "kernels", "run_id": "1", "shape": "s", "dtype": "fp32", "device": "cpu", "unit": "ms"}
    rows = [{**base, "op": "a", "provider": "fastlora:cpp", "role": "fastlora", "value": 2.0},
            {**base, "op": "a", "provider": "torch-reference", "role": "reference", "value": 8.0},
            {**base, "op": "a", "provider": "peft", "role": "peer", "value": 5.0},
            {**base, "op": "b", "provider": "fastlora:cpp", "role": "fastlora", "value": 1.0}]
    (s,) = results.speedups(rows)
    assert (s["op"], s["fastlora"], s["peer"], s["speedup"]) == ("a", "fastlora:cpp", "peft", 2.5)


def test_train_suite_tiny_one_step(tmp_path, capsys):
    assert _run(tmp_path, "--suite", "train", "--quick") == 0
    rows = _check_results(tmp_path, "train")
    assert {(r["provider"], r["role"]) for r in rows} == {("peft+bnb", "peer"), ("fastlora", "fastlora"),
                                                           ("floor", "reference")}
    assert {r["unit"] for r in rows} == {"ms", "tokens/s", "bytes"}
    floor = next(r for r in rows if r["provider"] == "floor")
    assert floor["unit"] == "ms" and len(floor["extra"]["step_ms"]) == 1 and floor["value"] > 0
    times = {r["provider"]: r for r in rows if r["unit"] == "ms"}
    assert len(times["fastlora"]["extra"]["step_ms"]) == 1
    # same weights and batch, dropout 0: the same first loss
    assert times["fastlora"]["extra"]["initial_loss"] == pytest.approx(times["peft+bnb"]["extra"]["initial_loss"],
                                                                       rel=1e-5)
    assert times["fastlora"]["extra"]["fallback_calls"] == 0
    captured = capsys.readouterr()
    assert "speed PEFT/fastlora" in captured.out and "h64" in captured.out and "PEFT/floor" in captured.out
    # timed by pytest-benchmark (fastlora/bench/pytest_train.py) in a pytest process of its own
    assert "test_train_step[fp32-p0]" in captured.err and "Median" in captured.err
    # third-party noise (fastlora/_quiet.py) stays out of the suite's pytest process too
    assert "Warning" not in captured.err and "kernels-community" not in captured.err, captured.err
    # the train rows alone make the speed-up chart (test_plot_draws_speedup_png: the kernels rows)
    assert main(["bench", "--plot", "--results", str(tmp_path / "res")]) == 0
    assert (tmp_path / "res" / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_suite_emulating_a_cpu_without_bf16(tmp_path, capsys):
    """--emulate-no-bf16: torch's bf16 GEMMs on the slow path for both providers, so fastlora also runs the frozen
    bf16 lm_head on fp32 GEMMs (ops.frozen_linear)."""
    assert _run(tmp_path, "--suite", "train", "--quick", "--dtype", "bf16", "--emulate-no-bf16") == 0
    rows = _check_results(tmp_path, "train")
    fast = next(r for r in rows if r["provider"] == "fastlora" and r["unit"] == "ms")
    assert "1 frozen bf16 linear(s)" in fast["extra"]["patch_summary"] and fast["extra"]["fallback_calls"] == 0
    assert fast["extra"]["emulated_no_native_bf16"] is True
    assert "emulating a CPU without native bf16 GEMMs" in capsys.readouterr().err


def test_train_suite_failing_run_is_reported(tmp_path, capsys):
    assert _run(tmp_path, "--suite", "train", "--quick", "--backend", "nope") == 2
    err = capsys.readouterr().err
    assert "backend must be 'auto' or one of" in err and "ended with status" in err
    assert not (tmp_path / "res" / results.CSV_NAME).exists()  # nothing measured, nothing recorded


def test_compile_suite_quick(tmp_path):
    # a fresh process: this one runs under TRITON_INTERPRET=1 (tests/conftest.py), whose kernels cannot be
    # compiled for a GPU target (fastlora/compile_check.py)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "fastlora", "bench", "--suite", "compile", "--quick", "--results",
                           str(tmp_path / "res")], capture_output=True, text=True, timeout=240, env=env,
                          cwd=pathlib.Path(__file__).resolve().parent.parent)
    status, out = proc.returncode, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    rows = _check_results(tmp_path, "compile")
    assert status == (1 if any(r["extra"]["status"] == "failed" for r in rows) else 0)
    assert {r["device"] for r in rows} == {"sm_80"}
    assert {r["provider"] for r in rows} <= {"triton"}
    ok = [r for r in rows if r["extra"]["status"] == "ok"]
    assert ok and all(r["value"] > 0 for r in ok)
    assert "regs" in out


OPTIONS = {  # options each suite must offer (beside the common ones)
    "kernels": ("--ops", "--dtype", "--tokens", "--shape", "--quick", "--seconds", "--no-reference", "--device"),
    "train": ("--preset", "--dtype", "--steps", "--warmup", "--dropout", "--backend", "--quick"),
    "compile": ("--arch", "--no-triton", "--no-cuda", "--quick"),
    "memory": ("--model", "--seq", "--batch", "--rank", "--alpha", "--lora-dropout", "--checkpointing"),
}


@pytest.mark.parametrize("suite", [None, *SUITES])
def test_suite_help_explains_every_option(suite, capsys):
    parser = build_parser(suite)
    offered = {s for action in parser._actions for s in action.option_strings}
    assert {*OPTIONS.get(suite, ()), "--suite", "--output", "--results", "--plot"} <= offered
    for action in parser._actions:
        if "-h" in action.option_strings:
            continue
        assert action.help and action.help.strip(), f"{suite}: {action.option_strings} has no help text"
    with pytest.raises(SystemExit) as exc:  # the help also formats: a stray % in a help string raises here
        main(["bench", *(["--suite", suite] if suite else []), "--help"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("usage: python -m fastlora bench")


@pytest.mark.parametrize("suite", ["kernels", "train"])
@pytest.mark.parametrize("absent", ["pytest_benchmark", "pytest"])
def test_pytest_suites_without_pytest_benchmark(suite, absent, tmp_path, monkeypatch, capsys):
    """Installed with the demo extra before it had pytest-benchmark, these suites failed with pytest's
    "unrecognized arguments: --benchmark-json" (or a message blaming a backend): now one line naming the package and
    the install command, exit 2, nothing run."""
    import importlib.util

    from fastlora.bench import pytest_run

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == absent else find_spec(name, *a))
    monkeypatch.setattr(pytest_run, "run", lambda *a, **k: pytest.fail("the suite ran without pytest-benchmark"))
    assert _run(tmp_path, "--suite", suite, "--quick") == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1, err
    package = absent.replace("_", "-")
    assert f"the {suite} suite cannot run: {package} is not installed" in err
    assert 'pip install "fastlora[bench]"' in err and "pip install pytest pytest-benchmark" in err
    assert not (tmp_path / "res").exists()


@pytest.mark.parametrize("args", [
    ["--suite", "kernels", "--shape", "100x64"],
    ["--suite", "kernels", "--shape", "wide"],
    ["--suite", "kernels", "--tokens", "0"],
    ["--suite", "kernels", "--ops", "matmul"],
    ["--suite", "train", "--preset", "huge"],
    ["--suite", "train", "--dropout", "1.5"],
    ["--suite", "train", "--steps", "-1"],
])
def test_bad_options_exit_2(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", *args])
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_bad_input_messages(tmp_path, capsys):
    assert main(["bench", "--suite", "kernel"]) == 2
    err = capsys.readouterr().err
    assert "unknown suite 'kernel'" in err and "kernels" in err and "compile" in err
    assert main(["bench"]) == 2
    assert "--suite" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["bench", "--suite", "kernels", "--quick", "--results", str(blocker / "res")]) == 2
    assert "--results" in capsys.readouterr().err
    assert main(["bench", "--plot", "--results", str(tmp_path / "empty")]) == 2
    assert "no results" in capsys.readouterr().err
    if not __import__("torch").cuda.is_available():
        assert main(["bench", "--suite", "kernels", "--device", "cuda", "--results", str(tmp_path / "r")]) == 2
        assert "no CUDA GPU" in capsys.readouterr().err


def test_plot_memory_chart(tmp_path, capsys):
    """The memory chart from memory-suite rows (as the dispatcher converts them) appended to a folder."""
    from fastlora.bench.memory import to_rows

    providers = {"peft+bnb": {"peak": 10 * 2**30, "decoder_peak": 6 * 2**30, "breakdown": {}},
                 "fastlora": {"peak": 7 * 2**30, "decoder_peak": 4 * 2**30, "breakdown": {}}}
    memory_rows = [{"model": "llama-3-8b", "seq": seq, "batch": 1, "rank": 16, "checkpointing": False,
                    "providers": providers} for seq in (2048, 8192)]
    rows = results.stamp(to_rows(memory_rows), "memory")
    assert len(rows) == 8 and {r["metric"] for r in rows} == {"step peak", "decoder peak"}
    results.append(tmp_path, rows)
    assert main(["bench", "--plot", "--results", str(tmp_path)]) == 0
    assert "memory.png" in capsys.readouterr().out
    assert (tmp_path / "memory.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "speedup.png").exists()  # no fastlora vs peer times in these results


def test_plot_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert main(["bench", "--plot", "--results", str(tmp_path)]) == 2
    assert "matplotlib" in capsys.readouterr().err


def test_timer_counts_runs_and_uses_setup():
    from fastlora.bench.timing import measure

    calls = {"setup": 0, "fn": []}

    def setup():
        calls["setup"] += 1
        return calls["setup"]

    t = measure(lambda arg: calls["fn"].append(arg), setup=setup, warmup=2, min_runs=4, max_runs=4, budget_s=0.0)
    assert t.runs == 4 and calls["setup"] == 6 and calls["fn"] == [1, 2, 3, 4, 5, 6]  # each run gets its own setup
    assert 0 <= t.min_ms <= t.median_ms
    slow = measure(lambda: __import__("time").sleep(0.02), warmup=1, min_runs=3, max_runs=5, budget_s=0.01)
    assert slow.runs == 1 and slow.median_ms >= 20  # a warm-up that alone spends the budget: one timed run
    with pytest.raises(ValueError, match="min_runs"):
        measure(lambda: None, min_runs=0)


@pytest.mark.parametrize(("device", "extra", "want"), [
    ("cuda", [], (4096, 4096, 14336)),  # a GPU measures launch overhead at the CPU's sizes
    ("cpu", [], (256, 1024, 2816)),
    ("cuda", ["--tokens", "512", "--shape", "1024x2048"], (512, 1024, 2048)),
])
def test_kernels_suite_default_sizes_follow_the_device(device, extra, want, tmp_path, monkeypatch):
    """Which M, K, N the kernels suite hands its pytest run: training sizes on a GPU (a stand-in here)."""
    import torch

    from fastlora.bench import kernels, pytest_run

    seen = {}

    def fake_run(module, env, progress):
        seen["cfg"] = kernels.SuiteConfig.from_json(env[kernels.CONFIG_ENV])
        return 1, None, None  # "failed before writing its report": the suite stops there

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(pytest_run, "run", fake_run)
    assert _run(tmp_path, "--suite", "kernels", "--device", device, *extra) == 1
    cfg = seen["cfg"]
    assert (cfg.tokens, cfg.k, cfg.n) == want and cfg.device == device
