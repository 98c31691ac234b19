"""The GPU benchmark scripts' plumbing, run on the CPU where they allow it (their numbers need a GPU:
bench/gpu_check.sh): the train-step comparison, the per-kernel breakdown of bench_lora_gpu.py and the
diagnosis of bench/gpu_probe_reciprocal.py."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

TINY = ["--hidden", "128", "--intermediate", "256", "--layers", "2", "--heads", "4", "--kv-heads", "2",
        "--vocab", "256", "--batch", "2", "--seq", "32", "--warmup", "1", "--steps", "2"]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_train_step_on_the_cpu(capsys, checkpointing):
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    import bench_train_gpu

    assert bench_train_gpu.main(["--device", "cpu", *TINY] + (["--checkpointing"] if checkpointing else [])) == 0
    out = capsys.readouterr().out
    assert f"checkpointing {'on' if checkpointing else 'off'}" in out
    rows = dict(re.findall(r"^(peft\+bnb|fastlora|floor) +([\d.]+) ", out, flags=re.M))
    assert set(rows) == {"peft+bnb", "fastlora", "floor"} and all(float(v) > 0 for v in rows.values())
    assert "none left unpatched" in out and "fallback calls" not in out
    losses = [float(v) for v in re.findall(r"^(?:peft\+bnb|fastlora) .* ([\d.]+)$", out, flags=re.M)]
    assert len(losses) == 2 and abs(losses[0] - losses[1]) < 0.05  # same weights; the dropout masks differ


def test_train_step_asks_for_a_gpu(capsys):
    import bench_train_gpu

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    with pytest.raises(SystemExit) as info:
        bench_train_gpu.main(["--device", "cuda"])
    assert info.value.code == 2 and "--device cuda: no CUDA GPU" in capsys.readouterr().err


def test_kernel_breakdown_on_the_cpu(monkeypatch):
    import bench_lora_gpu

    monkeypatch.setattr(bench_lora_gpu, "DEVICE", "cpu")
    a = torch.randn(128, 128)
    lines = bench_lora_gpu.kernel_breakdown(lambda: torch.mm(a, a).relu_(), iters=3, top=3)
    host = next(i for i, line in enumerate(lines) if line.startswith("  host:"))
    kernels, host_lines = lines[:host], lines[host:]
    assert kernels[0].split()[:3] == ["us/call", "share", "calls"] and len(kernels) <= 4
    names = [line.split()[-1] for line in kernels[1:]]
    assert "aten::mm" in names
    shares = [float(line.split()[1].rstrip("%")) for line in kernels[1:]]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 100.5
    # the host side: issue time, then the top host operations by self time, largest first
    assert float(host_lines[0].split()[1]) > 0 and "per call to issue" in host_lines[0]
    host_us = [float(line.split()[0]) for line in host_lines[1:]]
    assert host_us == sorted(host_us, reverse=True) and 1 <= len(host_us) <= 8
    assert any("aten::mm" in line for line in host_lines[1:])


def test_reciprocal_diagnosis_shows_each_differing_code(capsys):
    functional = pytest.importorskip("bitsandbytes.functional")
    import gpu_probe_reciprocal

    from fastlora import reference

    # bitsandbytes on the CPU against the CUDA rule with a reciprocal one fp32 step low: a few codes move
    low = types.SimpleNamespace(approx_reciprocal=lambda a: torch.nextafter(1 / a, torch.zeros_like(a)))
    gpu_probe_reciprocal.diagnose(functional, reference, low, 1 << 22, 1, device="cpu")
    out = capsys.readouterr().out
    differ = int(re.search(r"(\d+) codes differ; absmax equal: True", out).group(1))
    shown = re.findall(r"\(([+-]\d+) fp32 steps; exact product (above|not above)\) ours=(\d+) bitsandbytes=(\d+)", out)
    assert differ > 0 and len(shown) == min(differ, 20)
    assert all(abs(int(steps)) <= 2 and ours != theirs for steps, _, ours, theirs in shown)
