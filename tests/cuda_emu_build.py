"""Building a C++ file against the CPU emulation of CUDA (tests/cuda_emu) into a shared library, for the tests that
run kernel sources on it through ctypes (tests/test_cuda_lora.py, test_cuda_neftune.py, test_cuda_emu.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def build(source: Path, out: Path, extra_flags: tuple[str, ...] = ()) -> Path:
    """Compile ``source`` (with csrc/cuda on the include path, so it can include a .cu file) into ``out``; skips
    the test without g++. FASTLORA_EMU_CFLAGS adds flags, e.g. "-fsanitize=address" (run with
    LD_PRELOAD=$(g++ -print-file-name=libasan.so))."""
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ not found (the CUDA emulation builds kernel sources as C++)")
    cmd = [cxx, *os.environ.get("FASTLORA_EMU_CFLAGS", "").split(), "-std=c++17", "-O1", "-ffp-contract=off",
           "-fPIC", "-shared", "-DFASTLORA_CUDA_EMU", "-Wall", "-Wno-unknown-pragmas", "-Werror", *extra_flags,
           "-I", str(REPO / "tests" / "cuda_emu" / "include"), "-I", str(REPO / "csrc" / "include"),
           "-I", str(REPO / "csrc" / "cuda"), str(source), "-o", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out
