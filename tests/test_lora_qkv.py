"""fastlora.ops.lora_qkv: several LoRA projections of one x in one autograd node, against float64
truth (the op's own masks), against PEFT lora.Linear / lora.bnb.Linear4bit layers called one by one,
exact under checkpointing, x saved once, unused outputs, bad input."""

from __future__ import annotations

import pytest
import torch
from lora_cases import ADAPTER_GRAD_TOL, REL_TOL, backend_params, expected64, make_adapters, make_weight, rel_err
from torch.utils.checkpoint import checkpoint

from fastlora import nf4
from fastlora.ops import _dropout_seed, lora_dropout
from fastlora.ops.lora_projection import LoraProjection
from fastlora.ops.lora_qkv import lora_qkv

BACKENDS = backend_params()
K = 64
OUTS = (64, 32, 32)  # q, k, v with grouped-query k/v


def _next_seeds(n):
    with torch.random.fork_rng(devices=[]):
        return [int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64).item()) for _ in range(n)]


def _projections(kind, dtype, p, bias, ranks=(8, 4, 16)):
    out = []
    for n, r, scaling in zip(OUTS, ranks, (2.0, 0.5, 1.0), strict=True):
        a, b = make_adapters(r, n, K)
        bias_t = torch.randn(n).mul(0.1).to(dtype).requires_grad_() if bias else None
        out.append(LoraProjection(make_weight(kind, n, K, dtype), a, b, scaling, bias_t, p))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind,p,bias", [("dense", 0.0, True), ("nf4-dq", 0.1, False), ("fp4", 0.2, True)])
def test_against_float64(backend, dtype, kind, p, bias, seed):
    projs = _projections(kind, dtype, p, bias)
    lead = (5,) if backend == "triton" else (3, 43)
    x = torch.randn(*lead, K).to(dtype).requires_grad_()
    seeds = _next_seeds(3) if p > 0 else [0, 0, 0]
    ys = lora_qkv(x, projs, backend=backend)
    grads = [torch.randn_like(y, dtype=torch.float32).to(dtype) for y in ys]
    torch.autograd.backward(ys, grads)
    dx_want = 0
    tol = REL_TOL[dtype]
    for proj, y, g, s in zip(projs, ys, grads, seeds, strict=True):
        assert y.shape == (*lead, proj.lora_B.shape[0]) and y.dtype == dtype
        y64, dx, da, db, dbias = expected64(x, proj.weight, proj.lora_A, proj.lora_B, proj.scaling, proj.bias, p, s, g)
        dx_want = dx_want + dx
        assert rel_err(y.reshape(y64.shape), y64) < tol
        assert rel_err(proj.lora_A.grad, da) < ADAPTER_GRAD_TOL
        assert rel_err(proj.lora_B.grad, db) < ADAPTER_GRAD_TOL
        if bias:
            assert rel_err(proj.bias.grad, dbias) < tol
    assert rel_err(x.grad.reshape(-1, K), dx_want) < tol


class _MaskDropout(torch.nn.Module):
    def __init__(self, p, seed):
        super().__init__()
        self.p, self.seed = p, seed

    def forward(self, x):
        return lora_dropout(x, self.p, self.seed, backend="reference") if self.p > 0 else x


def _peft_layers(base_kind, dtype, p):
    peft = pytest.importorskip("peft")
    from peft.tuners.lora import layer as lora_layer

    layers = []
    for n in OUTS:
        config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=p)
        if base_kind == "nf4":
            bnb = pytest.importorskip("bitsandbytes")
            from peft.tuners.lora import bnb as lora_bnb

            q = make_weight("nf4-dq", n, K, dtype)
            base = bnb.nn.Linear4bit(K, n, bias=True, compute_dtype=dtype, quant_type="nf4", compress_statistics=True)
            base.weight = nf4.to_bnb(q)
            base.bias = torch.nn.Parameter(torch.randn(n).to(dtype))
            module = lora_bnb.Linear4bit(base, "default", config, r=8, lora_alpha=16, lora_dropout=p)
        else:
            base = torch.nn.Linear(K, n, bias=True).to(dtype)
            base.weight.requires_grad_(False)
            module = lora_layer.Linear(base, "default", config, r=8, lora_alpha=16, lora_dropout=p)
        torch.nn.init.normal_(module.lora_B["default"].weight, std=0.05)
        layers.append(module.train())
    return layers


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "triton"])
@pytest.mark.parametrize("base_kind,dtype,p", [("dense", torch.float32, 0.0), ("dense", torch.bfloat16, 0.1),
                                               ("nf4", torch.float32, 0.1), ("nf4", torch.bfloat16, 0.0)],
                         ids=lambda v: str(v).replace("torch.", ""))
def test_matches_peft_layers(backend, base_kind, dtype, p, seed):
    layers = _peft_layers(base_kind, dtype, p)
    seeds = _next_seeds(3) if p > 0 else [0, 0, 0]
    for layer, s in zip(layers, seeds, strict=True):
        layer.lora_dropout["default"] = _MaskDropout(p, s)
    projs = [LoraProjection(m.base_layer.weight, m.lora_A["default"].weight, m.lora_B["default"].weight,
                            m.scaling["default"], m.base_layer.bias, p) for m in layers]
    params = [t for m in layers for t in m.parameters() if t.requires_grad]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 7, K, generator=gen).to(dtype)
    gs = [torch.randn(2, 7, n, generator=gen).to(dtype) for n in OUTS]
    x_peft = x.clone().requires_grad_()
    ys_peft = [m(x_peft) for m in layers]
    torch.autograd.backward(ys_peft, gs)
    want = [*ys_peft, x_peft.grad] + [t.grad.clone() for t in params]
    for t in params:
        t.grad = None
    x_ours = x.clone().requires_grad_()
    ys = lora_qkv(x_ours, projs, backend=backend)
    torch.autograd.backward(ys, gs)
    got = [*ys, x_ours.grad] + [t.grad for t in params]
    # PEFT's bf16 dx adds six bf16-rounded terms; ours three fp32 sums rounded once each.
    tol = {torch.float32: 1e-5, torch.bfloat16: 8e-3}[dtype]
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert rel_err(a, b) < tol, i


MODES = [(reentrant, preserve) for reentrant in (True, False) for preserve in (True, False)]


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "triton"])
@pytest.mark.parametrize("mode", [None, *MODES], ids=lambda m: "plain" if m is None else f"r{m[0]}-p{m[1]}")
def test_checkpoint_gives_identical_gradients(backend, mode, seed):
    projs = _projections("nf4-dq", torch.float32, 0.2, True)
    x = torch.randn(2, 11, K)

    def block(t):
        q, k, v = lora_qkv(t, projs, backend=backend)
        return (q[..., :32] * k + v).sum(-1, keepdim=True) * t

    results = []
    for m in (None, mode):
        torch.manual_seed(99)
        xs = x.clone().requires_grad_()
        h = block(xs) if m is None else checkpoint(block, xs, use_reentrant=m[0], preserve_rng_state=m[1])
        h = block(h)  # a second, un-checkpointed call of the same adapters
        (h * h).sum().backward()
        leaves = [t for p in projs for t in (p.lora_A, p.lora_B, p.bias)]
        results.append([xs.grad] + [t.grad.clone() for t in leaves])
        for t in leaves:
            t.grad = None
        assert all(_dropout_seed.pending_count(p.lora_A) == 0 for p in projs)
    for i, (a, b) in enumerate(zip(*results, strict=True)):
        assert torch.equal(a, b), i


def test_saves_x_once_and_s_per_projection(seed):
    projs = _projections("nf4-dq", torch.float32, 0.1, True)
    x = torch.randn(2, 37, K, requires_grad=True)
    owned = [x] + [t for p in projs for t in (p.lora_A, p.lora_B, p.bias)]
    owned += [t for p in projs for t in (p.weight.packed, p.weight.absmax, p.weight.nested.code,
                                         p.weight.nested.absmax2, p.weight.nested.offset)]
    skip = {t.untyped_storage().data_ptr() for t in owned}
    saved, x_saves = {}, []

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr == x.untyped_storage().data_ptr():
            x_saves.append(t)
        elif ptr not in skip:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ys = lora_qkv(x, projs)
    assert len(x_saves) == 1
    assert sorted(saved.values()) == sorted([74 * r * 4 for r in (8, 4, 16)] + [8] * 3)
    sum(y.sum() for y in ys).backward()


def test_unused_output_and_frozen_x(seed):
    """Only k is used: q's and v's adapters get no gradient and their seeds are still forgotten."""
    projs = _projections("dense", torch.float32, 0.3, False)
    x = torch.randn(9, K)
    q, k, v = lora_qkv(x, projs)
    k.square().sum().backward()
    assert projs[0].lora_A.grad is None and projs[2].lora_B.grad is None
    assert projs[1].lora_A.grad is not None and projs[1].lora_B.grad is not None
    assert all(_dropout_seed.pending_count(p.lora_A) == 0 for p in projs)
    x2 = torch.randn(9, K, requires_grad=True)
    q, k, v = lora_qkv(x2, projs)
    v.sum().backward()
    assert x2.grad is not None and x2.grad.shape == x2.shape


@pytest.mark.parametrize("change,error,words", [
    (dict(projections=[]), TypeError, "non-empty sequence"),
    (dict(projections="q"), TypeError, "non-empty sequence"),
    (dict(projections=[(1, 2)]), TypeError, r"projections\[0\] must be a fastlora.ops.LoraProjection"),
    (dict(x=torch.randn(4, K + 1)), ValueError, r"projections\[0\].weight has in_features"),
    (dict(x=torch.randn(4, K).to(torch.int64)), TypeError, "x must have dtype"),
    (dict(backend="npu"), ValueError, "backend"),
])  # fmt: skip
def test_bad_input(change, error, words):
    projs = _projections("dense", torch.float32, 0.0, False)
    args = dict(x=torch.randn(4, K), projections=projs) | change
    with pytest.raises(error, match=words):
        lora_qkv(args.pop("x"), args.pop("projections"), **args)


def test_bad_projection_names_its_index():
    projs = _projections("dense", torch.float32, 0.0, False)
    projs[2] = projs[2]._replace(lora_B=torch.randn(31, 16))
    with pytest.raises(ValueError, match=r"projections\[2\].lora_B"):
        lora_qkv(torch.randn(4, K), projs)
