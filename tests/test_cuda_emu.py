"""The CPU emulation of CUDA that tests/test_cuda_lora.py and tests/test_cuda_neftune.py run the kernel sources
on (tests/cuda_emu): its fibers, barriers, shuffles and deadlock check, built with each way it switches fibers
(the x86-64 stack switch and ucontext), on small kernels of tests/cuda_emu/emu_selftest.cpp."""

from __future__ import annotations

import ctypes
import platform
import subprocess
import sys
from pathlib import Path

import cuda_emu_build
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
THREADS = 128  # emu_selftest.cpp's kThreads

SWITCHES = {"stack-switch": (), "ucontext": ("-DFASTLORA_EMU_UCONTEXT",)}


@pytest.fixture(scope="module", params=list(SWITCHES))
def selftest_lib(request, tmp_path_factory) -> Path:
    if request.param == "stack-switch" and platform.machine() != "x86_64":
        pytest.skip("the stack switch is x86-64 only (elsewhere the emulation uses ucontext)")
    # -fno-gnu-unique: the emulation's block state is a static local of an inline function, which g++ makes one
    # object per process across libraries; the two builds lay it out differently and are loaded side by side.
    return cuda_emu_build.build(REPO / "tests" / "cuda_emu" / "emu_selftest.cpp",
                                tmp_path_factory.mktemp("cuda_emu_selftest") / f"libselftest_{request.param}.so",
                                ("-fno-gnu-unique", *SWITCHES[request.param]))


def ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def test_block_barriers_keep_each_fiber_s_stack_and_registers(selftest_lib):
    lib = ctypes.CDLL(str(selftest_lib))
    blocks = 5
    values = torch.randint(-(1 << 20), 1 << 20, (blocks, THREADS), dtype=torch.int64)
    out = torch.zeros(blocks, dtype=torch.int64)
    checks = torch.zeros(blocks, THREADS, dtype=torch.int64)
    lib.fastlora_emu_selftest_block_sum(ptr(values), ptr(out), ptr(checks), ctypes.c_int(blocks))
    assert torch.equal(out, values.sum(1))
    acc = values.clone()
    for _ in range(THREADS.bit_length() - 1):  # one update per reduction level
        acc = acc * 3 + 1
    assert torch.equal(checks, acc)


@pytest.mark.parametrize("threads", [32, 96])
def test_warp_shuffles_exchange_lanes(selftest_lib, threads):
    lib = ctypes.CDLL(str(selftest_lib))
    blocks = 3
    values = torch.randint(-1000, 1000, (blocks * threads,)).float()  # integers: sums exact in any order
    out = torch.full_like(values, float("nan"))
    lib.fastlora_emu_selftest_warp_sum(ptr(values), ptr(out), ctypes.c_int(blocks), ctypes.c_int(threads))
    warps = values.view(-1, 32)
    assert torch.equal(out.view(-1, 32), warps.sum(1, keepdim=True).expand(-1, 32))


def test_a_barrier_that_cannot_complete_aborts(selftest_lib):
    code = ("import ctypes, sys; lib = ctypes.CDLL(sys.argv[1]); buf = (ctypes.c_int * 64)(); "
            "lib.fastlora_emu_selftest_early_exit(buf); print('returned')")
    proc = subprocess.run([sys.executable, "-c", code, str(selftest_lib)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "returned" not in proc.stdout
    assert "deadlock: a barrier or warp-collective operation can never complete" in proc.stderr
