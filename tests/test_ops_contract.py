"""The op contract: schemas, fake implementations, opcheck, backend choice and bad input."""

import os
import re
import subprocess
import sys

import pytest
import torch

import fastlora
from fastlora import backends, nf4, ops

CPU_BACKENDS = [b for b in ("cpp", "reference") if backends.available("cpu")[b]]


def _dequant_args(seed_offset=0, numel=1000, blocksize=64):
    g = torch.Generator().manual_seed(1234 + seed_offset)
    packed = torch.randint(0, 256, ((numel + 1) // 2,), dtype=torch.uint8, generator=g)
    absmax = torch.rand(-(-numel // blocksize), generator=g) + 0.1
    return packed, absmax


@pytest.mark.parametrize("suffix", ["", "_reference", "_triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_opcheck_dequantize_4bit(suffix, dtype):
    # Triton runs on CPU tensors under the interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
    packed, absmax = _dequant_args(numel=999)
    op = getattr(torch.ops.fastlora, "dequantize_4bit" + suffix)
    torch.library.opcheck(op, (packed, absmax, 64, "nf4", 999, dtype))
    torch.library.opcheck(op, (packed, absmax, 64, "fp4", 999, dtype))


@pytest.mark.parametrize("suffix", ["", "_reference"])
def test_opcheck_absmax_and_quantize_ops(seed, suffix):
    q = nf4.quantize(torch.randn(300, 70), 64, "nf4", True)
    n = q.nested
    torch.library.opcheck(getattr(torch.ops.fastlora, "dequantize_absmax" + suffix),
                          (q.absmax, n.code, n.absmax2, n.offset, 256))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        torch.library.opcheck(getattr(torch.ops.fastlora, "quantize_4bit" + suffix),
                              (torch.randn(33, 65).to(dtype), 64, "fp4"))
    centred = torch.randn(777)
    torch.library.opcheck(getattr(torch.ops.fastlora, "quantize_absmax" + suffix), (centred, n.code, 256))


def test_opcheck_dequantize_absmax_triton(seed):
    q = nf4.quantize(torch.randn(300, 70), 64, "nf4", True)
    n = q.nested
    torch.library.opcheck(torch.ops.fastlora.dequantize_absmax_triton.default,
                          (q.absmax, n.code, n.absmax2, n.offset, 256))


def test_fake_tensor_shapes_without_data():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        packed = torch.empty(14336 * 4096 // 2, dtype=torch.uint8)
        absmax = torch.empty(14336 * 4096 // 64, dtype=torch.float32)
        out = torch.ops.fastlora.dequantize_4bit(packed, absmax, 64, "nf4", 14336 * 4096, torch.bfloat16)
    assert out.shape == (14336 * 4096,) and out.dtype == torch.bfloat16


def test_torch_compile_has_no_graph_break(seed):
    q = nf4.quantize(torch.randn(64, 96), 64, "nf4", False)

    def f(packed, absmax):
        return torch.ops.fastlora.dequantize_4bit(packed, absmax, 64, "nf4", 64 * 96, torch.float32) * 2

    explanation = torch._dynamo.explain(f)(q.packed_bytes(), q.absmax)
    assert explanation.graph_break_count == 0


def test_native_schema_matches_python_fallback_schema():
    import importlib

    for name in ("dequantize_4bit", "dequantize_4bit_into", "dequantize_absmax", "quantize_4bit", "quantize_absmax"):
        module = importlib.import_module(f"fastlora.ops.{name}")
        schema = str(getattr(torch.ops.fastlora, name).default._schema)
        expected = torch._C.parse_schema(f"fastlora::{name}{module.SCHEMA}")
        assert schema == str(expected)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backends_agree_bitwise(seed, backend):
    packed, absmax = _dequant_args(numel=4097, blocksize=128)
    for qt in ("nf4", "fp4"):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            got = ops.dequantize_4bit(packed, absmax, 128, qt, 4097, dtype, backend=backend)
            want = fastlora.reference.dequantize_4bit(packed, absmax, 128, qt, 4097, dtype)
            assert torch.equal(got, want)


def test_portable_cpp_path_matches_avx2(seed):
    """The C++ kernel's portable path (forced with FASTLORA_DISABLE_AVX2) gives the same bits."""
    if not backends.available("cpu")["cpp"]:
        pytest.skip("compiled extension not available")
    script = (
        "import torch, fastlora; from fastlora import ops\n"
        "g = torch.Generator().manual_seed(7)\n"
        "p = torch.randint(0, 256, (5001,), dtype=torch.uint8, generator=g); a = torch.rand(313, generator=g)\n"
        "outs = [ops.dequantize_4bit(p, a, 32, qt, 10001, dt, backend='cpp').view(torch.uint8)"
        " for qt in ('nf4', 'fp4') for dt in (torch.float32, torch.bfloat16, torch.float16)]\n"
        "import hashlib, sys\n"
        "sys.stdout.write(hashlib.sha256(b''.join(o.numpy().tobytes() for o in outs)).hexdigest())\n"
    )
    env = dict(os.environ)
    digests = []
    for disable in ("0", "1"):
        env["FASTLORA_DISABLE_AVX2"] = disable
        res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
        digests.append(res.stdout.strip())
    assert digests[0] == digests[1] and len(digests[0]) == 64


def test_missing_extension_falls_back_with_one_warning():
    script = (
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import torch, fastlora\n"
        "    from fastlora import nf4\n"
        "    q = nf4.quantize(torch.randn(64, 64)); d = nf4.dequantize(q)\n"
        "    fastlora._extension.load()\n"
        "ours = [x for x in w if 'fastlora' in str(x.message)]\n"
        "assert len(ours) == 1, [str(x.message) for x in ours]\n"
        "assert 'compiled extension' in str(ours[0].message)\n"
        "assert 'Unset FASTLORA_DISABLE_EXTENSION' in str(ours[0].message)\n"
        "assert fastlora.backends.resolve('auto', torch.device('cpu')) == 'reference'\n"
        "print('ok')\n"
    )
    env = dict(os.environ, FASTLORA_DISABLE_EXTENSION="1")
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    info = subprocess.run([sys.executable, "-m", "fastlora", "info"], env=env, capture_output=True, text=True)
    assert info.returncode == 0 and "NOT AVAILABLE" in info.stdout


# Runs in a fresh interpreter: a meta-path finder makes `import fastlora._C` fail the way an extension built
# against another torch does, before fastlora is imported; prints what the test checks as one JSON object.
_BROKEN_EXTENSION_SCRIPT = """
import contextlib, importlib.abc, io, json, sys, warnings

class BrokenExtension(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "fastlora._C":
            raise ImportError("simulated: undefined symbol _ZN3c10 in fastlora._C")
        return None

sys.meta_path.insert(0, BrokenExtension())
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch
    import fastlora
    from fastlora import backends, info, nf4
    q = nf4.quantize(torch.randn(64, 96), 32, "fp4", True)
    auto = nf4.dequantize(q, torch.bfloat16)
    fastlora._extension.load()
report = io.StringIO()
with contextlib.redirect_stdout(report):
    rc = info.main([])
print(json.dumps({
    "warnings": [str(w.message) for w in caught if "fastlora" in str(w.message)],
    "extension_module_loaded": "fastlora._C" in sys.modules,
    "auto_backend": backends.resolve("auto", torch.device("cpu")),
    "matches_reference": torch.equal(auto, nf4.dequantize(q, torch.bfloat16, backend="reference")),
    "info_rc": rc,
    "info": report.getvalue(),
}))
"""


def test_extension_that_fails_to_import_falls_back_with_one_warning():
    env = {k: v for k, v in os.environ.items() if k != "FASTLORA_DISABLE_EXTENSION"}
    res = subprocess.run([sys.executable, "-c", _BROKEN_EXTENSION_SCRIPT], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    import json

    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(got["warnings"]) == 1, got["warnings"]
    warning = got["warnings"][0]
    assert "ImportError: simulated: undefined symbol" in warning and "torch reference" in warning
    assert "pip install --no-build-isolation -e ." in warning
    assert not got["extension_module_loaded"]
    assert got["auto_backend"] == "reference" and got["matches_reference"]
    assert got["info_rc"] == 0
    lines = dict(re.split(r" {2,}", line, maxsplit=1) for line in got["info"].splitlines())
    assert "NOT AVAILABLE (ImportError: simulated: undefined symbol" in lines["extension"]
    assert lines["extension built with cuda"] == "False"
    assert lines["cpu features used"] == "-"
    assert "reference: yes, cpp: no" in lines["backends cpu"]


def test_info_cli_lists_backends():
    res = subprocess.run([sys.executable, "-m", "fastlora", "info", "--json"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    import importlib.metadata
    import json

    facts = json.loads(res.stdout)
    assert facts["fastlora"] == fastlora.__version__
    assert set(facts["backends_cpu"]) == {"reference", "cpp", "cuda", "triton"}
    assert facts["backends_cpu"]["reference"] is True

    def version(package):
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    # The plain-text report is what users read: one "name  value" line per fact, two or more spaces apart.
    text = subprocess.run([sys.executable, "-m", "fastlora", "info"], capture_output=True, text=True)
    assert text.returncode == 0, text.stderr
    lines = dict(re.split(r" {2,}", line, maxsplit=1) for line in text.stdout.splitlines())
    assert lines["torch"] == torch.__version__
    for package in ("triton", "transformers", "bitsandbytes"):
        assert lines[package] == version(package), (package, text.stdout)
    ext = fastlora._extension.load()
    assert lines["extension built with cuda"] == str(bool(ext is not None and ext.with_cuda()))
    assert lines["cpu features used"] == (", ".join(ext.cpu_features()) if ext is not None else "") or "-"


BAD_DEQUANT_CALLS = [
    (dict(packed=torch.zeros(500, dtype=torch.int32)), TypeError, "packed"),
    (dict(absmax=torch.zeros(16, dtype=torch.float16)), TypeError, "absmax"),
    (dict(blocksize=48), ValueError, "blocksize"),
    (dict(blocksize=8192), ValueError, "blocksize"),
    (dict(blocksize=16), ValueError, "blocksize"),
    (dict(quant_type="int4"), ValueError, "quant_type"),
    (dict(dtype=torch.int8), TypeError, "dtype"),
    (dict(numel=1002), ValueError, "packed"),
    (dict(absmax=torch.ones(17)), ValueError, "absmax"),
    (dict(numel=-1), ValueError, "numel"),
    (dict(absmax=torch.ones(16, device="meta")), ValueError, "device"),
]


@pytest.mark.parametrize("change,exc,word", BAD_DEQUANT_CALLS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bad_dequantize_input_raises_named_error(change, exc, word, backend):
    args = dict(packed=torch.zeros(500, dtype=torch.uint8), absmax=torch.ones(16), blocksize=64, quant_type="nf4",
                numel=1000, dtype=torch.bfloat16)
    args.update(change)
    with pytest.raises(exc, match=word):
        ops.dequantize_4bit(**args, backend=backend)


@pytest.mark.parametrize("change,exc,word", BAD_DEQUANT_CALLS[:-1])
def test_bad_input_to_the_raw_cpp_op_raises_too(change, exc, word):
    """Direct torch.ops calls skip the Python checks; the C++ checks still name the argument."""
    if not backends.available("cpu")["cpp"]:
        pytest.skip("compiled extension not available")
    args = dict(packed=torch.zeros(500, dtype=torch.uint8), absmax=torch.ones(16), blocksize=64, quant_type="nf4",
                numel=1000, dtype=torch.bfloat16)
    args.update(change)
    with pytest.raises((exc, RuntimeError), match=word):
        torch.ops.fastlora.dequantize_4bit(*args.values())


def test_bad_quantize_input():
    with pytest.raises(TypeError, match="weight"):
        nf4.quantize(torch.zeros(4, 64, dtype=torch.int32))
    with pytest.raises(TypeError, match="weight"):
        nf4.quantize([[1.0, 2.0]])
    with pytest.raises(ValueError, match="blocksize"):
        nf4.quantize(torch.randn(4, 64), blocksize=100)
    with pytest.raises(ValueError, match="quant_type"):
        nf4.quantize(torch.randn(4, 64), quant_type="nf3")
    with pytest.raises(ValueError, match="finite"):
        nf4.quantize(torch.tensor([[1.0, float("nan")] * 32]))
    with pytest.raises(ValueError, match="quant_storage"):
        nf4.quantize(torch.randn(3, 2), quant_storage=torch.bfloat16)
    with pytest.raises(ValueError, match="backend"):
        nf4.quantize(torch.randn(4, 64), backend="tpu")
    with pytest.raises(TypeError, match="qweight"):
        nf4.dequantize(torch.randn(4, 64))
    q = nf4.quantize(torch.randn(4, 64))
    with pytest.raises(TypeError, match="dtype"):
        nf4.dequantize(q, torch.int32)


def test_unavailable_backend_is_a_clear_error():
    packed, absmax = _dequant_args()
    with pytest.raises(ValueError, match="cuda"):
        ops.dequantize_4bit(packed, absmax, 64, "nf4", 1000, torch.float32, backend="cuda")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dequantize_into_workspace(seed, backend):
    q = nf4.quantize(torch.randn(67, 160), 32, "fp4", True)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        workspace = torch.full((67 * 160,), float("nan"), dtype=dtype)
        got = nf4.dequantize(q, out=workspace, backend=backend)
        assert got.data_ptr() == workspace.data_ptr() and got.shape == (67, 160)
        assert torch.equal(got, nf4.dequantize(q, dtype, backend="reference"))
    with pytest.raises(ValueError, match="out"):
        nf4.dequantize(q, out=torch.empty(10), backend=backend)
    with pytest.raises(ValueError, match="dtype"):
        nf4.dequantize(q, torch.float16, out=torch.empty(67 * 160), backend=backend)
    with pytest.raises(ValueError, match="contiguous"):
        ops.dequantize_4bit_into(q.packed_bytes(), q.absmax_float(), 32, "fp4",
                                 torch.empty(160, 67 * 2)[:, ::2], backend=backend)


@pytest.mark.parametrize("suffix", ["", "_reference", "_triton"])
def test_opcheck_dequantize_into(suffix):
    packed, absmax = _dequant_args(numel=999)
    op = getattr(torch.ops.fastlora, "dequantize_4bit_into" + suffix)
    torch.library.opcheck(op, (packed, absmax, 64, "nf4", torch.empty(999, dtype=torch.bfloat16)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("numel", [1, 999, 4096 + 33])
def test_dequantize_into_triton_matches_cpp(dtype, numel):
    """The Triton workspace path (interpreter here, the GPU in tests/test_gpu.py) writes exactly
    what the fresh-output op returns, bit for bit, and nothing outside ``out``."""
    packed, absmax = _dequant_args(seed_offset=numel, numel=numel)
    want = ops.dequantize_4bit(packed, absmax, 64, "fp4", numel, dtype, backend="cpp")
    buf = torch.full((numel + 2,), 7.0, dtype=dtype)
    ops.dequantize_4bit_into(packed, absmax, 64, "fp4", buf[1:-1], backend="triton")
    view = {torch.float32: torch.int32}.get(dtype, torch.int16)
    assert torch.equal(buf[1:-1].view(view), want.view(view))
    assert buf[0].item() == 7.0 and buf[-1].item() == 7.0
