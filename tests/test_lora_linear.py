"""fastlora.ops.lora_linear on every CPU backend: against float64 ground truth, against PEFT's own
layers (lora.Linear over nn.Linear, lora.bnb.Linear4bit over bitsandbytes Linear4bit), gradcheck,
opcheck, what is saved for backward, the dropout mask, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from lora_cases import (
    ADAPTER_GRAD_TOL,
    DTYPES,
    REL_TOL,
    WEIGHT_KINDS,
    backend_params,
    expected64,
    make_adapters,
    make_weight,
    next_seed,
    rel_err,
)  # fmt: skip

from fastlora import nf4, reference_lora
from fastlora.ops import lora_dropout, lora_linear

BACKENDS = backend_params()
# Odd token layout of the issue: 3 x 5 x 37 tokens, in=72, out=200 (not multiples of any tile).
LEAD, IN, OUT = (3, 5, 37), 72, 200


def _small_for(backend: str) -> tuple[tuple[int, ...], int, int]:
    # The interpreter runs every Triton program in Python: a smaller odd shape keeps it fast.
    return ((37,), 72, 200) if backend == "triton" else (LEAD, IN, OUT)


def _run(backend, x, weight, a, b, scaling, bias, p, rounding=None):
    seed = next_seed() if p > 0 else 0
    y = lora_linear(x, weight, a, b, scaling, bias=bias, dropout_p=p, rounding=rounding, backend=backend)
    g = torch.randn_like(y, dtype=torch.float32).to(y.dtype)
    y.backward(g)
    return y, g, seed


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", WEIGHT_KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_against_float64(backend, kind, dtype, p, seed):
    lead, k, n = _small_for(backend)
    x = torch.randn(*lead, k).to(dtype).requires_grad_()
    weight = make_weight(kind, n, k, dtype)
    a, b = make_adapters(8, n, k)
    bias = torch.randn(n).to(dtype).requires_grad_()
    y, g, used = _run(backend, x, weight, a, b, 2.0, bias, p)
    assert y.dtype == dtype and y.shape == (*lead, n)
    y64, dx, da, db, dbias = expected64(x, weight, a, b, 2.0, bias, p, used, g)
    tol = REL_TOL[dtype]
    assert rel_err(y.reshape(-1, n), y64) < tol
    assert rel_err(x.grad.reshape(-1, k), dx) < tol
    assert rel_err(a.grad, da) < ADAPTER_GRAD_TOL
    assert rel_err(b.grad, db) < ADAPTER_GRAD_TOL
    assert rel_err(bias.grad, dbias) < tol
    assert a.grad.dtype == b.grad.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rank", [1, 16, 64, 100, 256])
@pytest.mark.parametrize("adapter_dtype", ["float32", "same"])
def test_ranks_and_adapter_dtypes(backend, rank, adapter_dtype, seed):
    lead, k, n = _small_for(backend)
    dtype = torch.bfloat16
    adt = torch.float32 if adapter_dtype == "float32" else dtype
    x = torch.randn(*lead, k).to(dtype).requires_grad_()
    weight = make_weight("nf4-dq", n, k, dtype)
    a, b = make_adapters(rank, n, k, adt)
    y, g, used = _run(backend, x, weight, a, b, 0.5, None, 0.1)
    y64, dx, da, db, _ = expected64(x, weight, a, b, 0.5, None, 0.1, used, g)
    assert rel_err(y.reshape(-1, n), y64) < REL_TOL[dtype]
    assert rel_err(x.grad.reshape(-1, k), dx) < REL_TOL[dtype]
    adapter_tol = ADAPTER_GRAD_TOL if adt == torch.float32 else REL_TOL[adt]
    assert a.grad.dtype == adt and rel_err(a.grad, da) < adapter_tol
    assert b.grad.dtype == adt and rel_err(b.grad, db) < adapter_tol


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree_with_reference_op(backend, seed):
    """Every backend against the reference backend on the same inputs and seed (bf16, 4-bit, dropout)."""
    lead, k, n = _small_for(backend)
    x = torch.randn(*lead, k).to(torch.bfloat16)
    weight = make_weight("fp4-dq", n, k, torch.bfloat16, blocksize=128)
    a, b = make_adapters(16, n, k)
    outs = {}
    for name in ("reference", backend):
        xs, as_, bs = (t.detach().clone().requires_grad_() for t in (x, a, b))
        torch.manual_seed(seed)
        y = lora_linear(xs, weight, as_, bs, 1.5, dropout_p=0.3, backend=name)
        y.backward(torch.ones_like(y))
        outs[name] = (y, xs.grad, as_.grad, bs.grad)
    for got, want in zip(outs[backend], outs["reference"], strict=False):
        assert rel_err(got, want) < 4e-3


# ---------------------------------------------------------------------------------------------
# PEFT parity


def _peft_dropout(p: float, seed: int):
    """A stand-in for PEFT's nn.Dropout that applies fastlora's mask of ``seed``."""

    class MaskDropout(torch.nn.Module):
        def forward(self, x):
            return lora_dropout(x, p, seed, backend="reference") if p > 0 else x

    return MaskDropout()


def _peft_linear(base, rank, alpha, p, rslora, seed, four_bit, adapters="float32"):
    """PEFT's layer over ``base``; ``adapters="float32"`` upcasts lora_A / lora_B as ``get_peft_model`` does by
    default (autocast_adapter_dtype), "same" leaves them in the base's dtype as the bare layer builds them."""
    from peft import LoraConfig
    from peft.tuners.lora import layer

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=p, use_rslora=rslora)
    if four_bit:
        from peft.tuners.lora import bnb as lora_bnb

        module = lora_bnb.Linear4bit(base, "default", config, r=rank, lora_alpha=alpha, lora_dropout=p,
                                     use_rslora=rslora)
    else:
        module = layer.Linear(base, "default", config, r=rank, lora_alpha=alpha, lora_dropout=p, use_rslora=rslora)
    module.lora_dropout["default"] = _peft_dropout(p, seed)
    if adapters == "float32":
        module.lora_A.float()
        module.lora_B.float()
    torch.nn.init.normal_(module.lora_B["default"].weight, std=0.05)
    return module


# The share of a 16-bit y that may differ from PEFT's in the last bit: the base GEMM's summation order (fp16:
# ~0.1% seen). Following the other class's rounding rule with fp32 adapters changes 12-22% of the elements,
# within REL_TOL, so only this count tells the rules apart.
PEFT_DIFFERING_FRACTION = 0.02


def _compare_with_peft(backend, module, weight, bias_param, x, dtype, p, seed, four_bit):
    a = module.lora_A["default"].weight
    b = module.lora_B["default"].weight
    scaling = module.scaling["default"]
    x_peft = x.detach().clone().requires_grad_()
    y_peft = module(x_peft)
    g = torch.randn_like(y_peft, dtype=torch.float32).to(dtype)
    y_peft.backward(g)
    peft_grads = (x_peft.grad, a.grad.clone(), b.grad.clone(), None if bias_param is None else bias_param.grad.clone())
    a.grad = b.grad = None
    if bias_param is not None:
        bias_param.grad = None

    x_ours = x.detach().clone().requires_grad_()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        assert next_seed() == seed
        y = lora_linear(x_ours, weight, a, b, scaling, bias=bias_param, dropout_p=p, backend=backend)
    y.backward(g)
    assert y.dtype == y_peft.dtype == dtype
    tol = REL_TOL[dtype]
    assert rel_err(y, y_peft) < tol
    if dtype != torch.float32:
        differing = (y != y_peft).double().mean().item()
        assert differing <= PEFT_DIFFERING_FRACTION, f"{differing:.1%} of y differs from PEFT's"
    assert rel_err(x_ours.grad, peft_grads[0]) < tol
    # PEFT's adapter gradients come from bf16 autograd through its dtype casts: same fp32 sums.
    assert rel_err(a.grad, peft_grads[1]) < max(tol, ADAPTER_GRAD_TOL) / (1 if dtype == torch.float32 else 2)
    assert rel_err(b.grad, peft_grads[2]) < max(tol, ADAPTER_GRAD_TOL) / (1 if dtype == torch.float32 else 2)
    if bias_param is not None:
        assert rel_err(bias_param.grad, peft_grads[3]) < tol


def _seed_of_manual_seed_zero() -> int:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return next_seed()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rank,rslora", [(1, False), (8, True), (16, False), (64, False)])
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("adapters", ["float32", "same"])
def test_matches_peft_lora_linear(backend, dtype, rank, rslora, p, bias, adapters, seed):
    pytest.importorskip("peft")
    if dtype == torch.float32 and adapters == "same":
        pytest.skip("fp32 adapters either way")
    lead, k, n = _small_for(backend)
    base = torch.nn.Linear(k, n, bias=bias).to(dtype)
    base.weight.requires_grad_(False)
    module = _peft_linear(base, rank, 16, p, rslora, _seed_of_manual_seed_zero(), four_bit=False, adapters=adapters)
    x = torch.randn(*lead, k).to(dtype)
    _compare_with_peft(backend, module, base.weight, base.bias, x, dtype, p, _seed_of_manual_seed_zero(), False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant", ["nf4-dq", "fp4"])
@pytest.mark.parametrize("rank,p", [(8, 0.0), (16, 0.2)])
@pytest.mark.parametrize("adapters", ["float32", "same"])
def test_matches_peft_bnb_linear4bit(backend, dtype, quant, rank, p, adapters, seed):
    pytest.importorskip("peft")
    bnb = pytest.importorskip("bitsandbytes")
    if dtype == torch.float32 and adapters == "same":
        pytest.skip("fp32 adapters either way")
    lead, k, n = _small_for(backend)
    qweight = make_weight(quant, n, k, dtype)
    base = bnb.nn.Linear4bit(k, n, bias=True, compute_dtype=dtype, quant_type=qweight.quant_type,
                             compress_statistics=qweight.double_quant)
    base.weight = nf4.to_bnb(qweight)
    base.bias = torch.nn.Parameter(torch.randn(n).to(dtype))
    module = _peft_linear(base, rank, 32, p, False, _seed_of_manual_seed_zero(), four_bit=True, adapters=adapters)
    x = torch.randn(*lead, k).to(dtype)
    # The bitsandbytes Params4bit itself is accepted (viewed without copying).
    _compare_with_peft(backend, module, base.weight, base.bias, x, dtype, p, _seed_of_manual_seed_zero(), True)


def test_roundings_are_peft_s_two_classes(seed):
    """bf16: "linear" rounds once after adding the fp32 LoRA term, "linear4bit" rounds the LoRA term
    first; the reference follows each formula exactly, and they differ on some elements."""
    x = torch.randn(64, 72).to(torch.bfloat16)
    weight = make_weight("dense", 200, 72, torch.bfloat16)
    a, b = make_adapters(8, 200, 72)
    y1 = lora_linear(x, weight, a, b, 2.0, rounding="linear", backend="reference")
    y2 = lora_linear(x, weight, a, b, 2.0, rounding="linear4bit", backend="reference")
    base = (x.float() @ weight.float().T).to(torch.bfloat16).float()
    lora = (x.float() @ a.detach().T @ b.detach().T) * 2.0
    assert torch.equal(y1, (base + lora).to(torch.bfloat16))
    assert torch.equal(y2, (base + lora.to(torch.bfloat16).float()).to(torch.bfloat16))
    assert not torch.equal(y1, y2)


# ---------------------------------------------------------------------------------------------
# gradcheck, opcheck, saved tensors


@pytest.mark.parametrize("kind", ["dense", "nf4-dq", "fp4"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradcheck_float64(kind, p, seed):
    x = torch.randn(2, 7, 24, dtype=torch.float64, requires_grad=True)
    weight = make_weight(kind, 20, 24, torch.float64)
    a, b = make_adapters(4, 20, 24, torch.float64)
    bias = torch.randn(20, dtype=torch.float64, requires_grad=True)

    def fn(x, a, b, bias):
        torch.manual_seed(seed)  # the same mask on every evaluation
        return lora_linear(x, weight, a, b, 0.7, bias=bias, dropout_p=p)

    assert torch.autograd.gradcheck(fn, (x, a, b, bias))


def _op_args(backend_suffix: str, dtype, kind, seed):
    x = torch.randn(37, 72).to(dtype)
    weight = make_weight(kind, 50, 72, dtype, blocksize=128)
    if isinstance(weight, nf4.QuantizedWeight):
        w, absmax, bs, qt = weight.packed_bytes(), weight.absmax_float(), weight.blocksize, weight.quant_type
    else:
        w, absmax, bs, qt = weight, None, 64, "nf4"
    a, b = (t.detach() for t in make_adapters(8, 50, 72))
    bias = torch.randn(50).to(dtype)
    seed = torch.tensor(seed)  # the ops take the seed as an int64 tensor
    fwd = (x, w, absmax, bs, qt, 50, a, b, 1.5, bias, 0.2, seed, "linear")
    g = torch.randn(37, 50).to(dtype)
    s = torch.randn(37, 8)
    bwd = (g, x, s, w, absmax, bs, qt, 50, a, b, 1.5, 0.2, seed, True, True, True)
    return fwd, bwd


@pytest.mark.parametrize("suffix", ["", "_reference", "_triton"])
@pytest.mark.parametrize("kind", ["dense", "nf4-dq"])
def test_opcheck(suffix, kind, seed):
    from fastlora import backends

    name = {"": "cpp", "_reference": "reference", "_triton": "triton"}[suffix]
    if not backends.available("cpu")[name]:
        pytest.skip(f"{name} backend not available")
    fwd, bwd = _op_args(suffix, torch.bfloat16, kind, seed)
    torch.library.opcheck(getattr(torch.ops.fastlora, "lora_linear_fwd" + suffix), fwd)
    torch.library.opcheck(getattr(torch.ops.fastlora, "lora_linear_bwd" + suffix), bwd)
    torch.library.opcheck(getattr(torch.ops.fastlora, "lora_dropout" + suffix), (fwd[0], 0.3, fwd[11]))


@pytest.mark.parametrize("kind", ["dense", "nf4-dq"])
def test_saved_for_backward_is_x_and_s(kind, seed):
    """Unique new storages saved for backward: exactly x, S (tokens x r) and the 8-byte seed."""
    x = torch.randn(2, 37, 72, requires_grad=True)
    weight = make_weight(kind, 200, 72, torch.float32)
    a, b = make_adapters(16, 200, 72)
    owned = {t.untyped_storage().data_ptr() for t in (a, b)}
    owned |= {t.untyped_storage().data_ptr() for t in (
        [weight] if isinstance(weight, torch.Tensor) else
        [weight.packed, weight.absmax, weight.nested.code, weight.nested.absmax2, weight.nested.offset])}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in owned:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lora_linear(x, weight, a, b, 2.0, dropout_p=0.1)
    assert sorted(saved.values()) == sorted([x.numel() * 4, 2 * 37 * 16 * 4, 8])
    y.sum().backward()


def test_mask_statistics_and_seed_independence():
    p, shape = 0.3, (257, 131)
    m1 = reference_lora.dropout_keep_mask(12345, shape, p)
    m2 = reference_lora.dropout_keep_mask(12346, shape, p)
    n = m1.numel()
    sigma = math.sqrt(n * p * (1 - p))
    for m in (m1, m2):
        assert abs(m.sum().item() - n * (1 - p)) < 5 * sigma
    agree = (m1 == m2).float().mean().item()  # independent masks agree with prob p^2 + (1-p)^2
    assert abs(agree - (p * p + (1 - p) ** 2)) < 5 * math.sqrt(0.25 / n)
    # rows and columns are not correlated: keep rate of each quarter of the columns
    for cols in m1.float().chunk(4, dim=1):
        assert abs(cols.mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / cols.numel())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64], ids=str)
@pytest.mark.parametrize("numel", [1, 3, 5, 4097])
def test_dropout_op_is_the_reference_mask(backend, dtype, numel, seed):
    if dtype == torch.float64 and backend != "reference":
        pytest.skip("float64 runs on the reference backend only")
    x = torch.randn(numel).to(dtype)
    got = lora_dropout(x, 0.37, seed, backend=backend)
    keep = reference_lora.dropout_keep_mask(seed, (numel,), 0.37)
    scale = torch.tensor(reference_lora.dropout_scale(0.37), dtype=torch.float32)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    want = torch.where(keep, x.to(compute) * scale.to(compute), torch.zeros((), dtype=compute)).to(dtype)
    assert torch.equal(got, want)


def test_philox_known_answers():
    """Random123's known-answer vector for Philox4x32-10, then random seeds, counters and streams
    against a big-integer evaluation of the same rounds."""
    words = reference_lora.philox4x32_10(0, torch.tensor([0]), 0)
    assert [int(w) for w in words] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    gen = torch.Generator().manual_seed(7)
    for _ in range(20):
        seed_value = int(torch.randint(0, 2**63 - 1, (), generator=gen))
        n = int(torch.randint(0, 2**62, (), generator=gen))
        stream = int(torch.randint(0, 2**31, (), generator=gen))
        words = reference_lora.philox4x32_10(seed_value, torch.tensor([n]), stream)
        assert [int(w) for w in words] == _philox_bigint(seed_value, n & 0xFFFFFFFF, n >> 32, stream, 0)


def _philox_bigint(seed, c0, c1, c2, c3):
    k0, k1 = seed & 0xFFFFFFFF, seed >> 32
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & 0xFFFFFFFF, (p0 >> 32) ^ c3 ^ k1, p0 & 0xFFFFFFFF
        k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
    return [c0, c1, c2, c3]


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_propagate(backend, seed):
    lead, k, n = _small_for(backend)
    x = torch.randn(*lead, k)
    x.view(-1, k)[3, 5] = float("nan")
    x.view(-1, k)[7, 1] = float("inf")
    weight = make_weight("nf4", n, k, torch.float32)
    a, b = (t.detach() for t in make_adapters(4, n, k))
    got = lora_linear(x, weight, a, b, 1.0, backend=backend).reshape(-1, n)
    want = lora_linear(x, weight, a, b, 1.0, backend="reference").reshape(-1, n)
    assert torch.isnan(got[3]).all() and torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(torch.isinf(got), torch.isinf(want))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_tokens(backend):
    x = torch.randn(0, 72, requires_grad=True)
    a, b = make_adapters(4, 30, 72)
    y = lora_linear(x, make_weight("nf4-dq", 30, 72, torch.float32), a, b, 1.0, dropout_p=0.1, backend=backend)
    assert y.shape == (0, 30)
    y.sum().backward()
    assert x.grad.shape == (0, 72) and torch.equal(a.grad, torch.zeros_like(a))


def test_weight_and_adapters_are_not_modified(seed):
    x = torch.randn(37, 72, requires_grad=True)
    weight = make_weight("nf4-dq", 50, 72, torch.float32)
    a, b = make_adapters(8, 50, 72)
    before = [t.clone() for t in (weight.packed, weight.absmax, a, b)]
    lora_linear(x, weight, a, b, 1.0, dropout_p=0.2).sum().backward()
    for t, old in zip((weight.packed, weight.absmax, a, b), before, strict=False):
        assert torch.equal(t, old)


# ---------------------------------------------------------------------------------------------
# bad input


def _good():
    x = torch.randn(5, 72)
    return dict(x=x, weight=make_weight("dense", 30, 72, torch.float32), lora_A=torch.randn(4, 72),
                lora_B=torch.randn(30, 4), scaling=1.0)


@pytest.mark.parametrize("change,error,words", [
    (dict(x=torch.randn(5, 71)), ValueError, "in_features"),
    (dict(x=torch.randn(5, 72, dtype=torch.float64)), TypeError, "weight"),
    (dict(x=torch.randn(5, 72).to(torch.int32)), TypeError, "x"),
    (dict(weight=torch.randn(30, 72, 1)), ValueError, "weight"),
    (dict(lora_A=torch.randn(0, 72), lora_B=torch.randn(30, 0)), ValueError, "rank"),
    (dict(lora_A=torch.randn(257, 72), lora_B=torch.randn(30, 257)), ValueError, "rank"),
    (dict(lora_A=torch.randn(4, 70)), ValueError, "lora_A"),
    (dict(lora_B=torch.randn(31, 4)), ValueError, "lora_B"),
    (dict(lora_B=torch.randn(30, 4, dtype=torch.float64)), TypeError, "lora_B"),
    (dict(lora_A=torch.randn(4, 72).to(torch.float16), lora_B=torch.randn(30, 4).to(torch.float16)), TypeError,
     "lora_A must have dtype float32; got float16"),  # fp32 x: one allowed dtype, named once
    (dict(x=torch.randn(5, 72).to(torch.bfloat16), weight=torch.randn(30, 72).to(torch.bfloat16),
          lora_A=torch.randn(4, 72).to(torch.float16), lora_B=torch.randn(30, 4).to(torch.float16)), TypeError,
     "lora_A must have dtype float32 or bfloat16"),
    (dict(training="yes"), TypeError, "training must be a bool"),
    (dict(x=torch.randn(5, 72, dtype=torch.float64), weight=torch.randn(30, 72, dtype=torch.float64),
          lora_A=torch.randn(4, 72, dtype=torch.float64), lora_B=torch.randn(30, 4, dtype=torch.float64),
          backend="cpp"), ValueError, "backend 'cpp' has no float64 kernels"),
    (dict(scaling=float("nan")), ValueError, "scaling"),
    (dict(scaling=float("inf")), ValueError, "scaling"),
    (dict(scaling="2"), TypeError, "scaling"),
    (dict(dropout_p=1.0), ValueError, "dropout_p"),
    (dict(dropout_p=-0.1), ValueError, "dropout_p"),
    (dict(bias=torch.randn(29)), ValueError, "bias"),
    (dict(bias=torch.randn(30, dtype=torch.float64)), TypeError, "bias"),
    (dict(rounding="fast"), ValueError, "rounding"),
    (dict(backend="gpu"), ValueError, "backend"),
    (dict(weight="w"), TypeError, "weight"),
])  # fmt: skip
def test_bad_input_names_the_argument(change, error, words):
    args = _good() | change
    with pytest.raises(error, match=words):
        lora_linear(**args)


def test_bad_input_4bit_shape_and_device():
    args = _good()
    args["weight"] = make_weight("nf4", 30, 64, torch.float32)
    with pytest.raises(ValueError, match="in_features"):
        lora_linear(**args)
    args = _good() | dict(lora_A=torch.randn(4, 72, device="meta"))
    with pytest.raises(ValueError, match="one device"):
        lora_linear(**args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("needs", ["x", "adapters", "A", "bias"])
def test_only_the_needed_gradients(backend, needs, seed):
    """A frozen first layer (x without grad), frozen adapters, ...: each combination backpropagates
    and gives the same gradients as the full computation."""
    lead, k, n = _small_for(backend)
    x = torch.randn(*lead, k)
    weight = make_weight("nf4-dq", n, k, torch.float32)
    a, b = make_adapters(8, n, k)
    bias = torch.randn(n, requires_grad=True)
    full = [t.detach().clone().requires_grad_() for t in (x, a, b, bias)]
    torch.manual_seed(seed)
    lora_linear(full[0], weight, full[1], full[2], 1.5, bias=full[3], dropout_p=0.2, backend=backend).sum().backward()
    wanted = {"x": [0], "adapters": [1, 2], "A": [1], "bias": [3]}[needs]
    part = [t.detach().clone().requires_grad_(i in wanted) for i, t in enumerate((x, a, b, bias))]
    torch.manual_seed(seed)
    lora_linear(part[0], weight, part[1], part[2], 1.5, bias=part[3], dropout_p=0.2, backend=backend).sum().backward()
    for i, (f, p) in enumerate(zip(full, part, strict=True)):
        if i in wanted:
            assert torch.equal(p.grad, f.grad), i
        else:
            assert p.grad is None


def test_torch_compile_matches_eager(seed):
    """Under torch.compile the seed draw is part of the graph (torch.randint); with inductor's
    ``fallback_random`` (torch's switch for eager-identical random ops) it comes from the same
    generator as in eager, so the masks and gradients are eager's."""
    weight = make_weight("nf4-dq", 64, 48, torch.float32)
    a, b = make_adapters(4, 64, 48)

    def loss(x):
        return torch.nn.functional.gelu(lora_linear(x, weight, a, b, 2.0, dropout_p=0.2)).square().sum()

    x = torch.randn(3, 7, 48)
    grads = []
    with torch._inductor.config.patch(fallback_random=True):
        for fn in (loss, torch.compile(loss)):
            torch.manual_seed(seed)
            value = fn(x)
            value.backward()
            grads.append((value.detach(), a.grad.clone(), b.grad.clone()))
            a.grad = b.grad = None
    for eager, compiled in zip(*grads, strict=True):
        assert rel_err(compiled, eager) < 1e-5


@pytest.mark.parametrize("layout", ["3-D", "1-D", "3-D non-contiguous"])
def test_one_autograd_node_and_an_output_that_takes_in_place_ops(layout, seed):
    """Leading dimensions are flattened inside the op: its node is the output's grad_fn and leads straight to
    x's gradient (no reshape nodes, host time on every call), and the output, though made by a view, takes
    in-place ops as a layer's output must (``hidden += residual``). Gradients equal those of a 2-D call."""
    k, n = 72, 200
    shape = {"3-D": (3, 5, k), "1-D": (k,), "3-D non-contiguous": (3, k, 5)}[layout]
    base = torch.randn(*shape)
    weight = make_weight("nf4-dq", n, k, torch.float32)
    a, b = make_adapters(8, n, k)
    x = base.detach().clone().requires_grad_()
    xin = x.transpose(1, 2) if layout == "3-D non-contiguous" else x
    y = lora_linear(xin, weight, a, b, 1.5, dropout_p=0.0)
    assert y.shape == (*xin.shape[:-1], n)
    assert type(y.grad_fn).__name__ == "_LoraLinearFunctionBackward"
    following = y.grad_fn.next_functions[0][0]
    if xin.grad_fn is not None:  # the test's own transpose
        assert following is xin.grad_fn
    else:
        assert type(following).__name__ == "AccumulateGrad" and following.variable is x
    expected = y.detach() + 1.0
    y += 1.0
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    g = torch.randn_like(y)
    y.backward(g)

    x2 = base.detach().clone().requires_grad_()
    flat = (x2.transpose(1, 2) if layout == "3-D non-contiguous" else x2).reshape(-1, k)
    a2, b2 = (t.detach().clone().requires_grad_() for t in (a, b))
    y2 = lora_linear(flat, weight, a2, b2, 1.5, dropout_p=0.0)
    y2.backward(g.reshape(-1, n))
    assert torch.equal(y2.detach().reshape(y.shape) + 1.0, y.detach())
    assert torch.equal(x2.grad, x.grad)
    assert torch.equal(a2.grad, a.grad) and torch.equal(b2.grad, b.grad)
