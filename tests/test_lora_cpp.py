"""The C++ CPU kernels of the LoRA ops (torch.ops.fastlora.lora_dropout / lora_linear_fwd /
lora_linear_bwd) against the torch reference ops (``*_reference``).

Tolerances (reference = fastlora/reference_lora.py, fp32 compute in both):
  * lora_dropout: bitwise, every dtype.
  * fp32 results: |got - want| <= 1e-5 * |want| + 1e-6 * max|want| elementwise (GEMM summation order
    is the only difference), and max|got - want| / max|want| <= 2e-6.
  * bf16 / fp16 results: at most one rounding step apart, i.e. |got - want| <= rtol * |want| +
    atol * max|want| with rtol = atol = 2^-7 (bf16) or 2^-10 (fp16) -- one ulp of the dtype relative
    to the value, or to the largest value where an fp32 sum cancels -- and at most 2% of the elements
    differ at all.
  * bf16 GEMM mode (bf16 x; FASTLORA_CPU_BF16_GEMM=1 forces it on, =0 off; the autouse fixture below
    turns it off unless a test asks for it, so that no test depends on the machine): the same bf16
    tolerance, against the reference for y, S, dA, dB, and for dx against rnd(rnd(G·W) + LoRA term),
    the rounding of that mode (PEFT's sum of two bf16 gradients). The 2% bound on differing elements
    is what catches a wrong rounding: dx rounded once (the fp32 mode) differs from it in 13-30% of
    the elements here (more than 5% asserted).
"""

import math

import pytest
import torch

from fastlora import backends, nf4

pytestmark = pytest.mark.skipif(not backends.available("cpu")["cpp"], reason="compiled extension not available")

OPS = torch.ops.fastlora  # the ops take the seed as an int64 tensor: torch.tensor(seed)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ULP = {torch.float32: None, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


@pytest.fixture(autouse=True)
def _bf16_gemm_off(monkeypatch):
    """fp32 GEMMs unless a test forces the bf16 GEMM mode itself (the default depends on the CPU)."""
    monkeypatch.setenv("FASTLORA_CPU_BF16_GEMM", "0")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


def assert_matches(got: torch.Tensor, want: torch.Tensor, what: str = ""):
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, want.shape, got.dtype, want.dtype)
    if want.numel() == 0:
        return
    g, w = got.double(), want.double()
    scale = w.abs().max().item()
    if want.dtype == torch.float32:
        tol = 1e-5 * w.abs() + 1e-6 * scale
        assert bool(((g - w).abs() <= tol).all()), f"{what}: max err {(g - w).abs().max().item():.3g} (scale {scale})"
        assert (g - w).abs().max().item() <= 2e-6 * max(scale, 1e-30), what
    else:
        u = ULP[want.dtype]
        tol = u * w.abs() + u * scale
        err = (g - w).abs()
        assert bool((err <= tol).all()), f"{what}: max err {err.max().item():.3g} (scale {scale})"
        assert (got != want).float().mean().item() <= 0.02, f"{what}: {(got != want).float().mean().item():.3%} differ"


# ---------------------------------------------------------------------------------------------
# lora_dropout


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (3,), (5,), (31,), (4097,), (37, 111), (2, 3, 1029)])
def test_dropout_bitwise(seed, dtype, shape):
    x = torch.randn(shape).to(dtype)
    flat = x.view(-1)
    flat[:: max(1, flat.numel() // 3)] = -0.0
    if flat.numel() > 4:
        flat[1], flat[2] = float("inf"), -float("inf")
    for p in (0.0, 0.1, 0.5, 0.97):
        s = seed * 7919 + int(p * 100)
        got, want = OPS.lora_dropout(x, p, torch.tensor(s)), OPS.lora_dropout_reference(x, p, torch.tensor(s))
        assert got.shape == x.shape and got.dtype == dtype
        assert torch.equal(_bits(got), _bits(want)), (p, s)


def test_dropout_extreme_seeds_and_probabilities(seed):
    x = torch.randn(999)
    for s in (0, 1, 2**32 - 1, 2**32, 2**63 - 1, seed):
        for p in (1e-9, 2.0**-24, 0.5, 1 - 2.0**-25):
            got, want = OPS.lora_dropout(x, p, torch.tensor(s)), OPS.lora_dropout_reference(x, p, torch.tensor(s))
            assert torch.equal(_bits(got), _bits(want)), (s, p)
    assert torch.equal(OPS.lora_dropout(x, 1 - 2.0**-25, torch.tensor(3)), torch.zeros_like(x))


def test_dropout_nan_and_noncontiguous(seed):
    x = torch.randn(64, 48)
    x[3, 5] = float("nan")
    y = x.t()  # non-contiguous: element order is the logical row-major order
    for p in (0.0, 0.3):
        got, want = OPS.lora_dropout(y, p, torch.tensor(seed)), OPS.lora_dropout_reference(y, p, torch.tensor(seed))
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def test_dropout_keeps_the_right_fraction(seed):
    x = torch.ones(1 << 16)
    for p in (0.1, 0.5):
        kept = (OPS.lora_dropout(x, p, torch.tensor(seed)) != 0).float().mean().item()
        assert abs(kept - (1 - p)) < 0.01


# ---------------------------------------------------------------------------------------------
# lora_linear_fwd / lora_linear_bwd


WEIGHTS = ["dense", "nf4", "nf4-dq", "fp4", "fp4-dq"]
# (M, K, N, blocksize, rank, bias, rounding, dropout_p): K*N is not a multiple of the blocksize in
# all but the first (blocks straddle rows), and 37x73x201 has an odd number of codes.
CONFIGS = [
    (111, 72, 200, 64, 8, True, "linear", 0.0),
    (111, 72, 200, 128, 64, False, "linear4bit", 0.3),
    (37, 73, 201, 64, 1, True, "linear4bit", 0.1),
    (37, 73, 201, 128, 8, False, "linear", 0.5),
]


def make_weight(kind: str, N: int, K: int, blocksize: int, dtype: torch.dtype):
    """(weight, absmax, blocksize, quant_type) as the ops take them."""
    w = torch.randn(N, K) / math.sqrt(K)
    if kind == "dense":
        return w.to(dtype), None, 64, "nf4"
    qt, dq = kind[:3], kind.endswith("-dq")
    q = nf4.quantize(w.to(dtype), blocksize, qt, dq)
    return q.packed_bytes(), q.absmax_float(), blocksize, qt


def make_case(kind, x_dtype, a_dtype, M, K, N, blocksize, rank, has_bias):
    x = torch.randn(M, K).to(x_dtype)
    weight, absmax, bs, qt = make_weight(kind, N, K, blocksize, x_dtype)
    A = (torch.randn(rank, K) / math.sqrt(K)).to(a_dtype)
    B = (torch.randn(N, rank) / math.sqrt(rank)).to(a_dtype)
    bias = torch.randn(N).to(x_dtype) if has_bias else None
    return x, weight, absmax, bs, qt, A, B, bias


def run_both(x, weight, absmax, bs, qt, A, B, bias, scaling, p, seed, rounding, needs=(True, True, True), g=None):
    N = B.shape[0]
    fwd_args = (x, weight, absmax, bs, qt, N, A, B, scaling, bias, p, torch.tensor(seed), rounding)
    y, S = OPS.lora_linear_fwd(*fwd_args)
    y_ref, S_ref = OPS.lora_linear_fwd_reference(*fwd_args)
    if g is None:
        g = torch.randn(x.shape[0], N).to(x.dtype)
    # Backward from the reference S so that a 1-ulp difference in S does not propagate into dB.
    bwd_args = (g, x, S_ref, weight, absmax, bs, qt, N, A, B, scaling, p, torch.tensor(seed), *needs)
    return (y, S, *OPS.lora_linear_bwd(*bwd_args)), (y_ref, S_ref, *OPS.lora_linear_bwd_reference(*bwd_args))


@pytest.mark.parametrize("kind", WEIGHTS)
@pytest.mark.parametrize("x_dtype", DTYPES)
@pytest.mark.parametrize("adapters", ["fp32", "x"])
def test_fwd_bwd_match_reference(seed, kind, x_dtype, adapters):
    a_dtype = torch.float32 if adapters == "fp32" else x_dtype
    for i, (M, K, N, bs, rank, has_bias, rounding, p) in enumerate(CONFIGS):
        case = make_case(kind, x_dtype, a_dtype, M, K, N, bs, rank, has_bias)
        got, want = run_both(*case, scaling=2.0 / rank**0.5, p=p, seed=seed + i, rounding=rounding)
        for name, a, b in zip(("y", "S", "dx", "dA", "dB"), got, want, strict=True):
            assert_matches(a, b, f"{name} config {i}")


@pytest.mark.parametrize("kind", ["dense", "nf4-dq"])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_tiling_edges(seed, monkeypatch, kind, x_dtype):
    """Tiny tiles (16 rows / columns of the weight per tile, ragged last tile) give the same results;
    K = 73 puts every row's dropout mask at a different Philox word offset."""
    monkeypatch.setenv("FASTLORA_CPU_TILE_BYTES", "4096")
    case = make_case(kind, x_dtype, torch.float32, 45, 73, 83, 64, 4, True)
    got, want = run_both(*case, scaling=0.5, p=0.2, seed=seed, rounding="linear4bit")
    for name, a, b in zip(("y", "S", "dx", "dA", "dB"), got, want, strict=True):
        assert_matches(a, b, name)


@pytest.mark.parametrize("x_dtype", DTYPES)
def test_portable_path_matches_avx2_bitwise(seed, monkeypatch, x_dtype):
    """FASTLORA_DISABLE_AVX2 forces the portable C++ path (read on every call): same bits."""
    x = torch.randn(3, 1001).to(x_dtype)
    case = make_case("fp4-dq", x_dtype, torch.float32, 29, 75, 66, 64, 8, True)
    outs = []
    for disable in ("0", "1"):
        monkeypatch.setenv("FASTLORA_DISABLE_AVX2", disable)
        torch.manual_seed(seed)
        g = torch.randn(29, 66).to(x_dtype)
        got, _ = run_both(*case, scaling=1.5, p=0.25, seed=seed, rounding="linear", g=g)
        outs.append([OPS.lora_dropout(x, 0.3, torch.tensor(seed)), *got])
    for a, b in zip(*outs, strict=True):
        assert torch.equal(_bits(a), _bits(b))


@pytest.mark.parametrize("kind", ["dense", "nf4"])
def test_empty_batch(seed, kind):
    for x_dtype in (torch.float32, torch.bfloat16):
        case = make_case(kind, x_dtype, torch.float32, 0, 72, 40, 64, 8, True)
        got, want = run_both(*case, scaling=1.0, p=0.1, seed=seed, rounding="linear")
        for name, a, b in zip(("y", "S", "dx", "dA", "dB"), got, want, strict=True):
            assert a.shape == b.shape and a.dtype == b.dtype, name
            assert torch.equal(a, b), name  # dA and dB are zeros


@pytest.mark.parametrize("kind", ["dense", "nf4"])
def test_degenerate_sizes(seed, kind):
    """K = 0, N = 0 and r = 0 give what the reference gives (zeros / empty), no crash."""
    for M, K, N, rank in ((5, 0, 7, 3), (5, 64, 0, 3), (5, 64, 7, 0)):
        case = make_case(kind, torch.float32, torch.float32, M, K, N, 64, rank, True)
        got, want = run_both(*case, scaling=1.0, p=0.1, seed=seed, rounding="linear")
        for name, a, b in zip(("y", "S", "dx", "dA", "dB"), got, want, strict=True):
            assert a.shape == b.shape and a.dtype == b.dtype, (name, M, K, N, rank)
            assert_matches(a, b, name)


def test_noncontiguous_inputs(seed):
    """Inputs are taken in their logical (row-major) order whatever their strides."""
    x, weight, absmax, bs, qt, A, B, bias = make_case("dense", torch.bfloat16, torch.float32, 40, 72, 30, 64, 8, True)
    g = torch.randn(40, 30).to(torch.bfloat16)
    nc = [t.t().contiguous().t() for t in (x, weight, A, B, g)]
    assert not any(t.is_contiguous() for t in nc)
    seed = torch.tensor(seed)
    fwd = OPS.lora_linear_fwd(nc[0], nc[1], None, bs, qt, 30, nc[2], nc[3], 1.0, bias[::1], 0.3, seed, "linear")
    want = OPS.lora_linear_fwd(x, weight, None, bs, qt, 30, A, B, 1.0, bias, 0.3, seed, "linear")
    for a, b in zip(fwd, want, strict=True):
        assert torch.equal(a, b)
    S = want[1]
    got = OPS.lora_linear_bwd(nc[4], nc[0], S.t().contiguous().t(), nc[1], None, bs, qt, 30, nc[2], nc[3], 1.0, 0.3,
                              seed, True, True, True)
    want = OPS.lora_linear_bwd(g, x, S, weight, None, bs, qt, 30, A, B, 1.0, 0.3, seed, True, True, True)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["dense", "nf4"])
def test_need_flags(seed, kind):
    x, weight, absmax, bs, qt, A, B, bias = make_case(kind, torch.bfloat16, torch.float32, 50, 72, 40, 64, 8, False)
    N = B.shape[0]
    g = torch.randn(50, N).to(torch.bfloat16)
    seed = torch.tensor(seed)
    y, S = OPS.lora_linear_fwd(x, weight, absmax, bs, qt, N, A, B, 1.0, None, 0.2, seed, "linear4bit")
    full = OPS.lora_linear_bwd(g, x, S, weight, absmax, bs, qt, N, A, B, 1.0, 0.2, seed, True, True, True)
    for needs in [(a, b, c) for a in (False, True) for b in (False, True) for c in (False, True)]:
        out = OPS.lora_linear_bwd(g, x, S, weight, absmax, bs, qt, N, A, B, 1.0, 0.2, seed, *needs)
        for need, got, want, like in zip(needs, out, full, (x, A, B), strict=True):
            if need:
                assert torch.equal(got, want)
            else:
                assert got.shape == (0,) and got.dtype == like.dtype
    # p = 0: dA alone takes a shortcut (dropout(x) is x)
    out = OPS.lora_linear_bwd(g, x, S, weight, absmax, bs, qt, N, A, B, 1.0, 0.0, seed, False, True, False)
    want = OPS.lora_linear_bwd_reference(g, x, S, weight, absmax, bs, qt, N, A, B, 1.0, 0.0, seed, True, True, True)
    assert_matches(out[1], want[1], "dA")


def test_autograd_op_on_cpp_backend(seed):
    from fastlora import ops

    q = nf4.quantize(torch.randn(48, 40), 64, "nf4", True)
    x = torch.randn(2, 5, 40, requires_grad=True)
    grads = []
    for backend in ("cpp", "reference"):
        A = (torch.randn(4, 40) * 0.1).requires_grad_()
        B = (torch.randn(48, 4) * 0.1).requires_grad_()
        torch.manual_seed(seed)
        A.data.normal_(0, 0.1)
        B.data.normal_(0, 0.1)
        x.grad = None
        y = ops.lora_linear(x, q, A, B, 2.0, dropout_p=0.0, backend=backend)
        y.square().sum().backward()
        grads.append((y.detach(), x.grad.clone(), A.grad, B.grad))
    for a, b in zip(*grads, strict=True):
        assert_matches(a, b)


# ---------------------------------------------------------------------------------------------
# opcheck and bad input


def test_opcheck_lora_ops(seed):
    seed = torch.tensor(seed)
    torch.library.opcheck(OPS.lora_dropout, (torch.randn(7, 33).to(torch.bfloat16), 0.25, seed))
    torch.library.opcheck(OPS.lora_dropout, (torch.randn(10), 0.0, seed))
    for kind, dtype, p in (("dense", torch.float32, 0.0), ("nf4-dq", torch.bfloat16, 0.2)):
        x, weight, absmax, bs, qt, A, B, bias = make_case(kind, dtype, torch.float32, 9, 72, 20, 64, 4, True)
        fwd = (x, weight, absmax, bs, qt, 20, A, B, 0.5, bias, p, seed, "linear")
        torch.library.opcheck(OPS.lora_linear_fwd, fwd)
        S = OPS.lora_linear_fwd(*fwd)[1]
        g = torch.randn(9, 20).to(dtype)
        for needs in ((True, True, True), (False, True, False)):
            torch.library.opcheck(OPS.lora_linear_bwd, (g, x, S, weight, absmax, bs, qt, 20, A, B, 0.5, p, seed,
                                                        *needs))


def _fwd_args(**change):
    x = torch.randn(6, 64)
    q = nf4.quantize(torch.randn(10, 64), 64, "nf4", False)
    args = dict(x=x, weight=q.packed_bytes(), absmax=q.absmax, blocksize=64, quant_type="nf4", out_features=10,
                lora_A=torch.randn(4, 64), lora_B=torch.randn(10, 4), scaling=1.0, bias=None, dropout_p=0.0,
                seed=torch.tensor(1),
                rounding="linear")
    args.update(change)
    return args


BAD_FWD = [
    (dict(x=torch.randn(6, 64, dtype=torch.float64)), TypeError, "x"),
    (dict(x=torch.zeros(6, 64, dtype=torch.int32)), TypeError, "x"),
    (dict(x=torch.randn(6, 2, 32)), ValueError, "x"),
    (dict(x=torch.randn(6, 63)), ValueError, "weight"),
    (dict(weight=torch.zeros(319, dtype=torch.uint8)), ValueError, "weight"),
    (dict(weight=torch.zeros(320, dtype=torch.int8)), TypeError, "weight"),
    (dict(absmax=torch.ones(10, dtype=torch.float16)), TypeError, "absmax"),
    (dict(absmax=torch.ones(11)), ValueError, "absmax"),
    (dict(blocksize=48), ValueError, "blocksize"),
    (dict(quant_type="int4"), ValueError, "quant_type"),
    (dict(out_features=-1), ValueError, "out_features"),
    (dict(absmax=None, weight=torch.randn(10, 64, dtype=torch.bfloat16)), TypeError, "weight"),
    (dict(absmax=None, weight=torch.randn(10, 65)), ValueError, "weight"),
    (dict(lora_A=torch.randn(4, 63)), ValueError, "lora_A"),
    (dict(lora_A=torch.zeros(4, 64, dtype=torch.int64)), TypeError, "lora_A"),
    (dict(lora_A=torch.randn(4, 64, dtype=torch.float16)), TypeError, "lora_A"),
    (dict(lora_B=torch.randn(10, 5)), ValueError, "lora_B"),
    (dict(lora_B=torch.randn(10, 4, dtype=torch.float64)), TypeError, "lora_B"),
    (dict(bias=torch.randn(11)), ValueError, "bias"),
    (dict(bias=torch.zeros(10, dtype=torch.int32)), TypeError, "bias"),
    (dict(dropout_p=1.0), ValueError, "dropout_p"),
    (dict(dropout_p=-0.1), ValueError, "dropout_p"),
    (dict(dropout_p=float("nan")), ValueError, "dropout_p"),
    (dict(rounding="peft"), ValueError, "rounding"),
    (dict(seed=torch.tensor(1.0)), TypeError, "seed"),
    (dict(seed=torch.tensor([1, 2])), ValueError, "seed"),
    (dict(seed=torch.tensor(-1)), ValueError, r"seed must be in \[0, 2\^63\)"),
]


@pytest.mark.parametrize("change,exc,word", BAD_FWD)
def test_bad_fwd_input_raises_named_error(change, exc, word):
    with pytest.raises(exc, match=word):
        OPS.lora_linear_fwd(*_fwd_args(**change).values())


BAD_BWD = [
    (dict(grad_y=torch.randn(6, 11)), ValueError, "grad_y"),
    (dict(grad_y=torch.zeros(6, 10, dtype=torch.int32)), TypeError, "grad_y"),
    (dict(S=torch.randn(6, 5)), ValueError, "S"),
    (dict(S=torch.randn(6, 4, dtype=torch.float64)), TypeError, "S"),
    (dict(x=torch.randn(5, 64)), ValueError, "grad_y"),
    (dict(lora_B=torch.randn(9, 4)), ValueError, "lora_B"),
    (dict(dropout_p=2.0), ValueError, "dropout_p"),
    (dict(seed=torch.tensor(1, dtype=torch.int32)), TypeError, "seed"),
    (dict(seed=torch.tensor(-(2**63))), ValueError, "seed"),
]


@pytest.mark.parametrize("change,exc,word", BAD_BWD)
def test_bad_bwd_input_raises_named_error(change, exc, word):
    a = _fwd_args()
    args = dict(grad_y=torch.randn(6, 10), x=a["x"], S=torch.randn(6, 4), weight=a["weight"], absmax=a["absmax"],
                blocksize=64, quant_type="nf4", out_features=10, lora_A=a["lora_A"], lora_B=a["lora_B"], scaling=1.0,
                dropout_p=0.0, seed=torch.tensor(1), need_dx=True, need_dA=True, need_dB=True)
    args.update(change)
    with pytest.raises(exc, match=word):
        OPS.lora_linear_bwd(*args.values())


def test_bad_dropout_input_raises_named_error():
    with pytest.raises(TypeError, match="x"):
        OPS.lora_dropout(torch.zeros(4, dtype=torch.int32), 0.1, torch.tensor(1))
    with pytest.raises(TypeError, match="x"):
        OPS.lora_dropout(torch.zeros(4, dtype=torch.float64), 0.1, torch.tensor(1))
    for p in (1.0, -0.5, float("nan")):
        with pytest.raises(ValueError, match="p"):
            OPS.lora_dropout(torch.zeros(4), p, torch.tensor(1))
    bad_seeds = ((torch.tensor(1.5), TypeError), (torch.zeros(3, dtype=torch.int64), ValueError),
                 (torch.tensor(-7), ValueError))
    for seed, exc in bad_seeds:
        with pytest.raises(exc, match="seed"):
            OPS.lora_dropout(torch.zeros(4), 0.1, seed)
    with pytest.raises(RuntimeError, match="seed"):  # the schema itself: a Python int is not a Tensor
        OPS.lora_dropout(torch.zeros(4), 0.1, 1)


# ---------------------------------------------------------------------------------------------
# bf16 GEMM mode (bf16 x): forced on with FASTLORA_CPU_BF16_GEMM=1, whatever the CPU


def dx_bf16_gemm(g, x, weight, absmax, bs, qt, A, B, scaling, p, seed):
    """dx of the bf16 GEMM mode: rnd(rnd(G·W) + keep·scale·(dS·A)), W decoded to bf16, sums in fp32."""
    from fastlora import reference_lora

    N, K = B.shape[0], x.shape[1]
    w = reference_lora.dense_weight(weight, absmax, bs, qt, N, K, torch.bfloat16).float()
    scale = torch.tensor(scaling, dtype=torch.float32)
    d_s = (g.float() @ B.float()) * scale
    gw = (g.float() @ w).to(torch.bfloat16).float()
    return (gw + reference_lora.lora_dropout(d_s @ A.float(), p, seed)).to(torch.bfloat16)


@pytest.mark.parametrize("kind", WEIGHTS)
@pytest.mark.parametrize("adapters", ["fp32", "bf16"])
def test_bf16_gemm_mode_matches_reference(seed, monkeypatch, kind, adapters):
    a_dtype = torch.float32 if adapters == "fp32" else torch.bfloat16
    for i, (M, K, N, bs, rank, has_bias, rounding, p) in enumerate(CONFIGS):
        case = make_case(kind, torch.bfloat16, a_dtype, M, K, N, bs, rank, has_bias)
        x, weight, absmax, bs_, qt, A, B, bias = case
        scaling = 2.0 / rank**0.5
        g = torch.randn(M, N).to(torch.bfloat16)
        outs = {}
        for mode in ("0", "1"):
            monkeypatch.setenv("FASTLORA_CPU_BF16_GEMM", mode)
            outs[mode] = run_both(*case, scaling=scaling, p=p, seed=seed + i, rounding=rounding, g=g)
        got, want = outs["1"]
        for name, a, b in zip(("y", "S", "dA", "dB"), got[:2] + got[3:], want[:2] + want[3:], strict=True):
            assert_matches(a, b, f"{name} config {i}")
        dx_want = dx_bf16_gemm(g, x, weight, absmax, bs_, qt, A, B, scaling, p, seed + i)
        assert_matches(got[2], dx_want, f"dx config {i}")
        # The two modes differ in dx's rounding only: a check that the bound above catches the
        # single rounding of the fp32 mode, and that the switch took effect.
        dx_fp32_mode = outs["0"][0][2]
        assert_matches(dx_fp32_mode, want[2], f"dx fp32 mode config {i}")
        assert (dx_fp32_mode != dx_want).float().mean().item() > 0.05, f"config {i}"


@pytest.mark.parametrize("kind", ["dense", "nf4-dq"])
def test_bf16_gemm_mode_tiling_edges(seed, monkeypatch, kind):
    monkeypatch.setenv("FASTLORA_CPU_BF16_GEMM", "1")
    monkeypatch.setenv("FASTLORA_CPU_TILE_BYTES", "4096")
    case = make_case(kind, torch.bfloat16, torch.float32, 45, 73, 83, 64, 4, True)
    g = torch.randn(45, 83).to(torch.bfloat16)
    got, want = run_both(*case, scaling=0.5, p=0.2, seed=seed, rounding="linear4bit", g=g)
    x, weight, absmax, bs, qt, A, B, _ = case
    want = list(want)
    want[2] = dx_bf16_gemm(g, x, weight, absmax, bs, qt, A, B, 0.5, 0.2, seed)
    for name, a, b in zip(("y", "S", "dx", "dA", "dB"), got, want, strict=True):
        assert_matches(a, b, name)


def test_bf16_gemm_mode_portable_matches_avx2_bitwise(seed, monkeypatch):
    monkeypatch.setenv("FASTLORA_CPU_BF16_GEMM", "1")
    case = make_case("fp4-dq", torch.bfloat16, torch.float32, 29, 75, 66, 64, 8, True)
    g = torch.randn(29, 66).to(torch.bfloat16)
    outs = []
    for disable in ("0", "1"):
        monkeypatch.setenv("FASTLORA_DISABLE_AVX2", disable)
        outs.append(run_both(*case, scaling=1.5, p=0.25, seed=seed, rounding="linear", g=g)[0])
    for a, b in zip(*outs, strict=True):
        assert torch.equal(_bits(a), _bits(b))


def test_bf16_gemm_mode_fp32_bias(seed, monkeypatch):
    """A float32 bias cannot enter the bf16 GEMM: y = rnd(rnd(rnd(x·Wᵀ) + bias) + l), one rounding
    more than the reference, so only the elementwise bound holds (documented in lora_linear.cpp)."""
    monkeypatch.setenv("FASTLORA_CPU_BF16_GEMM", "1")
    x, weight, absmax, bs, qt, A, B, bias = make_case("nf4", torch.bfloat16, torch.float32, 50, 72, 40, 64, 8, True)
    args = (x, weight, absmax, bs, qt, 40, A, B, 1.0, bias.float() * 1.001, 0.0, torch.tensor(seed), "linear")
    y, _ = OPS.lora_linear_fwd(*args)
    y_ref, _ = OPS.lora_linear_fwd_reference(*args)
    err, scale = (y.double() - y_ref.double()).abs(), y_ref.double().abs().max().item()
    assert bool((err <= 2 * ULP[torch.bfloat16] * (y_ref.double().abs() + scale)).all())


@pytest.mark.parametrize("kind", ["dense", "nf4"])
def test_bf16_gemm_mode_need_flags(seed, monkeypatch, kind):
    """Without dx the bf16 mode changes nothing; with it, dA and dB (fp32, summed in another order)
    match and dx is rounded differently."""
    x, weight, absmax, bs, qt, A, B, _ = make_case(kind, torch.bfloat16, torch.float32, 50, 72, 40, 64, 8, False)
    g = torch.randn(50, 40).to(torch.bfloat16)
    seed = torch.tensor(seed)
    S = OPS.lora_linear_fwd(x, weight, absmax, bs, qt, 40, A, B, 1.0, None, 0.2, seed, "linear4bit")[1]
    res = {}
    for mode in ("0", "1"):
        monkeypatch.setenv("FASTLORA_CPU_BF16_GEMM", mode)
        res[mode] = [OPS.lora_linear_bwd(g, x, S, weight, absmax, bs, qt, 40, A, B, 1.0, 0.2, seed, *needs)
                     for needs in ((False, True, True), (False, False, True), (True, True, True), (True, False, True))]
    for i in range(2):
        for a, b in zip(res["0"][i], res["1"][i], strict=True):
            assert torch.equal(a, b)
    for i in range(2, 4):
        assert not torch.equal(res["0"][i][0], res["1"][i][0])
        for a, b in zip(res["0"][i][1:], res["1"][i][1:], strict=True):
            assert_matches(b, a)


@pytest.mark.parametrize("kind", ["dense", "nf4-dq"])
def test_bf16_gemm_mode_large(seed, monkeypatch, kind):
    """Shapes large enough for torch's bf16 GEMM to take its oneDNN path (tiny ones may not)."""
    monkeypatch.setenv("FASTLORA_CPU_BF16_GEMM", "1")
    case = make_case(kind, torch.bfloat16, torch.float32, 256, 1024, 768, 64, 16, True)
    g = torch.randn(256, 768).to(torch.bfloat16)
    got, want = run_both(*case, scaling=0.5, p=0.1, seed=seed, rounding="linear4bit", g=g)
    x, weight, absmax, bs, qt, A, B, _ = case
    want = list(want)
    want[2] = dx_bf16_gemm(g, x, weight, absmax, bs, qt, A, B, 0.5, 0.1, seed)
    for name, a, b in zip(("y", "S", "dx", "dA", "dB"), got, want, strict=True):
        assert_matches(a, b, name)
