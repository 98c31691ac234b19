"""``python -m fastlora compile-check``: ahead-of-time GPU compilation of every kernel, no GPU needed.

The full check runs as the README's command (``python -m fastlora compile-check``) with TRITON_INTERPRET=1 in its
environment, as the test suite and a developer's shell have it: under the interpreter every ``@triton.jit``
function imported (Triton's own ``tl.cdiv`` among them, through ``import torch``) is a Python one that cannot be
compiled, so the check must compile the Triton kernels in a process of its own (with a warm Triton cache the
mistake went unnoticed: nothing was compiled). It is skipped when Triton or a ptxas is missing; without nvcc the
CUDA rows are reported as skipped and only the Triton kernels are checked.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fastlora import compile_check

ARCHS = ["sm_80", "sm_90"]
REPO = Path(__file__).resolve().parent.parent


def _triton_ptxas() -> str | None:
    spec = importlib.util.find_spec("triton")
    if spec is None or not spec.submodule_search_locations:
        return None
    bundled = Path(spec.submodule_search_locations[0]) / "backends" / "nvidia" / "bin" / "ptxas"
    return str(bundled) if bundled.exists() else shutil.which("ptxas")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed")
    if _triton_ptxas() is None:
        pytest.skip("no ptxas (neither Triton's bundled one nor one on the PATH)")
    out = tmp_path_factory.mktemp("compile_check") / "report.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "fastlora", "compile-check", "--arch", ",".join(ARCHS), "--json", str(out)],
        env=env, cwd=out.parent, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.exists(), f"no JSON report (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    data = json.loads(out.read_text())
    data["returncode"] = proc.returncode
    data["stdout"] = proc.stdout
    return data


def test_everything_compiles_without_spills(report):
    assert "TRITON_INTERPRET was set: the Triton kernels were compiled in a fresh process without it" in report["notes"]
    failed = [r for r in report["rows"] if r["status"] == "failed"]
    assert not failed, "\n".join(f"{r['kernel']} {r['config']} {r['arch']}: {r['reason']}" for r in failed)
    assert report["ok"] and report["returncode"] == 0, report["stdout"][-4000:]
    for r in report["rows"]:
        if r["status"] == "ok" and r["kernel"] != "<none>":
            assert r["registers"] and r["registers"] > 0, r
            assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r


def test_dequant_kernels_for_every_arch(report):
    # (The kernel module is not imported here: this process must not define Triton kernels that a
    # later interpreter-mode test would then find cached.)
    for arch in ARCHS:
        rows = [r for r in report["rows"] if r["backend"] == "triton" and r["arch"] == arch]
        dequant = [r for r in rows if r["kernel"] == "dequantize_4bit" and r["status"] == "ok"]
        absmax = [r for r in rows if r["kernel"] == "dequantize_absmax" and r["status"] == "ok"]
        for blocksize in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            for dtype in ("fp32", "bf16", "fp16"):
                label = f"bs{blocksize} {dtype} "
                assert any(r["config"].startswith(label) for r in dequant), f"{arch}: no {label!r} config"
        assert len(absmax) == 1, f"{arch}: dequantize_absmax missing"
        # Two roundings: the PTX of the nested-absmax kernel holds no floating-point FMA.
        assert "no fp fma" in absmax[0]["checks"], absmax[0]
        assert all(r["tensor_cores"] == "no" for r in dequant + absmax)


def test_cuda_sources_compiled_or_skipped_with_reason(report):
    sources = sorted((REPO / "csrc" / "cuda").glob("*.cu"))
    cuda_rows = [r for r in report["rows"] if r["backend"] == "cuda"]
    if not sources:
        assert not cuda_rows
        return
    if shutil.which("nvcc") is None:
        assert cuda_rows and all(r["status"] == "skipped" and r["reason"] for r in cuda_rows)
        pytest.skip("nvcc not found: CUDA sources reported as skipped")
    for arch in ARCHS:
        for source in sources:
            rows = [r for r in cuda_rows if r["arch"] == arch and r["config"] == source.name]
            assert rows and all(r["status"] == "ok" for r in rows), (arch, source.name, rows)


# --------------------------------------------------------------------------------------------------
# Pieces that need no compiler
# --------------------------------------------------------------------------------------------------

_PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'
ptxas info    : Function properties for _Z3fooPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 24 registers, used 1 barriers, 256 bytes smem, 384 bytes cmem[0]
ptxas info    : Compiling entry function '_Z3barPf' for 'sm_90'
ptxas info    : Function properties for _Z3barPf
    16 bytes stack frame, 12 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 255 registers, used 0 barriers
"""


def test_ptxas_log_parsing_and_spill_failure():
    entries = compile_check._parse_ptxas(_PTXAS_LOG)
    assert entries["_Z3fooPf"] == {"smem": 256, "stack": 0, "spill_stores": 0, "spill_loads": 0, "registers": 24}
    ok = compile_check.Row("cuda", "foo", "x.cu", "sm_90")
    compile_check._fill_resources(ok, entries["_Z3fooPf"], extra_shared=1024)
    assert ok.status == "ok" and ok.registers == 24 and ok.shared == 1280
    spilled = compile_check.Row("cuda", "bar", "x.cu", "sm_90")
    compile_check._fill_resources(spilled, entries["_Z3barPf"])
    assert spilled.status == "failed" and "spills" in spilled.reason


def test_tensor_core_detection():
    assert compile_check._tensor_cores("wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16") == "wgmma"
    assert compile_check._tensor_cores("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32") == "mma"
    assert compile_check._tensor_cores("fma.rn.f32 %r1, %r2, %r3, %r4;") == "no"


def test_cli_arguments(capsys):
    with pytest.raises(SystemExit) as exc:
        compile_check.main(["--help"])
    assert exc.value.code == 0 and "--arch" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        compile_check.main(["--arch", "volta"])
    assert exc.value.code == 2
    assert compile_check._parse_arch("sm_90a") == (90, "sm_90a")
    assert compile_check._parse_arch("80") == (80, "sm_80")


def test_cuda_rows_skipped_without_nvcc(monkeypatch):
    if not sorted((REPO / "csrc" / "cuda").glob("*.cu")):
        pytest.skip("no CUDA sources in this tree")
    monkeypatch.setattr(compile_check, "_find_nvcc", lambda: None)
    rows, notes = compile_check.run_checks([(80, "sm_80")], triton=False)
    assert rows and all(r.status == "skipped" and r.reason == "nvcc not found" for r in rows)
    assert any("nvcc not found" in n for n in notes)


def test_every_triton_kernel_states_its_fp_fusion():
    """Triton 3.10 turns its default mul + add contraction off: every launcher (and so every compile spec, which
    mirrors the launch options) says which it wants, so that an upgrade changes no kernel's rounding or speed."""
    from fastlora.kernels import all_compile_specs

    unstated = [f"{s.kernel} {s.config}" for s in all_compile_specs()
                if not isinstance(s.options.get("enable_fp_fusion"), bool)]
    assert not unstated, unstated
