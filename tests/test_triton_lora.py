"""The Triton LoRA ops (kernels/lora_dropout.py, kernels/lora_linear.py) against the torch reference ops.

Without a GPU the kernels run on CPU tensors under Triton's interpreter (conftest.py sets
TRITON_INTERPRET=1 before anything imports Triton); with one they run compiled on CUDA tensors.
Shapes are tiny and odd so that every kernel sees several tiles, partial tiles and several loop
iterations under the interpreter's small fixed configuration.

Comparisons:
* ``fastlora::lora_dropout_triton`` vs ``lora_dropout_reference``: bitwise (the Philox mask and the
  rounding of x * scale are one definition), also the keep mask the GEMMs read for K % 4 != 0.
* ``lora_linear_fwd_triton`` / ``lora_linear_bwd_triton`` vs ``*_reference``: the GEMMs sum in another
  order, so per output ``|got - ref| <= tol * (|ref| + max|ref|)`` with tol by the output's dtype:
  float32 1e-5, bfloat16 1e-2, float16 2e-3 (outputs rounded to a 16-bit dtype may differ by one unit
  in the last place, and a 16-bit S changes L by a rounding of its own). The 4-bit weights are decoded
  bit-exactly, so the 4-bit cases need no looser tolerance. The backward gets the reference S, so
  it is tested on its own.
"""

from __future__ import annotations

import pytest
import torch

import fastlora  # noqa: F401  (registers the ops)
from fastlora import nf4, reference_lora
from fastlora.kernels import lora_linear as tl_lora

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
TOL = {F32: 1e-5, BF16: 1e-2, F16: 2e-3}
OPS = torch.ops.fastlora


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def _close(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert got.dtype == ref.dtype and got.shape == ref.shape, f"{what}: {got.dtype}{tuple(got.shape)} vs " \
                                                              f"{ref.dtype}{tuple(ref.shape)}"  # fmt: skip
    if ref.numel() == 0:
        return
    g, r = got.double(), ref.double()
    assert torch.isfinite(g).all(), f"{what}: non-finite values"
    tol = TOL[ref.dtype]
    bound = tol * (r.abs() + r.abs().max())
    err = (g - r).abs()
    assert bool((err <= bound).all()), (f"{what}: max |err| {err.max().item():.3g} at {err.argmax().item()}, "
                                        f"max |ref| {r.abs().max().item():.3g}, tol {tol}")  # fmt: skip


def _dropout_seed(seed: int) -> int:
    return (seed * 0x9E3779B97F4A7C15 + 12345) % (1 << 63)  # uses both 32-bit halves of the key


# --------------------------------------------------------------------------------------------------
# LoRA dropout
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.97])
def test_dropout_bitwise(seed, dtype, p):
    for shape in [(1,), (3,), (1027,), (37, 71), (2, 5, 129)]:
        x = (torch.randn(shape) * 3).to(dtype).to(DEVICE)
        s = _dropout_seed(seed + len(shape))
        got = OPS.lora_dropout_triton(x, p, s)
        ref = OPS.lora_dropout_reference(x, p, s)
        assert got.shape == ref.shape and got.dtype == ref.dtype
        assert torch.equal(_bits(got), _bits(ref)), (shape, p)
    kept = (got != 0).double().mean().item()
    assert abs(kept - (1 - p)) < 0.05


def test_dropout_edge_values_and_seeds():
    x = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, 3e38, -1.5] * 16).to(DEVICE)
    for s in (0, 1, (1 << 32) - 1, 1 << 32, (1 << 63) - 1):
        for dtype in (F32, BF16, F16):
            xd = x.to(dtype)
            got, ref = OPS.lora_dropout_triton(xd, 0.3, s), OPS.lora_dropout_reference(xd, 0.3, s)
            # NaN stays NaN; its payload after rounding is the device's (cvt.rn on a GPU, torch's own).
            nan = ref.isnan()
            assert torch.equal(got.isnan(), nan), (s, dtype)
            assert torch.equal(_bits(got)[~nan], _bits(ref)[~nan]), (s, dtype)
    empty = torch.empty(0, 4, device=DEVICE)
    assert OPS.lora_dropout_triton(empty, 0.5, 3).shape == (0, 4)


def test_keep_mask_kernel_matches_reference(seed):
    from fastlora.kernels.lora_dropout import dropout_keep_mask

    s = _dropout_seed(seed)
    for numel, p in ((1, 0.5), (37 * 37, 0.2), (4099, 0.9)):
        got = dropout_keep_mask(numel, p, s, torch.device(DEVICE)).bool().cpu()
        assert torch.equal(got, reference_lora.dropout_keep_mask(s, (numel,), p))


# --------------------------------------------------------------------------------------------------
# LoRA linear forward / backward
# --------------------------------------------------------------------------------------------------


def _inputs(m, k, n, r, xdt, adt, quant, bias, *, blocksize=64, double_quant=True):
    x = torch.randn(m, k).to(xdt)
    w = torch.randn(n, k) / k**0.5
    a = (torch.randn(r, k) / k**0.5).to(adt)
    b = torch.randn(n, r).to(adt)  # (PEFT initialises B to 0; a random B tests the up-projection)
    bias_t = torch.randn(n).to(xdt) if bias else None
    if quant is None:
        weight, absmax = w.to(xdt), None
    else:
        q = nf4.quantize(w.to(xdt), blocksize, quant, double_quant)
        weight, absmax = q.packed_bytes(), q.absmax_float()
    g = torch.randn(m, n).to(xdt)
    to = lambda t: None if t is None else t.to(DEVICE)
    return [to(t) for t in (x, weight, absmax, a, b, bias_t, g)]


def _run_case(m, k, n, r, xdt, adt, *, quant=None, bias=True, rounding="linear", p=0.0, blocksize=64,
              double_quant=True, scaling=0.75, seed=0, needs=(True, True, True)):
    x, weight, absmax, a, b, bias_t, g = _inputs(m, k, n, r, xdt, adt, quant, bias, blocksize=blocksize,
                                                 double_quant=double_quant)  # fmt: skip
    qt = quant or "nf4"
    s = _dropout_seed(seed)
    fwd_args = (x, weight, absmax, blocksize, qt, n, a, b, scaling, bias_t, p, s, rounding)
    y, S = OPS.lora_linear_fwd_triton(*fwd_args)
    y_ref, S_ref = OPS.lora_linear_fwd_reference(*fwd_args)
    _close(S, S_ref, "S")
    _close(y, y_ref, "y")
    bwd_args = (g, x, S_ref, weight, absmax, blocksize, qt, n, a, b, scaling, p, s, *needs)
    got = OPS.lora_linear_bwd_triton(*bwd_args)
    # (the plain function: the reference custom op returns one empty tensor for all outputs not needed,
    # which torch.library rejects as aliased outputs)
    ref = reference_lora.lora_linear_bwd(*bwd_args)
    for name, gt, rf, need in zip(("dx", "dA", "dB"), got, ref, needs, strict=True):
        if need:
            _close(gt, rf, name)
        else:
            assert gt.shape == (0,) and rf.shape == (0,), name


DTYPE_PAIRS = [(F32, F32), (BF16, F32), (BF16, BF16), (F16, F32), (F16, F16)]
_ID = {F32: "f32", BF16: "bf16", F16: "f16"}


@pytest.mark.parametrize(("xdt", "adt"), DTYPE_PAIRS, ids=lambda d: _ID[d])
@pytest.mark.parametrize(
    ("r", "bias", "rounding", "p"),
    [(8, True, "linear", 0.25), (1, False, "linear4bit", 0.0), (64, True, "linear4bit", 0.1)],
    ids=["r8-bias-linear-p.25", "r1-linear4bit-p0", "r64-bias-linear4bit-p.1"],
)
def test_dense(seed, xdt, adt, r, bias, rounding, p):
    _run_case(37, 72, 200, r, xdt, adt, bias=bias, rounding=rounding, p=p, seed=seed)


@pytest.mark.parametrize(("xdt", "adt"), [(F32, F32), (BF16, F32), (F16, F16)], ids=lambda d: _ID[d])
def test_dense_odd_k_dropout(seed, xdt, adt):
    # K % 4 != 0: the kernels read a keep mask generated for the call instead of running Philox.
    _run_case(21, 37, 45, 8, xdt, adt, p=0.3, seed=seed)


# (quant, double_quant, x dtype, adapter dtype, K, blocksize, rank, path)
W4_CASES = [
    ("nf4", True, BF16, F32, 128, 64, 8, "small"),
    ("nf4", False, F32, F32, 128, 128, 16, "small"),
    ("fp4", True, F16, F16, 128, 64, 64, "small"),
    ("fp4", False, BF16, BF16, 128, 64, 1, "small"),
    ("nf4", True, BF16, F32, 128, 64, 8, "large"),
    ("fp4", True, F32, F32, 72, 64, 8, "large"),
    ("nf4", False, F16, F32, 72, 32, 16, "large"),
]


@pytest.mark.parametrize(("quant", "dq", "xdt", "adt", "k", "blocksize", "r", "path"), W4_CASES,
                         ids=[f"{c[0]}-dq{int(c[1])}-{_ID[c[2]]}-{_ID[c[3]]}-k{c[4]}-bs{c[5]}-r{c[6]}-{c[7]}"
                              for c in W4_CASES])  # fmt: skip
def test_4bit(seed, monkeypatch, quant, dq, xdt, adt, k, blocksize, r, path):
    m, n = 37, 200
    monkeypatch.setattr(tl_lora, "SMALL_M", m if path == "small" else 0)
    assert tl_lora.uses_fused_4bit(m, k, blocksize) == (path == "small")
    _run_case(m, k, n, r, xdt, adt, quant=quant, double_quant=dq, blocksize=blocksize, rounding="linear4bit",
              p=0.2, seed=seed)  # fmt: skip


def test_4bit_paths_are_taken(seed, monkeypatch):
    # The workspace path decodes the weight with the dequantize kernel; the fused path never does.
    calls = []
    real = tl_lora.dequantize_4bit
    monkeypatch.setattr(tl_lora, "dequantize_4bit", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    x, weight, absmax, a, b, bias_t, _ = _inputs(20, 64, 40, 4, F32, F32, "nf4", True)
    args = (x, weight, absmax, 64, "nf4", 40, a, b, 1.0, bias_t, 0.0, 0, "linear4bit")
    monkeypatch.setattr(tl_lora, "SMALL_M", 20)
    y_small, _ = OPS.lora_linear_fwd_triton(*args)
    assert not calls
    monkeypatch.setattr(tl_lora, "SMALL_M", 19)
    y_large, _ = OPS.lora_linear_fwd_triton(*args)
    assert len(calls) == 1
    _close(y_small, y_large, "small vs large path")


@pytest.mark.parametrize("quant", [None, "nf4"])
@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True),
                                   (False, True, True), (False, False, False)],
                         ids=lambda n: "dx" * n[0] + "dA" * n[1] + "dB" * n[2] or "none")  # fmt: skip
def test_backward_need_flags(seed, monkeypatch, quant, needs):
    monkeypatch.setattr(tl_lora, "SMALL_M", 64)
    _run_case(19, 64, 48, 4, BF16, F32, quant=quant, p=0.1, seed=seed, needs=needs)


@pytest.mark.parametrize("quant", [None, "fp4"])
def test_zero_tokens(quant):
    x, weight, absmax, a, b, bias_t, g = _inputs(0, 64, 48, 8, BF16, F32, quant, True)
    fwd = (x, weight, absmax, 64, quant or "nf4", 48, a, b, 0.5, bias_t, 0.1, 7, "linear")
    y, S = OPS.lora_linear_fwd_triton(*fwd)
    assert y.shape == (0, 48) and y.dtype == BF16 and S.shape == (0, 8) and S.dtype == F32
    bwd = (g, x, S, weight, absmax, 64, quant or "nf4", 48, a, b, 0.5, 0.1, 7, True, True, True)
    got, ref = OPS.lora_linear_bwd_triton(*bwd), reference_lora.lora_linear_bwd(*bwd)
    for gt, rf in zip(got, ref, strict=True):
        assert gt.shape == rf.shape and gt.dtype == rf.dtype and not gt.any()


def test_autograd_op_on_triton_backend(seed):
    # The public op (fastlora.ops.lora_linear) with the Triton kernels behind forward and backward.
    from fastlora import ops

    x = torch.randn(3, 5, 64, device=DEVICE, requires_grad=True)
    q = nf4.quantize(torch.randn(40, 64), 64, "nf4", True).to(DEVICE)
    a = (torch.randn(8, 64, device=DEVICE) / 8).requires_grad_()
    b = torch.randn(40, 8, device=DEVICE).requires_grad_()
    outs = {}
    for backend in ("triton", "reference"):
        torch.manual_seed(seed)
        y = ops.lora_linear(x, q, a, b, 2.0, dropout_p=0.2, backend=backend)
        grads = torch.autograd.grad(y.square().sum(), (x, a, b))
        outs[backend] = (y, *grads)
    for name, got, ref in zip(("y", "dx", "dA", "dB"), outs["triton"], outs["reference"], strict=True):
        _close(got.detach(), ref.detach(), name)


def test_bad_arguments():
    x, weight, absmax, a, b, bias_t, _ = _inputs(4, 64, 48, 8, F32, F32, None, True)
    with pytest.raises(TypeError):
        tl_lora.lora_linear_fwd(x.double(), weight, None, 64, "nf4", 48, a, b, 1.0, None, 0.0, 0, "linear")
    with pytest.raises(ValueError):
        tl_lora.lora_linear_fwd(x, weight, None, 64, "nf4", 48, a, b, 1.0, None, 0.0, 0, "peft")
    with pytest.raises(ValueError):
        tl_lora.lora_linear_fwd(x, weight, None, 64, "nf4", 47, a, b, 1.0, None, 0.0, 0, "linear")


@pytest.mark.parametrize("quant", [None, "nf4"])
@pytest.mark.parametrize(("xdt", "adt"), [(F32, F32), (BF16, F32), (F16, F16)], ids=["f32", "bf16-f32", "f16"])
@pytest.mark.parametrize("rounding", ["linear", "linear4bit"])
@pytest.mark.parametrize("m", [5, 37])
def test_torch_gemm_path(seed, monkeypatch, quant, xdt, adt, rounding, m):
    """GEMMS="torch" (the default on a GPU): the workspace path for every M, torch's GEMMs for x·Wᵀ,
    G·W, G·B and Gᵀ·S around the Triton S / add / dA / dropout kernels, against the reference."""
    monkeypatch.setattr(tl_lora, "GEMMS", "torch")
    _run_case(m, 128, 200, 8, xdt, adt, quant=quant, double_quant=True, blocksize=64, rounding=rounding, p=0.2,
              seed=seed)  # fmt: skip


def test_large_m_gemm_setting_is_checked(monkeypatch):
    monkeypatch.setattr(tl_lora, "GEMMS", "cutlass")
    x, weight, absmax, a, b, bias_t, _ = _inputs(20, 64, 40, 4, F32, F32, None, True)
    with pytest.raises(ValueError, match="GEMMS"):
        OPS.lora_linear_fwd_triton(x, weight, absmax, 64, "nf4", 40, a, b, 1.0, bias_t, 0.0, 0, "linear")
