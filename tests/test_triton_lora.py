"""The Triton LoRA kernels (kernels/lora_dropout.py, kernels/lora_linear.py) against the torch reference.

Without a GPU the kernels run on CPU tensors under Triton's interpreter (conftest.py sets
TRITON_INTERPRET=1 before anything imports Triton); with one they run compiled on CUDA tensors.
Shapes are tiny and odd so that every kernel sees several tiles, partial tiles and several loop
iterations under the interpreter's small fixed configuration.

The launchers are called directly (the custom ops of fastlora/ops/ only pass their arguments on) with
the seed as the kernels take it, an int64 tensor with one element; the reference (fastlora/reference_lora.py)
gets the same seed value.

Comparisons:
* ``lora_dropout`` vs ``reference_lora.lora_dropout``: bitwise (the Philox mask and the
  rounding of x * scale are one definition), also the keep mask the GEMMs read for K % 4 != 0.
* ``lora_linear_fwd`` / ``lora_linear_bwd`` vs the reference's: the GEMMs sum in another
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
from fastlora.kernels import lora_dropout as tl_drop
from fastlora.kernels import lora_linear as tl_lora

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
TOL = {F32: 1e-5, BF16: 1e-2, F16: 2e-3}


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


# The share of a 16-bit y that may differ from the reference in the last bit (fp32 sums in another order). The
# tolerance of _close alone would pass the other rounding rule ("linear" vs "linear4bit" differ on 12-30% of
# the elements with fp32 adapters), so y's bits are counted too.
Y_DIFFERING_FRACTION = 0.02


def _close_y(y: torch.Tensor, y_ref: torch.Tensor) -> None:
    _close(y, y_ref, "y")
    if y.dtype != F32 and y.numel():
        differing = (y != y_ref).double().mean().item()
        assert differing <= Y_DIFFERING_FRACTION, f"y: {differing:.1%} of the elements differ from the reference"


def _dropout_seed(seed: int) -> int:
    return (seed * 0x9E3779B97F4A7C15 + 12345) % (1 << 63)  # uses both 32-bit halves of the key


def _st(value: int, device=DEVICE) -> torch.Tensor:
    """The seed as the launchers take it: an int64 0-dim tensor (on the inputs' device)."""
    return torch.tensor(value, dtype=torch.int64, device=device)


# --------------------------------------------------------------------------------------------------
# LoRA dropout
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.97])
def test_dropout_bitwise(seed, dtype, p):
    for shape in [(1,), (3,), (1027,), (37, 71), (2, 5, 129)]:
        x = (torch.randn(shape) * 3).to(dtype).to(DEVICE)
        s = _dropout_seed(seed + len(shape))
        got = tl_drop.lora_dropout(x, p, _st(s))
        ref = reference_lora.lora_dropout(x, p, s)
        assert got.shape == ref.shape and got.dtype == ref.dtype
        assert torch.equal(_bits(got), _bits(ref)), (shape, p)
    kept = (got != 0).double().mean().item()
    assert abs(kept - (1 - p)) < 0.05


def test_dropout_edge_values_and_seeds():
    x = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, 3e38, -1.5] * 16).to(DEVICE)
    for s in (0, 1, (1 << 32) - 1, 1 << 32, (1 << 63) - 1):
        for dtype in (F32, BF16, F16):
            xd = x.to(dtype)
            got, ref = tl_drop.lora_dropout(xd, 0.3, _st(s)), reference_lora.lora_dropout(xd, 0.3, s)
            # NaN stays NaN; its payload after rounding is the device's (cvt.rn on a GPU, torch's own).
            nan = ref.isnan()
            assert torch.equal(got.isnan(), nan), (s, dtype)
            assert torch.equal(_bits(got)[~nan], _bits(ref)[~nan]), (s, dtype)
    empty = torch.empty(0, 4, device=DEVICE)
    assert tl_drop.lora_dropout(empty, 0.5, _st(3)).shape == (0, 4)


def test_keep_mask_kernel_matches_reference(seed):
    s = _dropout_seed(seed)
    for numel, p in ((1, 0.5), (37 * 37, 0.2), (4099, 0.9)):
        got = tl_drop.dropout_keep_mask(numel, p, _st(s), torch.device(DEVICE)).bool().cpu()
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
    fwd_args = (x, weight, absmax, blocksize, qt, n, a, b, scaling, bias_t, p)
    y, S = tl_lora.lora_linear_fwd(*fwd_args, _st(s), rounding)
    y_ref, S_ref = reference_lora.lora_linear_fwd(*fwd_args, s, rounding)
    _close(S, S_ref, "S")
    _close_y(y, y_ref)
    bwd_args = (g, x, S_ref, weight, absmax, blocksize, qt, n, a, b, scaling, p)
    got = tl_lora.lora_linear_bwd(*bwd_args, _st(s), *needs)
    ref = reference_lora.lora_linear_bwd(*bwd_args, s, *needs)
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
    [(8, True, "linear", 0.25), (1, False, "linear4bit", 0.0), (64, True, "linear4bit", 0.1),
     (100, False, "linear", 0.1), (256, True, "linear4bit", 0.0)],
    ids=["r8-bias-linear-p.25", "r1-linear4bit-p0", "r64-bias-linear4bit-p.1", "r100-linear-p.1",
         "r256-bias-linear4bit-p0"],
)
def test_dense(seed, xdt, adt, r, bias, rounding, p):
    _run_case(37, 72, 200, r, xdt, adt, bias=bias, rounding=rounding, p=p, seed=seed)


def test_y_check_tells_the_rounding_rules_apart(seed):
    """bf16 x, fp32 adapters: y under the other class's rounding passes _close's tolerance but not the bit count."""
    x, weight, _, a, b, bias_t, _ = _inputs(37, 72, 200, 16, BF16, F32, None, True)
    args = (x, weight, None, 64, "nf4", 200, a, b, 0.75, bias_t, 0.0)
    y, _ = tl_lora.lora_linear_fwd(*args, _st(0), "linear")
    y_ref, _ = reference_lora.lora_linear_fwd(*args, 0, "linear4bit")
    _close(y, y_ref, "y")
    with pytest.raises(AssertionError, match="differ from the reference"):
        _close_y(y, y_ref)


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
    ("nf4", True, BF16, F32, 128, 64, 256, "small"),  # ranks above 64: other S / dS block configurations
    ("fp4", False, F32, F32, 72, 64, 129, "large"),
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
    args = (x, weight, absmax, 64, "nf4", 40, a, b, 1.0, bias_t, 0.0, _st(0), "linear4bit")
    monkeypatch.setattr(tl_lora, "SMALL_M", 20)
    y_small, _ = tl_lora.lora_linear_fwd(*args)
    assert not calls
    monkeypatch.setattr(tl_lora, "SMALL_M", 19)
    y_large, _ = tl_lora.lora_linear_fwd(*args)
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
    fwd = (x, weight, absmax, 64, quant or "nf4", 48, a, b, 0.5, bias_t, 0.1, _st(7), "linear")
    y, S = tl_lora.lora_linear_fwd(*fwd)
    assert y.shape == (0, 48) and y.dtype == BF16 and S.shape == (0, 8) and S.dtype == F32
    bwd = (g, x, S, weight, absmax, 64, quant or "nf4", 48, a, b, 0.5, 0.1)
    got = tl_lora.lora_linear_bwd(*bwd, _st(7), True, True, True)
    ref = reference_lora.lora_linear_bwd(*bwd, 7, True, True, True)
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
        tl_lora.lora_linear_fwd(x.double(), weight, None, 64, "nf4", 48, a, b, 1.0, None, 0.0, _st(0), "linear")
    with pytest.raises(ValueError):
        tl_lora.lora_linear_fwd(x, weight, None, 64, "nf4", 48, a, b, 1.0, None, 0.0, _st(0), "peft")
    with pytest.raises(ValueError):
        tl_lora.lora_linear_fwd(x, weight, None, 64, "nf4", 47, a, b, 1.0, None, 0.0, _st(0), "linear")


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


@pytest.mark.parametrize("adapter_gemms", ["auto", "fp32"])
@pytest.mark.parametrize("rounding", ["linear", "linear4bit"])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_torch_gemm_path_adapter_gemms(seed, monkeypatch, adapter_gemms, rounding, p):
    """bf16 x, fp32 adapters on the torch path: the adapter GEMMs over bf16 pieces (the default,
    kernels/adapter_gemms.py) and the fp32 ones both match the reference; only the default splits."""
    monkeypatch.setattr(tl_lora, "GEMMS", "torch")
    monkeypatch.setattr(tl_lora, "ADAPTER_GEMMS", adapter_gemms)
    splits = []
    pieces = tl_lora.adapter_gemms.bf16_pieces
    monkeypatch.setattr(tl_lora.adapter_gemms, "bf16_pieces", lambda t: splits.append(t.shape) or pieces(t))
    _run_case(37, 72, 200, 8, BF16, F32, quant="nf4", rounding=rounding, p=p, seed=seed)
    # S, y's term; dS, dB, dA and dx's term (two pieces each)
    assert len(splits) == (8 if adapter_gemms == "auto" else 0), splits


@pytest.mark.skipif(not torch.cuda.is_available(), reason="autotuning benchmarks configurations on a GPU")
def test_triton_gemms_autotune_per_shape(seed, monkeypatch):
    """GEMMS="triton" with AUTOTUNE on (the default; bench/gpu_check.sh turns it off for time): triton.autotune
    times the GEMM configurations per (M bucket, N, K) and keeps the best, fused 4-bit decode and dense alike,
    and the results still match the reference."""
    monkeypatch.setattr(tl_lora, "GEMMS", "triton")
    monkeypatch.setattr(tl_lora, "AUTOTUNE", True)
    monkeypatch.setattr(tl_lora, "_TUNED", {})
    for m, quant in ((40, "nf4"), (300, None), (300, "nf4")):  # in-loop decode; dense; decoded workspace
        _run_case(m, 128, 256, 16, BF16, F32, quant=quant, p=0.1, seed=seed)
    tuned = list(tl_lora._TUNED.values())
    assert {kind for _, kind, _ in tl_lora._TUNED} == {"w4", "dense"}
    assert all(t.cache for t in tuned)  # a best configuration recorded for each key seen


def test_adapter_gemms_setting_is_checked(monkeypatch):
    monkeypatch.setattr(tl_lora, "GEMMS", "torch")
    monkeypatch.setattr(tl_lora, "ADAPTER_GEMMS", "tf32")
    x, weight, absmax, a, b, bias_t, _ = _inputs(20, 64, 40, 4, BF16, F32, None, True)
    with pytest.raises(ValueError, match="ADAPTER_GEMMS"):
        tl_lora.lora_linear_fwd(x, weight, absmax, 64, "nf4", 40, a, b, 1.0, bias_t, 0.0, _st(0), "linear")


def test_inf_in_x_on_the_pieces_path(seed, monkeypatch):
    """An Inf in bf16 x makes its row of y non-finite (the pieces' products give NaN where fp32 GEMMs give
    ±Inf, a documented difference); the other rows are unaffected."""
    monkeypatch.setattr(tl_lora, "GEMMS", "torch")
    x, weight, _, a, b, bias_t, _ = _inputs(9, 72, 40, 4, BF16, F32, None, True)
    x[4, 7] = float("inf")
    args = (x, weight, None, 64, "nf4", 40, a, b, 0.75, bias_t, 0.0)
    y, S = tl_lora.lora_linear_fwd(*args, _st(0), "linear")
    y_ref, _ = reference_lora.lora_linear_fwd(*args, 0, "linear")
    assert not torch.isfinite(y[4]).any() and not torch.isfinite(S[4]).any()
    rest = [i for i in range(9) if i != 4]
    _close_y(y[rest], y_ref[rest])


def test_large_m_gemm_setting_is_checked(monkeypatch):
    monkeypatch.setattr(tl_lora, "GEMMS", "cutlass")
    x, weight, absmax, a, b, bias_t, _ = _inputs(20, 64, 40, 4, F32, F32, None, True)
    with pytest.raises(ValueError, match="GEMMS"):
        tl_lora.lora_linear_fwd(x, weight, absmax, 64, "nf4", 40, a, b, 1.0, bias_t, 0.0, _st(0), "linear")


# --------------------------------------------------------------------------------------------------
# The seed tensor
# --------------------------------------------------------------------------------------------------


def _launchers() -> dict:
    """Each launcher that takes a seed, as a function of the seed (small valid inputs otherwise)."""
    x, weight, _, a, b, bias_t, g = _inputs(6, 16, 8, 2, F32, F32, None, True)
    S = torch.zeros(6, 2, device=DEVICE)
    return {
        "lora_dropout": lambda s: tl_drop.lora_dropout(x, 0.5, s),
        "lora_dropout-p0": lambda s: tl_drop.lora_dropout(x, 0.0, s),
        "dropout_keep_mask": lambda s: tl_drop.dropout_keep_mask(10, 0.5, s, x.device),
        "lora_linear_fwd": lambda s: tl_lora.lora_linear_fwd(x, weight, None, 64, "nf4", 8, a, b, 1.0, bias_t, 0.1,
                                                             s, "linear"),
        "lora_linear_fwd-p0": lambda s: tl_lora.lora_linear_fwd(x, weight, None, 64, "nf4", 8, a, b, 1.0, bias_t,
                                                                0.0, s, "linear"),
        "lora_linear_bwd": lambda s: tl_lora.lora_linear_bwd(g, x, S, weight, None, 64, "nf4", 8, a, b, 1.0, 0.1, s,
                                                             True, True, True),
    }  # fmt: skip


BAD_SEEDS = {
    "int": (lambda: 5, TypeError, r"seed must be a torch\.Tensor"),
    "float": (lambda: torch.tensor(5.0), TypeError, "seed must be an int64 tensor"),
    "int32": (lambda: torch.tensor(5, dtype=torch.int32), TypeError, "seed must be an int64 tensor"),
    "two-elements": (lambda: torch.tensor([5, 6]), ValueError, "seed must have exactly one element"),
    "empty": (lambda: torch.empty(0, dtype=torch.int64), ValueError, "seed must have exactly one element"),
    "negative-cpu": (lambda: torch.tensor(-1), ValueError, r"seed must be in \[0, 2\^63\), got -1"),
    "other-device": (lambda: torch.tensor(5, device="meta"), ValueError, "seed is on meta"),
}


LAUNCHERS = ["lora_dropout", "lora_dropout-p0", "dropout_keep_mask", "lora_linear_fwd", "lora_linear_fwd-p0",
             "lora_linear_bwd"]  # fmt: skip


def test_launcher_list_is_complete():
    assert sorted(_launchers()) == sorted(LAUNCHERS)


@pytest.mark.parametrize("bad", BAD_SEEDS.keys())
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_bad_seed(launcher, bad):
    # Checked on every path, also where p = 0 never reads the seed.
    make, exc, message = BAD_SEEDS[bad]
    with pytest.raises(exc, match=message):
        _launchers()[launcher](make())


@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("shape", [(), (1,), (1, 1)], ids=["0-dim", "(1,)", "(1,1)"])
def test_good_seed_shapes_and_devices(launcher, shape):
    # Any one-element int64 tensor; a CPU seed with GPU inputs is copied to the device.
    run = _launchers()[launcher]
    ref = run(_st(12345))
    for device in dict.fromkeys((DEVICE, "cpu")):
        got = run(torch.full(shape, 12345, dtype=torch.int64, device=device))
        for gt, rf in zip(got if isinstance(got, tuple) else (got,), ref if isinstance(ref, tuple) else (ref,),
                          strict=True):  # fmt: skip
            if gt.dtype in TOL:  # (dA, dB sum fp32 atomics: on a GPU their last bits may vary)
                _close(gt, rf, f"{launcher} {shape} {device}")
            else:
                assert torch.equal(gt, rf), (launcher, shape, device)


def test_dropout_seed_is_read_at_run_time(seed):
    """The kernels load the seed from memory at each launch (what a CUDA graph replay relies on): the
    same tensor object, refilled in place, gives the mask of its new value."""
    x = torch.randn(37, 72).to(BF16).to(DEVICE)
    st = _st(_dropout_seed(seed))
    outs, masks = [], []
    for value in (_dropout_seed(seed), _dropout_seed(seed + 1), 0, (1 << 63) - 1):
        st.fill_(value)
        out = tl_drop.lora_dropout(x, 0.3, st)
        assert torch.equal(_bits(out), _bits(reference_lora.lora_dropout(x, 0.3, value))), value
        mask = tl_drop.dropout_keep_mask(x.numel(), 0.3, st, x.device).bool().cpu()
        assert torch.equal(mask, reference_lora.dropout_keep_mask(value, (x.numel(),), 0.3)), value
        outs.append(out)
        masks.append(mask)
    assert all(not torch.equal(masks[i], masks[i + 1]) for i in range(len(masks) - 1))


@pytest.mark.parametrize(("k", "gemms"), [(72, "triton"), (37, "triton"), (72, "torch"), (37, "torch")],
                         ids=["k72-triton", "k37-mask-triton", "k72-torch", "k37-mask-torch"])  # fmt: skip
def test_linear_seed_is_read_at_run_time(seed, monkeypatch, k, gemms):
    """lora_linear_fwd / _bwd (Philox in the GEMM kernels for K % 4 == 0, the keep-mask kernel otherwise;
    the Triton or the torch GEMM path) with one seed tensor refilled in place between calls."""
    monkeypatch.setattr(tl_lora, "GEMMS", gemms)
    m, n, r, p = 21, 40, 4, 0.3
    x, weight, _, a, b, bias_t, g = _inputs(m, k, n, r, BF16, F32, None, True)
    st = _st(0)
    s_values = []
    for value in (_dropout_seed(seed), _dropout_seed(seed + 1)):
        st.fill_(value)  # the same tensor object for both values
        fwd = (x, weight, None, 64, "nf4", n, a, b, 0.75, bias_t, p)
        y, S = tl_lora.lora_linear_fwd(*fwd, st, "linear")
        y_ref, S_ref = reference_lora.lora_linear_fwd(*fwd, value, "linear")
        _close(S, S_ref, "S")
        _close_y(y, y_ref)
        bwd = (g, x, S_ref, weight, None, 64, "nf4", n, a, b, 0.75, p)
        got = tl_lora.lora_linear_bwd(*bwd, st, True, True, True)
        ref = reference_lora.lora_linear_bwd(*bwd, value, True, True, True)
        for name, gt, rf in zip(("dx", "dA", "dB"), got, ref, strict=True):
            _close(gt, rf, name)
        s_values.append(S_ref)
    assert not torch.equal(s_values[0], s_values[1])  # the two seeds give different masks


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_replay_reads_the_current_seed(seed):
    x = torch.randn(37, 72, device="cuda").to(BF16)
    st = _st(_dropout_seed(seed), "cuda")
    tl_drop.lora_dropout(x, 0.3, st)  # compile before the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tl_drop.lora_dropout(x, 0.3, st)
    for value in (_dropout_seed(seed + 1), _dropout_seed(seed + 2)):
        st.fill_(value)
        graph.replay()
        assert torch.equal(_bits(out), _bits(reference_lora.lora_dropout(x, 0.3, value))), value
