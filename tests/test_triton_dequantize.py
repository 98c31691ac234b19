"""Numerics of the Triton 4-bit kernels (fastlora.kernels.dequantize_4bit) under Triton's CPU interpreter.

Why a subprocess: ``TRITON_INTERPRET=1`` only takes effect if it is in the environment when the
``@triton.jit`` kernels are *defined* (module import). Another test module in the same pytest
process may already have imported the kernel module without it (or imported Triton and cached its
knobs), and setting it here would leak into every later test. So this module never imports Triton
or the kernels itself: a module-scoped fixture runs this very file as a script
(``python tests/test_triton_dequantize.py --worker CASE...``) with ``TRITON_INTERPRET=1`` in a fresh
interpreter, which runs the selected cases and prints one JSON object {case id: "ok" | failure
text}. Each parametrized pytest case then asserts its own entry, so failures are reported per case
and ``-k`` selects which cases the worker runs.

Inputs are fresh random data (random packed bytes, absmax spread over many binades so that fp16
overflows and subnormals and bf16 rounding ties occur), seeded per case from the case id and
FASTLORA_TEST_SEED as conftest.py does. References: the C++ op ``torch.ops.fastlora.*`` (bitwise)
and bitsandbytes' torch implementation (``torch.equal``, which counts -0 == +0: bitsandbytes'
torch table holds +0 for FP4 code 8 where the kernels produce -0).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
import zlib

import pytest

BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
QUANT_TYPES = ["nf4", "fp4"]
DTYPES = ["float32", "bfloat16", "float16"]


def _dequant_numel(blocksize: int) -> int:
    # Several programs of either tile, odd (last byte half used) and not a multiple of blocksize.
    return blocksize * max(2, 5000 // blocksize) + blocksize // 2 + 1


CASES: dict[str, dict] = {}
for _qt in QUANT_TYPES:
    for _bs in BLOCKSIZES:
        for _dt in DTYPES:
            CASES[f"dequant-{_qt}-bs{_bs}-{_dt}"] = {
                "kind": "dequant", "quant_type": _qt, "blocksize": _bs, "dtype": _dt,
                "numel": _dequant_numel(_bs),
            }  # fmt: skip
for _qt in QUANT_TYPES:
    for _numel in (0, 1, 2, 3, 63, 64, 65):
        CASES[f"small-{_qt}-n{_numel}"] = {"kind": "dequant", "quant_type": _qt, "blocksize": 64,
                                           "dtype": "bfloat16", "numel": _numel}  # fmt: skip
    CASES[f"table-{_qt}"] = {"kind": "table", "quant_type": _qt}
    for _bs in (64, 128):
        CASES[f"nested-{_qt}-bs{_bs}"] = {"kind": "nested", "quant_type": _qt, "blocksize": _bs}
CASES["absmax-sensitive-to-fma"] = {"kind": "absmax_fma"}
CASES["quant-storage-bf16"] = {"kind": "storage"}
CASES["argument-errors"] = {"kind": "errors"}


# --------------------------------------------------------------------------------------------------
# Worker side (runs with TRITON_INTERPRET=1, imports torch / triton / bitsandbytes)
# --------------------------------------------------------------------------------------------------


def _seed(case_id: str) -> int:
    return zlib.crc32(case_id.encode()) ^ int(os.environ.get("FASTLORA_TEST_SEED", "0"))


def _bits(t):
    import torch

    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def _assert_bitwise(actual, expected, what: str) -> None:
    import torch

    assert actual.dtype == expected.dtype and actual.shape == expected.shape, (
        f"{what}: {actual.dtype}{tuple(actual.shape)} vs {expected.dtype}{tuple(expected.shape)}"
    )
    if not torch.equal(_bits(actual), _bits(expected)):
        bad = (_bits(actual) != _bits(expected)).nonzero().flatten()
        i = int(bad[0])
        raise AssertionError(f"{what}: {bad.numel()} elements differ, first at {i}: {actual[i]} vs {expected[i]}")


def _random_inputs(numel: int, blocksize: int, gen):
    import torch

    packed = torch.randint(0, 256, ((numel + 1) // 2,), dtype=torch.uint8, generator=gen)
    n_blocks = (numel + blocksize - 1) // blocksize
    # Scales over ~2^-20 .. 2^20: bf16 ties, fp16 subnormals and fp16 overflow to inf all occur.
    absmax = torch.exp2(torch.randn(n_blocks, generator=gen) * 6.0).clamp(2.0**-20, 2.0**20)
    return packed, absmax


def _bnb_reference(packed, absmax, blocksize, quant_type, numel, dtype):
    """bitsandbytes' torch implementation, called eagerly (its torch.compile wrapper would recompile
    for every shape). Its native CPU kernel is not used: it is wrong when numel % blocksize != 0."""
    from bitsandbytes.backends.default import ops as bnb_default

    compute = getattr(bnb_default._dequantize_4bit_compute, "__wrapped__", bnb_default._dequantize_4bit_compute)
    code = bnb_default._get_4bit_code(quant_type, packed.device)
    return compute(packed, absmax, code, blocksize, (numel,), dtype)


def _case_dequant(p, K, gen) -> None:
    import torch

    dtype = getattr(torch, p["dtype"])
    numel, bs, qt = p["numel"], p["blocksize"], p["quant_type"]
    packed, absmax = _random_inputs(numel, bs, gen)
    expected = torch.ops.fastlora.dequantize_4bit(packed, absmax, bs, qt, numel, dtype)
    for config in K.DEQUANT_CONFIGS:
        out = K.dequantize_4bit(packed, absmax, bs, qt, numel, dtype, config=config)
        _assert_bitwise(out, expected, f"vs C++ op, {config}")
    if numel:
        ref = _bnb_reference(packed, absmax, bs, qt, numel, dtype)
        assert torch.equal(out, ref), f"vs bitsandbytes: {(out != ref).sum()} elements differ"
    # The launcher's own choice of tile, with longer-than-needed inputs (it must read only its part).
    extra = K.dequantize_4bit(torch.cat([packed, packed[:5]]), torch.cat([absmax, absmax[:3]]), bs, qt, numel, dtype)
    _assert_bitwise(extra, expected, "oversized inputs")


def _case_table(p, K, gen) -> None:
    import torch

    qt = p["quant_type"]
    packed = torch.tensor([(2 * k << 4) | (2 * k + 1) for k in range(8)], dtype=torch.uint8)
    decoded = K.dequantize_4bit(packed, torch.ones(1), 32, qt, 16, torch.float32)
    _assert_bitwise(decoded, K.code_table(qt), "decode of codes 0..15 vs code_table")
    _assert_bitwise(decoded, torch.ops.fastlora.dequantize_4bit(packed, torch.ones(1), 32, qt, 16, torch.float32),
                    "decode of codes 0..15 vs C++ op")  # fmt: skip
    if qt == "fp4":
        assert torch.signbit(decoded[8]) and decoded[8] == 0, "FP4 code 8 must decode to -0.0"


def _case_nested(p, K, gen) -> None:
    import bitsandbytes.functional as F
    import torch

    qt, bs = p["quant_type"], p["blocksize"]
    w = torch.randn(96, 1001, generator=gen) * 0.05  # numel % blocksize != 0
    packed, state = F.quantize_4bit(w, blocksize=bs, compress_statistics=True, quant_type=qt)
    offset = state.offset if torch.is_tensor(state.offset) else torch.tensor(float(state.offset))
    ref = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    out = K.dequantize_absmax(state.absmax, state.state2.code, state.state2.absmax, offset, state.state2.blocksize)
    _assert_bitwise(out, ref.float(), "nested absmax vs bitsandbytes")
    c_op = torch.ops.fastlora.dequantize_absmax(
        state.absmax, state.state2.code, state.state2.absmax, offset.reshape(()), state.state2.blocksize
    )
    _assert_bitwise(out, c_op, "nested absmax vs C++ op")
    # Whole weight: de-nested scales then the 4-bit decode, against bitsandbytes' own dequantize.
    full = K.dequantize_4bit(packed, out, bs, qt, w.numel(), torch.bfloat16)
    expected = _bnb_reference(packed.view(-1), ref, bs, qt, w.numel(), torch.bfloat16)
    assert torch.equal(full, expected), f"full nested weight: {(full != expected).sum()} elements differ"


def _case_absmax_fma(p, K, gen) -> None:
    """Random nested statistics where a fused multiply-add would round differently somewhere, so the
    bitwise comparison with the two-rounding reference really detects contraction."""
    import torch

    n, bs = 5000, 256
    q = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)
    code = torch.sort(torch.rand(256, generator=gen) * 2 - 1).values
    absmax2 = torch.rand((n + bs - 1) // bs, generator=gen) * 4 + 0.1
    offset = torch.rand((), generator=gen) + 0.25
    a2 = absmax2.repeat_interleave(bs)[:n]
    two_roundings = code[q.long()] * a2 + offset  # torch eager: separate mul and add
    fused = (code[q.long()].double() * a2.double() + offset.double()).float()
    assert not torch.equal(fused, two_roundings), "inputs do not distinguish FMA; change the data"
    out = K.dequantize_absmax(q, code, absmax2, offset, bs)
    _assert_bitwise(out, two_roundings, "dequantize_absmax vs two roundings")
    _assert_bitwise(out, torch.ops.fastlora.dequantize_absmax(q, code, absmax2, offset, bs), "vs C++ op")


def _case_storage(p, K, gen) -> None:
    import torch

    numel = 1003
    packed, absmax = _random_inputs(numel + 1, 64, gen)  # an even number of bytes to view as bf16
    expected = K.dequantize_4bit(packed, absmax, 64, "nf4", numel, torch.float16)
    as_bf16 = packed.view(torch.bfloat16).reshape(-1, 1)  # quant_storage=bfloat16 holds the same bytes
    _assert_bitwise(K.dequantize_4bit(as_bf16, absmax, 64, "nf4", numel, torch.float16), expected, "bf16 storage")


def _case_errors(p, K, gen) -> None:
    import torch

    packed, absmax = _random_inputs(256, 64, gen)
    bad_calls = {
        "blocksize 48": lambda: K.dequantize_4bit(packed, absmax, 48, "nf4", 256, torch.float32),
        "blocksize 8192": lambda: K.dequantize_4bit(packed, absmax, 8192, "nf4", 256, torch.float32),
        "quant_type int4": lambda: K.dequantize_4bit(packed, absmax, 64, "int4", 256, torch.float32),
        "dtype float64": lambda: K.dequantize_4bit(packed, absmax, 64, "nf4", 256, torch.float64),
        "packed too short": lambda: K.dequantize_4bit(packed, absmax, 64, "nf4", 258, torch.float32),
        "absmax too short": lambda: K.dequantize_4bit(packed, absmax[:3], 64, "nf4", 256, torch.float32),
        "absmax float16": lambda: K.dequantize_4bit(packed, absmax.half(), 64, "nf4", 256, torch.float32),
        "code not 256": lambda: K.dequantize_absmax(packed, absmax, absmax, torch.zeros(()), 256),
    }
    for what, call in bad_calls.items():
        try:
            call()
        except (ValueError, TypeError):
            continue
        raise AssertionError(f"{what}: no error raised")


_RUNNERS = {
    "dequant": _case_dequant,
    "table": _case_table,
    "nested": _case_nested,
    "absmax_fma": _case_absmax_fma,
    "storage": _case_storage,
    "errors": _case_errors,
}


def _worker(case_ids: list[str]) -> dict[str, str]:
    assert os.environ.get("TRITON_INTERPRET") == "1", "the worker must run under TRITON_INTERPRET=1"
    import torch

    import fastlora._C  # noqa: F401  (registers torch.ops.fastlora.*)
    from fastlora.kernels import dequantize_4bit as K

    results = {}
    for case_id in case_ids:
        gen = torch.Generator().manual_seed(_seed(case_id))
        try:
            _RUNNERS[CASES[case_id]["kind"]](CASES[case_id], K, gen)
            results[case_id] = "ok"
        except Exception:
            results[case_id] = traceback.format_exc(limit=4)
    return results


_RESULT_MARKER = "FASTLORA-WORKER-RESULTS:"

if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _results = _worker(sys.argv[2:] or list(CASES))
    print(_RESULT_MARKER + json.dumps(_results))
    sys.exit(0)


# --------------------------------------------------------------------------------------------------
# pytest side (no Triton import in this process)
# --------------------------------------------------------------------------------------------------


def _missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


pytestmark = [
    pytest.mark.skipif(_missing("triton"), reason="Triton is not installed"),
    pytest.mark.skipif(_missing("bitsandbytes"), reason="bitsandbytes is not installed (reference)"),
]


@pytest.fixture(scope="module")
def worker_results(request) -> dict[str, str]:
    selected = [
        item.callspec.params["case_id"]
        for item in request.session.items
        if item.module is request.module and hasattr(item, "callspec") and "case_id" in item.callspec.params
    ]
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker", *(selected or list(CASES))],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    for line in proc.stdout.splitlines():
        if line.startswith(_RESULT_MARKER):
            return json.loads(line[len(_RESULT_MARKER) :])
    pytest.fail(f"worker exited {proc.returncode} without results:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


@pytest.mark.parametrize("case_id", list(CASES))
def test_triton_interpreted(worker_results: dict[str, str], case_id: str) -> None:
    assert case_id in worker_results, f"worker did not run {case_id}"
    result = worker_results[case_id]
    assert result == "ok", f"{case_id} ({CASES[case_id]}):\n{result}"
