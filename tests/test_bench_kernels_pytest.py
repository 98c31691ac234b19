"""The kernels suite runs on pytest-benchmark (fastlora/bench/pytest_kernels.py): the plan of test ids matches what
the builders build, pytest-benchmark's JSON report becomes the suite's rows, and the CLI's run goes through it."""

from __future__ import annotations

import pytest
import torch

from fastlora.bench import kernels, roofline

pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")
pytest.importorskip("transformers")

CFG = kernels.SuiteConfig(list(kernels.OPS), ["fp32", "bf16"], 8, 128, 192, seconds=0.0, max_runs=1)


def test_config_round_trips_through_json():
    assert kernels.SuiteConfig.from_json(CFG.to_json()) == CFG


@pytest.mark.parametrize("op", kernels.OPS)
def test_plan_is_what_the_builders_build(op):
    """Every planned test id has its callable and every callable a test id (a mismatch would skip or drop cases)."""
    dtype = kernels.dtypes_of(op, CFG)[0]  # fp32, or the op's own dtype (frozen_linear: bf16)
    planned = {(c.pass_, c.provider) for c in kernels.plan(CFG) if c.op == op and c.dtype == dtype}
    built, missing = kernels.build(op, dtype, CFG)
    assert missing is None
    assert planned == set(built)
    roles = {built[key][0].role for key in built}
    assert roles == {"fastlora", "reference", "peer"}
    assert {name for (_, name), (p, _, _) in built.items() if p.role == "peer"} == {kernels.PEER_PROVIDERS[op]}
    no_ref = kernels.SuiteConfig(**{**CFG.__dict__, "reference": False})
    assert all(c.provider != "torch-reference" for c in kernels.plan(no_ref))


def test_op_tables_cover_every_op():
    assert set(kernels.CASES) == set(kernels.PEER_PROVIDERS) == set(kernels.OPS)


def test_frozen_linear_runs_in_bf16_on_the_cpu_only():
    """frozen_linear is a bf16 CPU op: planned in bf16 whatever the dtypes (with the bf16 ceilings), with one
    backend-less fastlora provider, and left out on a GPU."""
    cfg = kernels.SuiteConfig(["lora_linear", "frozen_linear"], ["fp32"], 8, 128, 192)
    frozen = [c for c in kernels.plan(cfg) if c.op == "frozen_linear"]
    assert {c.dtype for c in frozen} == {"bf16"} and {c.pass_ for c in frozen} == set(kernels.PASSES)
    assert {c.provider for c in frozen} == {"fastlora", "torch-reference", "torch"}
    assert kernels.ceiling_dtypes(cfg) == ["fp32", "bf16"]
    on_gpu = kernels.SuiteConfig(**{**cfg.__dict__, "device": "cuda"})
    assert kernels.ops_of(on_gpu) == ["lora_linear"] and kernels.ceiling_dtypes(on_gpu) == ["fp32"]
    assert "torch's bf16 GEMMs are slow" in kernels.op_note("frozen_linear")


def _bench(info: dict, median_s: float, rounds: int = 5) -> dict:
    return {"extra_info": info, "stats": {"median": median_s, "min": median_s * 0.9, "rounds": rounds}}


def test_rows_from_a_pytest_benchmark_report():
    cfg = kernels.SuiteConfig(["lora_linear", "neftune_embedding"], ["fp32"], 8, 128, 192)
    report = {"benchmarks": [
        _bench({"ceiling": "gemm", "dtype": "fp32"}, 0.02),
        _bench({"ceiling": "copy", "dtype": "fp32"}, 0.004),
        _bench({"op": "lora_linear", "pass": "bwd", "dtype": "fp32", "provider": "fastlora:cpp", "role": "fastlora",
                "backend": "cpp"}, 0.001, rounds=7),
        _bench({"op": "neftune_embedding", "pass": "fwd", "dtype": "fp32", "provider": "transformers",
                "role": "peer", "backend": None}, 0.0005),
    ]}
    rows = kernels.rows_from_benchmarks(report, cfg)
    ceilings = roofline.ceilings_from("cpu", torch.float32, "fp32", 20.0, 4.0)
    by = {(r["op"], r["metric"]): r for r in rows}
    assert by[("GEMM ceiling", "TFLOP/s")]["value"] == pytest.approx(ceilings.gemm_tflops)
    assert by[("copy ceiling", "GB/s")]["value"] == pytest.approx(ceilings.copy_gbs)
    t = by[("lora_linear bwd", "median time")]
    assert t["value"] == pytest.approx(1.0) and t["unit"] == "ms" and t["shape"] == "M8 128->192"
    assert t["extra"]["runs"] == 7 and t["extra"]["min_ms"] == pytest.approx(0.9) and t["extra"]["backend"] == "cpp"
    work = roofline.work("lora_linear", "bwd", 8, 128, 192, torch.float32)
    assert by[("lora_linear bwd", "achieved TFLOP/s")]["value"] == pytest.approx(work.flops / 1e-3 / 1e12)
    assert by[("lora_linear bwd", "achieved GB/s")]["value"] == pytest.approx(work.bytes / 1e-3 / 1e9)
    assert ("neftune_embedding", "achieved TFLOP/s") not in by  # no flops: GB/s only
    assert by[("neftune_embedding", "median time")]["role"] == "peer"
    assert len(rows) == 2 + 3 + 2


def test_cli_runs_the_suite_on_pytest_benchmark(tmp_path, capsys):
    from fastlora.__main__ import main

    assert main(["bench", "--suite", "kernels", "--quick", "--ops", "neftune_embedding", "--tokens", "8",
                 "--no-reference", "--results", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "test_case[neftune_embedding-fwd-fp32-fastlora:cpp]" in err  # pytest's own lines, one per case
    assert "benchmark" in err.lower() and "Median" in err  # pytest-benchmark's table
