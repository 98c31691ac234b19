"""The CUDA NEFTune embedding kernel (csrc/cuda/neftune_embedding.cu, fastlora::neftune_embedding on CUDA
tensors) against the contract of tests/neftune_contract.py, bit for bit.

Three groups, each skipped with its reason where it cannot run:
* GPU: the CUDA op itself (needs a CUDA GPU, fastlora._C built with FASTLORA_BUILD_CUDA=1 and the op's schema);
* emulation: the same kernel source compiled as C++ against tests/cuda_emu (threads as fibers), so that the
  kernel logic (vector and scalar paths, Philox indexing, roundings, masking of bad ids) is checked on machines
  without a GPU (needs g++);
* compile check: neftune_embedding.cu through nvcc for sm_80 / sm_90, no spills, no FP FMA (needs nvcc).
"""

from __future__ import annotations

import ctypes
import re
import subprocess
from pathlib import Path

import cuda_emu_build
import pytest
import torch
from neftune_contract import assert_bitwise, contract, make_inputs

import fastlora.ops  # noqa: F401  (defines the fastlora ops where they exist)
from fastlora import backends, compile_check
from fastlora.kernels import FP_FMA_PTX

REPO = Path(__file__).resolve().parent.parent
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # fastlora::gpu::OutDtype
SHAPES = [(1, 7, 64), (5, 11, 37), (9, 13, 48), (4, 9, 516), (3, 6, 4096), (2, 5, 4099), (33, 40, 20), (6, 8, 12),
          (7, 5, 3)]  # d = 3: one Philox block (8 elements) spans rows


def _cuda_op():
    if not (torch.cuda.is_available() and backends.available("cuda")["cuda"]):
        return None, "needs a CUDA GPU and fastlora._C built with its CUDA kernels (FASTLORA_BUILD_CUDA=1)"
    try:
        return torch.ops.fastlora.neftune_embedding, ""
    except (AttributeError, RuntimeError):
        return None, "fastlora::neftune_embedding is not defined in this tree (its schema comes with the op layer)"


@pytest.fixture(scope="module")
def cuda_op():
    op, reason = _cuda_op()
    if op is None:
        pytest.skip(reason)
    return op


def cuda_seed(value: int) -> torch.Tensor:
    """The op's seed argument as the fused paths pass it: an int64 0-dim tensor on the GPU."""
    return torch.tensor(value, dtype=torch.int64, device="cuda")


# --------------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("T,V,d", SHAPES)
def test_cuda_matches_contract(cuda_op, dtype, T, V, d):
    ids, weight, mag = make_inputs(T, V, d, dtype, gen_seed=T * 1000 + d, zero_rows=(0,) if T > 1 else ())
    for seed in (0, 1, 0x1234_5678_9ABC_DEF0, 2**63 - 1):
        out = cuda_op(ids.cuda(), weight.cuda(), mag.cuda(), cuda_seed(seed))
        assert out.is_cuda
        assert_bitwise(out, contract(ids, weight, mag, seed))


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_cuda_misaligned_and_large(cuda_op, dtype):
    # A weight 2 elements into its storage: contiguous but not 16-byte aligned (the scalar kernel).
    ids, weight, mag = make_inputs(7, 10, 256, dtype, gen_seed=7, zero_rows=(2,))
    buf = torch.empty(weight.numel() + 2, dtype=dtype, device="cuda")
    w = buf[2:].view(weight.shape)
    w.copy_(weight)
    assert_bitwise(cuda_op(ids.cuda(), w, mag.cuda(), cuda_seed(99)), contract(ids, weight, mag, 99))
    # many tokens (element indices past 2^21)
    ids, weight, mag = make_inputs(2048, 300, 1024, dtype, gen_seed=8)
    out = cuda_op(ids.cuda(), weight.cuda(), mag.cuda(), cuda_seed(2**63 - 1))
    assert_bitwise(out, contract(ids, weight, mag, 2**63 - 1))


def test_cuda_zero_mag_is_lookup(cuda_op):
    ids, weight, mag = make_inputs(16, 10, 128, torch.bfloat16, gen_seed=9)
    ids, weight = ids.cuda(), weight.cuda()
    out = cuda_op(ids, weight, torch.zeros(16, device="cuda"), cuda_seed(5))
    assert_bitwise(out, torch.nn.functional.embedding(ids, weight))


@pytest.mark.parametrize(
    "change,exc,word",
    [
        (lambda a: {"ids": a["ids"].to(torch.int32)}, TypeError, "ids"),
        (lambda a: {"weight": a["weight"].double()}, TypeError, "weight"),
        (lambda a: {"mag": a["mag"].half()}, TypeError, "mag"),
        (lambda a: {"mag": a["mag"][:3]}, ValueError, "mag"),
        (lambda a: {"ids": a["ids"].view(2, 2)}, ValueError, "ids"),
        (lambda a: {"weight": a["weight"].flatten()}, ValueError, "weight"),
        (lambda a: {"seed": torch.tensor(-1)}, ValueError, "seed"),  # a CPU seed's range is checked
        (lambda a: {"seed": torch.tensor(1, dtype=torch.int32, device="cuda")}, TypeError, "seed"),
        (lambda a: {"seed": torch.tensor(1.0, device="cuda")}, TypeError, "seed"),
        (lambda a: {"seed": torch.tensor([1, 2], device="cuda")}, ValueError, "seed"),
        (lambda a: {"seed": torch.empty(0, dtype=torch.int64, device="cuda")}, ValueError, "seed"),
        (lambda a: {"ids": torch.tensor([0, 1, 8, 2], device="cuda")}, ValueError, "ids"),
        (lambda a: {"ids": torch.tensor([0, -3, 1, 2], device="cuda")}, ValueError, "ids"),
        (lambda a: {"mag": a["mag"].cpu()}, ValueError, "mag"),
    ],
    ids=["ids-int32", "weight-f64", "mag-f16", "mag-shape", "ids-2d", "weight-1d", "seed-neg-cpu", "seed-int32",
         "seed-f32", "seed-two-elements", "seed-empty", "ids-too-big", "ids-negative", "mag-cpu"],
)  # fmt: skip
def test_cuda_bad_input(cuda_op, change, exc, word):
    ids, weight, mag = make_inputs(4, 8, 16, torch.float32, device="cuda")
    args = {"ids": ids, "weight": weight, "mag": mag, "seed": cuda_seed(1)}
    args |= change(args)
    with pytest.raises(exc, match=word):
        cuda_op(args["ids"], args["weight"], args["mag"], args["seed"])
    # the device is still usable (no device-side fault)
    torch.cuda.synchronize()
    assert_bitwise(cuda_op(ids, weight, mag, cuda_seed(1)), contract(ids, weight, mag, 1))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_seed_on_another_gpu_is_refused(cuda_op):
    ids, weight, mag = make_inputs(4, 8, 16, torch.float32, device="cuda")
    with pytest.raises(ValueError, match="seed"):
        cuda_op(ids, weight, mag, torch.tensor(1, device="cuda:1"))


def test_cuda_seed_forms_agree(cuda_op):
    # 0-dim or (1,), on the GPU or on the CPU (copied to the GPU by the op): the same Philox key, the same output
    ids, weight, mag = make_inputs(6, 10, 64, torch.bfloat16, gen_seed=13, device="cuda")
    want = contract(ids, weight, mag, 2**63 - 1)
    for seed in (cuda_seed(2**63 - 1), torch.tensor(2**63 - 1), torch.tensor([2**63 - 1], device="cuda"),
                 torch.tensor([2**63 - 1])):  # fmt: skip
        assert_bitwise(cuda_op(ids, weight, mag, seed), want)


# --------------------------------------------------------------------------------------------------
# CPU emulation of the same kernel source
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def emu_lib(tmp_path_factory):
    """The emulation library: fastlora_emu_neftune_embedding (the launcher), fastlora_emu_set_deferring and
    fastlora_emu_run_deferred (queue launches and run them later, as a CUDA graph capture and replay would)."""
    out = cuda_emu_build.build(REPO / "tests" / "cuda_emu" / "neftune_embedding_emu.cpp",
                               tmp_path_factory.mktemp("cuda_emu") / "libneftune_emu.so")
    lib = ctypes.CDLL(str(out))
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.fastlora_emu_neftune_embedding.argtypes = [p, p, p, p, i64, i64, i64, p, ctypes.c_int]
    lib.fastlora_emu_neftune_embedding.restype = ctypes.c_int
    lib.fastlora_emu_set_deferring.argtypes = [ctypes.c_int]
    lib.fastlora_emu_set_deferring.restype = None
    lib.fastlora_emu_run_deferred.argtypes = []
    lib.fastlora_emu_run_deferred.restype = None
    return lib


@pytest.fixture(scope="module")
def emu(emu_lib):
    fn = emu_lib.fastlora_emu_neftune_embedding

    def run(ids, weight, mag, seed, *, out=None):
        """The emulated launcher; ``seed`` an int (put in a new int64 tensor) or the int64 tensor whose
        memory the kernels read."""
        T, (V, d) = ids.numel(), weight.shape
        out = torch.empty(T, d, dtype=weight.dtype) if out is None else out
        seed = torch.tensor(seed, dtype=torch.int64) if isinstance(seed, int) else seed
        rc = fn(ids.data_ptr(), weight.data_ptr(), mag.data_ptr(), out.data_ptr(), T, V, d, seed.data_ptr(),
                _DTYPE_CODE[weight.dtype])  # fmt: skip
        assert rc == 0
        return out

    return run


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_emulated_kernels_match_contract(emu, dtype):
    for T, V, d in SHAPES:
        ids, weight, mag = make_inputs(T, V, d, dtype, gen_seed=T * 1000 + d, zero_rows=(0,) if T > 1 else ())
        for seed in (0, 2**63 - 1) if d > 1000 else (0, 1, 0x1234_5678_9ABC_DEF0, 2**63 - 1):
            assert_bitwise(emu(ids, weight, mag, seed), contract(ids, weight, mag, seed))


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_emulated_misaligned_takes_scalar_path(emu, dtype):
    ids, weight, mag = make_inputs(5, 6, 64, dtype, gen_seed=11, zero_rows=(1,))
    buf = torch.empty(weight.numel() + 1, dtype=dtype)
    w = buf[1:].view(weight.shape)
    w.copy_(weight)
    obuf = torch.empty(5 * 64 + 1, dtype=dtype)
    out = emu(ids, w, mag, 77, out=obuf[1:].view(5, 64))
    assert_bitwise(out, contract(ids, weight, mag, 77))


@pytest.mark.parametrize("d", [64, 37])  # vector and scalar kernels
def test_emulated_kernels_read_the_seed_at_run_time(emu, emu_lib, d):
    # The kernels load the seed from the buffer the pointer names, when they run: a new value in the same
    # buffer reaches the next launch, and a queued launch (as in a captured CUDA graph) sees the value the
    # buffer holds when it runs, not the one at launch time.
    ids, weight, mag = make_inputs(5, 9, d, torch.bfloat16, gen_seed=15, zero_rows=(2,))
    seed = torch.tensor(21)
    first = emu(ids, weight, mag, seed)
    assert_bitwise(first, contract(ids, weight, mag, 21))
    seed.fill_(2**63 - 1)
    second = emu(ids, weight, mag, seed)
    assert_bitwise(second, contract(ids, weight, mag, 2**63 - 1))
    assert not torch.equal(first, second)

    emu_lib.fastlora_emu_set_deferring(1)
    try:
        queued = emu(ids, weight, mag, seed)  # launched with the buffer holding 2**63 - 1
    finally:
        emu_lib.fastlora_emu_set_deferring(0)
    seed.fill_(0x1234_5678_9ABC_DEF0)
    emu_lib.fastlora_emu_run_deferred()
    assert_bitwise(queued, contract(ids, weight, mag, 0x1234_5678_9ABC_DEF0))


def test_emulated_launcher_refuses_a_missing_seed(emu_lib):
    ids, weight, mag = make_inputs(2, 4, 8, torch.float32, gen_seed=16)
    out = torch.empty(2, 8)
    fn = emu_lib.fastlora_emu_neftune_embedding
    args = [ids.data_ptr(), weight.data_ptr(), mag.data_ptr(), out.data_ptr(), 2, 4, 8, None,
            _DTYPE_CODE[torch.float32]]  # fmt: skip
    assert fn(*args) == 1  # cudaErrorInvalidValue, nothing launched
    args[4] = 0  # no tokens: nothing to read the seed for
    assert fn(*args) == 0


@pytest.mark.parametrize("d", [64, 37])
def test_emulated_bad_ids_never_read(emu, d):
    # The host check refuses these; the kernel itself must not dereference them (it writes NaN rows).
    ids, weight, mag = make_inputs(4, 8, d, torch.float32, gen_seed=12)
    ids[1], ids[3] = 8, -(2**40)
    out = emu(ids, weight, mag, 3)
    assert out[[1, 3]].isnan().all()
    fixed = ids.clone()
    fixed[[1, 3]] = 0
    good = torch.tensor([0, 2])  # the other rows are exact (their element indices are unchanged)
    assert_bitwise(out[good], contract(fixed, weight, mag, 3)[good])


# --------------------------------------------------------------------------------------------------
# nvcc
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_nvcc_compiles_without_spills(arch, tmp_path):
    nvcc = compile_check._find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    src = REPO / "csrc" / "cuda" / "neftune_embedding.cu"
    rows = compile_check._compile_cu(nvcc, src, REPO, int(arch[3:]), arch)
    assert rows and all(r.status == "ok" for r in rows), [(r.kernel, r.reason) for r in rows]
    assert {r.kernel.split("<")[0].split("::")[-1] for r in rows} >= {"neftune_vec_kernel", "neftune_scalar_kernel"}
    out = tmp_path / "neftune.ptx"
    proc = subprocess.run([nvcc, "-ptx", "-o", str(out), f"-arch={arch}", "-std=c++17", "-O3", "--fmad=false",
                           "-I", str(REPO / "csrc" / "include"), str(src)], capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    ptx = out.read_text()
    assert not re.search(FP_FMA_PTX, ptx)
    assert "ld.global.nc.v4.u32" in ptx and "st.global.v4.u32" in ptx  # 16-byte vectors
