"""The small-M / large-M crossover of the kernels suite (fastlora/bench/crossover.py): the rule, the sweep's
plumbing (on the CPU, with two CPU backends standing in for the two GPU paths), what --save-tuned writes and
that the dispatch then reads it, and the CLI's refusals on a machine without the CUDA backend."""

from __future__ import annotations

import json

import pytest

from fastlora import tuning
from fastlora.__main__ import main
from fastlora.bench import crossover


@pytest.mark.parametrize("times,expected", [
    ({1: (1.0, 2.0), 2: (1.0, 2.0), 4: (3.0, 2.0), 8: (1.0, 2.0)}, 2),  # first loss ends it, a later win does not count
    ({1: (1.0, 1.0), 4: (1.0, 1.5), 16: (0.5, 9.0)}, 16),  # a tie goes to the small-M path
    ({1: (2.0, 1.0), 2: (0.1, 1.0)}, 0),
    ({8: (1.0, 2.0), 1: (1.0, 2.0), 4: (5.0, 2.0)}, 1),  # in order of M, not of the dict
])
def test_crossover_rule(times, expected):
    assert crossover.crossover(times) == expected


def test_sweep_rows_and_crossovers():
    lines = []
    rows, found = crossover.sweep([(64, 128), (128, 64)], "fp32", "cpu", budget_s=0.0, max_runs=1,
                                  paths=(("small", "cpp"), ("large", "reference")), rows=(1, 3),
                                  progress=lines.append)
    assert set(found) == {"64x128", "128x64"} and all(v in (0, 1, 3) for v in found.values())
    timed = [r for r in rows if r["unit"] == "ms"]
    assert len(timed) == 2 * 2 * 2 and all(r["value"] > 0 for r in timed)
    assert {(r["provider"], r["shape"]) for r in timed} == {(p, f"M{m} {s}") for p in ("small", "large")
                                                          for m in (1, 3) for s in ("64->128", "128->64")}
    summary = {r["shape"]: r for r in rows if r["unit"] == "rows"}
    for shape, key in (("64->128", "64x128"), ("128->64", "128x64")):
        r = summary[shape]
        assert r["value"] == found[key]
        times = {int(m): tuple(v) for m, v in r["extra"]["times"].items()}
        assert crossover.crossover(times) == found[key]  # the saved times give the reported crossover
    assert any("at least as fast up to" in line for line in lines)


def test_save_merges_with_what_was_saved_and_dispatch_reads_it(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTLORA_TUNED_DIR", str(tmp_path))
    tuning.clear_cache()
    path = crossover.save({"4096x4096": 12, "4096x14336": 8}, "Fake GPU", (9, 0), ["bf16"])
    assert path == str(tmp_path / "Fake-GPU-sm90.json")
    data = json.loads((tmp_path / "Fake-GPU-sm90.json").read_text())
    assert data["device"] == "Fake GPU" and data["capability"] == [9, 0]
    assert data[tuning.CUDA_ROWS_KEY] == {"4096x4096": 12, "4096x14336": 8, "default": 8}
    assert data["measured"]["this_run"] == {"4096x4096": 12, "4096x14336": 8} and data["measured"]["git_commit"]
    crossover.save({"4096x14336": 16, "14336x4096": 4}, "Fake GPU", (9, 0), ["bf16"])  # a later run, other shapes
    table = tuning.load("Fake-GPU-sm90")[tuning.CUDA_ROWS_KEY]
    assert table == {"4096x4096": 12, "4096x14336": 16, "14336x4096": 4, "default": 4}
    assert tuning.cuda_max_rows("Fake-GPU-sm90", 4096, 14336, 16) == 16
    assert tuning.cuda_max_rows("Fake-GPU-sm90", 1024, 1024, 16) == 4
    tuning.clear_cache()


@pytest.mark.parametrize("args,words", [
    (["--crossover"], "--crossover needs --device cuda"),
    (["--crossover", "--device", "cuda"], "--crossover needs --device cuda"),
    (["--save-tuned"], "--save-tuned saves what --crossover measures"),
])
def test_cli_refusals(args, words, tmp_path, capsys, monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    if args[-1] == "cuda":  # past the suite's own "no CUDA GPU" check: the CUDA backend is what is missing
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert main(["bench", "--suite", "kernels", *args, "--results", str(tmp_path / "res")]) == 2
    assert words in capsys.readouterr().err


def test_cli_crossover_and_save_on_a_stand_in_gpu(tmp_path, capsys, monkeypatch):
    """The CLI path past the GPU check, with the GPU and the sweep stood in for: every default shape swept per
    dtype, the smallest crossover of the dtypes kept, the rows recorded and the tuned default saved."""
    import torch

    from fastlora import backends

    monkeypatch.setenv("FASTLORA_TUNED_DIR", str(tmp_path / "tuned"))
    tuning.clear_cache()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Stand-in GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(backends, "available", lambda device_type="cpu": {"reference": True, "cpp": False,
                                                                          "cuda": True, "triton": True})
    swept = []

    def fake_sweep(shapes, dtype_name, device, **kw):
        swept.append((tuple(shapes), dtype_name, device))
        found = {f"{k}x{n}": (8 if dtype_name == "bf16" else 12) for k, n in shapes}
        rows = [{"op": "lora_linear fwd crossover", "provider": "fastlora", "role": "fastlora", "shape": s,
                 "dtype": dtype_name, "device": device, "metric": "small-M path up to", "value": float(v),
                 "unit": "rows", "extra": {}} for s, v in found.items()]
        return rows, found

    monkeypatch.setattr(crossover, "sweep", fake_sweep)
    assert main(["bench", "--suite", "kernels", "--device", "cuda", "--crossover", "--save-tuned", "--dtype", "bf16",
                 "fp32", "--results", str(tmp_path / "res")]) == 0
    assert swept == [(crossover.DEFAULT_SHAPES, "bf16", "cuda"), (crossover.DEFAULT_SHAPES, "fp32", "cuda")]
    out = capsys.readouterr().out
    assert "4096x14336: CUDA small-M kernel at least as fast up to M=8 (bf16, fp32)" in out
    saved = tuning.load("Stand-in-GPU-sm90")[tuning.CUDA_ROWS_KEY]
    assert saved == {**{f"{k}x{n}": 8 for k, n in crossover.DEFAULT_SHAPES}, "default": 8}
    assert "tuned default saved to" in out
    tuning.clear_cache()
