"""fastlora.ops.linear_4bit (frozen 4-bit linear, no LoRA): forward and backward against the float64
math of the decoded weight and against bitsandbytes' Linear4bit, what backward keeps alive, the
custom-op contract, backends and bad input."""

import math

import pytest
import torch
from lora_cases import backend_params, rel_err

from fastlora import nf4, ops

KINDS = ["nf4", "nf4-dq", "fp4", "fp4-dq"]
# Norm-wise relative error against float64 math on the same decoded weight: fp32 is a few ulps of
# K-term sums; bf16 is the rounding of y / dx to bf16 (2^-9 relative) plus bf16 GEMM accumulation.
REL_TOL = {torch.float32: 1e-6, torch.bfloat16: 6e-3}
# dbias is summed in fp32 (error <= ~1e-6 of the sum of |grad_y|) and rounded once to the bias dtype
# (unit roundoff: 2^-24 / 2^-8 of |dbias|).
BIAS_ROUNDING = {torch.float32: 2 ** -24, torch.bfloat16: 2 ** -8}
# (M, N, K): N and K multiples of 64 (bitsandbytes 0.50's native CPU dequantization is wrong for rows
# that are not a multiple of the blocksize, README "Known differences").
SHAPES = [(1, 64, 128), (3, 128, 64), (130, 64, 192)]


def _weight(kind, n, k, blocksize=64):
    quant_type, _, dq = kind.partition("-")
    w = torch.randn(n, k) / math.sqrt(k)
    return nf4.quantize(w, blocksize, quant_type, dq == "dq")


def _expected(x, q, bias, grad_y):
    """float64 y, dx, dbias of the exact math on the weight decoded to x's dtype (reference decoder)."""
    w64 = nf4.dequantize(q, x.dtype if x.dtype != torch.float64 else torch.float32, backend="reference").double()
    x64 = x.detach().double()
    y = x64 @ w64.T
    if bias is not None:
        y = y + bias.detach().double()
    g64 = grad_y.double()
    return y, g64 @ w64, g64.reshape(-1, g64.shape[-1]).sum(0)


def _assert_bias_grad(got, want, grad_y, rounding, partial_sums=1e-6):
    """|got - want| <= rounding·|want| + partial_sums·Σ|grad_y| per element."""
    abs_sum = grad_y.double().abs().reshape(-1, grad_y.shape[-1]).sum(0)
    bound = rounding * want.double().abs() + partial_sums * abs_sum
    assert ((got.double() - want.double()).abs() <= bound).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_math(seed, kind, dtype, shape):
    m, n, k = shape
    q = _weight(kind, n, k)
    x = torch.randn(m, k).to(dtype).requires_grad_()
    bias = torch.randn(n).to(dtype).requires_grad_()
    y = ops.linear_4bit(x, q, bias)
    assert y.shape == (m, n) and y.dtype == dtype
    grad_y = torch.randn(m, n).to(dtype)
    y.backward(grad_y)
    want_y, want_dx, want_db = _expected(x, q, bias, grad_y)
    assert rel_err(y, want_y) < REL_TOL[dtype]
    assert rel_err(x.grad, want_dx) < REL_TOL[dtype]
    assert x.grad.dtype == dtype and bias.grad.dtype == dtype
    _assert_bias_grad(bias.grad, want_db, grad_y, BIAS_ROUNDING[dtype])


def test_three_d_input_and_no_bias(seed):
    q = _weight("nf4-dq", 128, 64)
    x = torch.randn(2, 5, 64, requires_grad=True)
    y = ops.linear_4bit(x, q)
    assert y.shape == (2, 5, 128)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    want_y, want_dx, _ = _expected(x, q, None, grad_y)
    assert rel_err(y, want_y) < 1e-6 and rel_err(x.grad, want_dx) < 1e-6
    assert x.grad.shape == x.shape


def _bnb_layer(q, dtype, bias, compute_dtype):
    bnb = pytest.importorskip("bitsandbytes")
    n, k = q.shape
    layer = bnb.nn.Linear4bit(k, n, bias=bias is not None, compute_dtype=compute_dtype, quant_type=q.quant_type,
                              compress_statistics=q.double_quant)
    layer.weight = nf4.to_bnb(q)
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias.detach().clone())
    return layer.train()  # train mode: bitsandbytes' AVX512-BF16 CPU repacking only happens in eval


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(1, 64, 128), (2, 3, 128, 64), (130, 128, 128)], ids=lambda s: "x".join(map(str, s)))
def test_matches_bitsandbytes_linear4bit(seed, kind, dtype, shape):
    """Same decode, same GEMM: y and dx are bit-identical to bitsandbytes on the CPU (2-D and 3-D x);
    dbias agrees to the rounding of bitsandbytes' own bias-dtype sum."""
    *lead, n, k = shape
    q = _weight(kind, n, k)
    bias = torch.randn(n).to(dtype)
    layer = _bnb_layer(q, dtype, bias, dtype)
    x = torch.randn(*lead, k).to(dtype).requires_grad_()
    want = layer(x)
    grad_y = torch.randn_like(want)
    want.backward(grad_y)
    want_dx, want_db = x.grad.clone(), layer.bias.grad.clone()
    x.grad = None
    b = bias.clone().requires_grad_()
    got = ops.linear_4bit(x, layer.weight, b)  # the Params4bit itself, viewed without copying
    got.backward(grad_y)
    assert torch.equal(got, want)
    assert torch.equal(x.grad, want_dx)
    # bitsandbytes sums in the bias dtype, for 3-D x in two stages (sum(0), then autograd's sum_to), so
    # its partial sums are rounded to the bias dtype too: up to a unit roundoff of Σ|grad_y| per stage.
    u = BIAS_ROUNDING[dtype]
    _assert_bias_grad(b.grad, want_db, grad_y, 2 * u, partial_sums=2 * u + 1e-6)


@pytest.mark.parametrize("kind", ["nf4", "fp4-dq"])
def test_backward_saves_only_the_packed_weight(seed, kind):
    q = _weight(kind, 128, 192)
    x = torch.randn(7, 192, requires_grad=True)
    bias = torch.randn(128, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = ops.linear_4bit(x, q, bias)
    weight_tensors = [q.packed_bytes(), q.absmax]
    if q.nested is not None:
        weight_tensors += [q.nested.code, q.nested.absmax2, q.nested.offset]
    assert len(saved) == len(weight_tensors)
    for t in saved:
        assert t.untyped_storage().data_ptr() in {w.untyped_storage().data_ptr() for w in weight_tensors}
        if t.is_floating_point():  # statistics only: nothing of x's or the decoded weight's size
            assert t.numel() <= max(128 * 192 // 64, 256) < x.numel()
    y.sum().backward()
    assert x.grad is not None and bias.grad is not None


def test_weight_gets_no_gradient_and_bias_only_backward(seed):
    """BitFit: x without grad, trainable bias; the weight's float statistics never get a gradient."""
    q = _weight("nf4", 64, 128)
    q.absmax.requires_grad_(True)
    x = torch.randn(9, 128)
    bias = torch.randn(64, requires_grad=True)
    y = ops.linear_4bit(x, q, bias)
    y.backward(torch.ones_like(y))
    assert q.absmax.grad is None
    torch.testing.assert_close(bias.grad, torch.full((64,), 9.0), rtol=0, atol=0)
    assert not ops.linear_4bit(x, q).requires_grad


@pytest.mark.parametrize("backend", backend_params())
def test_backends_agree(seed, backend):
    """Every backend decodes bit-exactly and runs torch's GEMM: identical results (Triton: interpreter)."""
    q = _weight("nf4-dq", 64, 128)
    x = torch.randn(3, 128, requires_grad=True)
    want = ops.linear_4bit(x, q, backend="reference")
    (want_dx,) = torch.autograd.grad(want.sum(), x)
    got = ops.linear_4bit(x, q, backend=backend)
    (dx,) = torch.autograd.grad(got.sum(), x)
    assert torch.equal(got, want) and torch.equal(dx, want_dx)


def test_float64_gradcheck(seed):
    q = _weight("fp4-dq", 64, 64)
    x = torch.randn(3, 64, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(64, dtype=torch.float64, requires_grad=True)
    fn = lambda a, b: ops.linear_4bit(a, q, b, backend="reference")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, bias), fast_mode=True)
    with pytest.raises(ValueError, match="backend 'cpp'"):
        ops.linear_4bit(x, q, backend="cpp")


def test_workspace_reuse_does_not_alias_results(seed):
    """The CPU workspace is shared between calls: earlier results and weights of other sizes stay right."""
    small, large = _weight("nf4", 64, 64), _weight("fp4", 256, 128)
    xs, xl = torch.randn(4, 64), torch.randn(4, 128)
    y1 = ops.linear_4bit(xs, small)
    y1_copy = y1.clone()
    y2 = ops.linear_4bit(xl, large)
    y3 = ops.linear_4bit(xs, small)
    assert torch.equal(y1, y1_copy) and torch.equal(y3, y1)
    assert rel_err(y2, _expected(xl, large, None, torch.zeros(4, 256))[0]) < 1e-6


def test_empty_batch(seed):
    q = _weight("nf4", 64, 64)
    bias = torch.randn(64, requires_grad=True)
    y = ops.linear_4bit(torch.randn(0, 64), q, bias)
    assert y.shape == (0, 64)
    y.sum().backward()
    assert torch.equal(bias.grad, torch.zeros(64))


@pytest.mark.parametrize("suffix", ["", "_reference", "_triton"])
def test_opcheck(seed, suffix):
    q = _weight("nf4", 64, 128)
    packed, absmax = q.packed_bytes(), q.absmax
    fwd = getattr(torch.ops.fastlora, "linear_4bit_fwd" + suffix)
    bwd = getattr(torch.ops.fastlora, "linear_4bit_bwd" + suffix)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 128).to(dtype)
        torch.library.opcheck(fwd, (x, packed, absmax, 64, "nf4", 64, torch.randn(64).to(dtype)))
        torch.library.opcheck(fwd, (x, packed, absmax, 64, "nf4", 64, None))
        torch.library.opcheck(bwd, (torch.randn(3, 64).to(dtype), packed, absmax, 64, "nf4", 128))


def test_bad_input(seed):
    q = _weight("nf4", 64, 128)
    x = torch.randn(2, 128)
    with pytest.raises(TypeError, match="x must have dtype"):
        ops.linear_4bit(x.to(torch.int32), q)
    with pytest.raises(ValueError, match="at least 1 dimension"):
        ops.linear_4bit(torch.tensor(1.0), q)
    with pytest.raises(ValueError, match="in_features=128"):
        ops.linear_4bit(torch.randn(2, 64), q)
    with pytest.raises(TypeError, match="weight must be a fastlora.nf4.QuantizedWeight"):
        ops.linear_4bit(x, torch.randn(64, 128))
    with pytest.raises(TypeError, match="bias must have x's dtype"):
        ops.linear_4bit(x, q, torch.randn(64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="bias must have out_features=64"):
        ops.linear_4bit(x, q, torch.randn(65))
    with pytest.raises(ValueError, match="bias must be 1-D"):
        ops.linear_4bit(x, q, torch.randn(1, 64))
    with pytest.raises(ValueError, match="one device"):
        ops.linear_4bit(torch.randn(2, 128, device="meta"), q)
    with pytest.raises(ValueError, match="backend must be"):
        ops.linear_4bit(x, q, backend="fast")
    with pytest.raises(ValueError, match="2-D"):
        ops.linear_4bit(torch.randn(2, 4), nf4.quantize(torch.randn(2, 3, 4), 64, "nf4", False))


def test_cpu_repacked_bnb_weight_is_refused(seed):
    q = _weight("nf4", 64, 128)
    layer = _bnb_layer(q, torch.float32, None, torch.float32)
    layer.weight.quant_state.packing_format_for_cpu = True
    with pytest.raises(ValueError, match="packing_format_for_cpu"):
        ops.linear_4bit(torch.randn(2, 128), layer.weight)


def test_compiles_without_graph_breaks(seed):
    """fullgraph=True: the autograd.Function and its custom ops trace without a graph break."""
    q = _weight("nf4-dq", 64, 128)
    bias = torch.randn(64, requires_grad=True)
    x = torch.randn(5, 128, requires_grad=True)
    compiled = torch.compile(lambda a: ops.linear_4bit(a, q, bias), backend="aot_eager", fullgraph=True)
    y = compiled(x)
    dx, db = torch.autograd.grad(y.sum(), (x, bias))
    want = ops.linear_4bit(x, q, bias)
    want_dx, want_db = torch.autograd.grad(want.sum(), (x, bias))
    assert torch.equal(y, want) and torch.equal(dx, want_dx) and torch.equal(db, want_db)
