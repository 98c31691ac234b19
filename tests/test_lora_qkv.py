"""fastlora.ops.lora_qkv: several LoRA projections of one x in one autograd node, against float64
truth (the op's own masks), against PEFT lora.Linear / lora.bnb.Linear4bit layers called one by one,
exact under checkpointing, x saved once, unused outputs, bad input; which path (grouped: one
decode, one base GEMM, one S GEMM; or per projection) runs, spied on, and the grouped path's own
float64 / PEFT / checkpoint / saved-tensor / compile checks."""

from __future__ import annotations

import importlib

import pytest
import torch
from lora_cases import ADAPTER_GRAD_TOL, REL_TOL, backend_params, expected64, make_adapters, make_weight, rel_err
from torch.utils.checkpoint import checkpoint

from fastlora import backends, nf4
from fastlora.ops import _dropout_seed, lora_dropout
from fastlora.ops.lora_projection import LoraProjection
from fastlora.ops.lora_qkv import lora_qkv

qkv_module = importlib.import_module("fastlora.ops.lora_qkv")  # fastlora.ops.lora_qkv is also the function
BACKENDS = backend_params()
K = 64
OUTS = (64, 32, 32)  # q, k, v with grouped-query k/v


def _next_seeds(n):
    with torch.random.fork_rng(devices=[]):
        return [int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64).item()) for _ in range(n)]


def _projections(kind, dtype, p, bias, ranks=(8, 4, 16), outs=OUTS, k=K, adapter_dtype=torch.float32):
    """q / k / v projections; ``kind`` one weight kind for all, or one per projection."""
    kinds = (kind,) * len(outs) if isinstance(kind, str) else kind
    out = []
    for kind_i, n, r, scaling in zip(kinds, outs, ranks, (2.0, 0.5, 1.0), strict=True):
        a, b = make_adapters(r, n, k, adapter_dtype)
        bias_t = torch.randn(n).mul(0.1).to(dtype).requires_grad_() if bias else None
        out.append(LoraProjection(make_weight(kind_i, n, k, dtype), a, b, scaling, bias_t, p))
    return out


@pytest.fixture
def paths(monkeypatch):
    """Counts of the calls of each path's forward / backward math (the ops' Python implementations).
    The C++ kernel's GEMMs are pinned to fp32 (where it runs bf16 GEMMs, bf16 x takes the
    per-projection path: test_bf16_gemm_mode_keeps_the_per_projection_path), so that the path taken
    does not depend on the CPU."""
    monkeypatch.setenv("FASTLORA_CPU_BF16_GEMM", "0")
    calls = {"grouped_fwd": 0, "grouped_bwd": 0, "single_fwd": 0, "single_bwd": 0}

    def spy(key, fn):
        def wrapped(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(qkv_module, "_grouped_fwd", spy("grouped_fwd", qkv_module._grouped_fwd))
    monkeypatch.setattr(qkv_module, "_grouped_bwd", spy("grouped_bwd", qkv_module._grouped_bwd))
    monkeypatch.setattr(qkv_module, "forward", spy("single_fwd", qkv_module.forward))
    monkeypatch.setattr(qkv_module, "backward", spy("single_bwd", qkv_module.backward))
    return calls


def _took(paths, grouped: bool, n: int = 3) -> bool:
    want = {"grouped_fwd": 1, "grouped_bwd": 1, "single_fwd": 0, "single_bwd": 0} if grouped else \
        {"grouped_fwd": 0, "grouped_bwd": 0, "single_fwd": n, "single_bwd": n}
    return paths == want


def _check_against_float64(projs, x, backend, p, training=True):
    """Run lora_qkv forward + backward on x (..., k) and compare every output and gradient with the
    float64 truth of each projection (with the op's dropout masks when dropout is active)."""
    dtype, k = x.dtype, x.shape[-1]
    active = p > 0 and training
    seeds = _next_seeds(len(projs)) if active else [0] * len(projs)
    ys = lora_qkv(x, projs, training=training, backend=backend)
    grads = [torch.randn_like(y, dtype=torch.float32).to(dtype) for y in ys]
    torch.autograd.backward(ys, grads)
    dx_want = 0
    tol = REL_TOL[dtype]
    for proj, y, g, s in zip(projs, ys, grads, seeds, strict=True):
        assert y.shape == (*x.shape[:-1], proj.lora_B.shape[0]) and y.dtype == dtype
        y64, dx, da, db, dbias = expected64(x, proj.weight, proj.lora_A, proj.lora_B, proj.scaling, proj.bias,
                                            p if active else 0.0, s, g)
        dx_want = dx_want + dx
        assert rel_err(y.reshape(y64.shape), y64) < tol
        assert proj.lora_A.grad.dtype == proj.lora_A.dtype and proj.lora_B.grad.dtype == proj.lora_B.dtype
        adapter_tol = ADAPTER_GRAD_TOL if proj.lora_A.dtype == torch.float32 else REL_TOL[proj.lora_A.dtype]
        assert rel_err(proj.lora_A.grad, da) < adapter_tol
        assert rel_err(proj.lora_B.grad, db) < adapter_tol
        if proj.bias is not None:
            assert proj.bias.grad.dtype == dtype
            assert rel_err(proj.bias.grad, dbias) < tol
    assert x.grad.dtype == dtype
    assert rel_err(x.grad.reshape(-1, k), dx_want) < tol


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind,p,bias", [("dense", 0.0, True), ("nf4-dq", 0.1, False), ("fp4", 0.2, True)])
def test_against_float64(backend, dtype, kind, p, bias, seed):
    projs = _projections(kind, dtype, p, bias)
    lead = (5,) if backend == "triton" else (3, 43)
    _check_against_float64(projs, torch.randn(*lead, K).to(dtype).requires_grad_(), backend, p)


GROUPED_KINDS = ["dense", "nf4-dq", "fp4", ("nf4", "nf4-dq", "nf4")]  # the last: double quant differs per weight


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", GROUPED_KINDS, ids=lambda k: k if isinstance(k, str) else "-".join(k))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_grouped_against_float64(backend, dtype, kind, bias, seed, paths):
    """The grouped path: GQA-like outputs (64, 16, 16), odd K and M, Qwen2-style q/k/v biases."""
    k = 67
    projs = _projections(kind, dtype, 0.0, bias, outs=(64, 16, 16), k=k)
    lead = (5,) if backend == "triton" else (3, 13)
    _check_against_float64(projs, torch.randn(*lead, k).to(dtype).requires_grad_(), backend, 0.0)
    assert _took(paths, grouped=True), paths


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["dense", "nf4-dq"])
def test_grouped_with_adapters_of_x_dtype_and_eval_dropout(dtype, kind, seed, paths):
    """Adapters in x's dtype, linear4bit rounding on a dense base, and LoRA dropout > 0 in eval mode
    (inactive, so the grouped path runs)."""
    projs = _projections(kind, dtype, 0.25, True, outs=(32, 16, 16), adapter_dtype=dtype)
    projs = [p._replace(rounding="linear4bit") for p in projs]
    _check_against_float64(projs, torch.randn(2, 9, K).to(dtype).requires_grad_(), "auto", 0.25, training=False)
    assert _took(paths, grouped=True), paths


def _not_grouped_cases():
    base = dict(kind="nf4-dq", dtype=torch.float32, p=0.0)
    return {
        "dropout-active": dict(base, p=0.1),
        "dense-and-4bit": dict(base, kind=("dense", "nf4-dq", "nf4-dq")),
        "nf4-and-fp4": dict(base, kind=("nf4", "fp4", "nf4")),
        "blocksizes-differ": dict(base, blocksize=(64, 128, 64)),
        "roundings-differ": dict(base, rounding=("linear4bit", "linear", "linear4bit")),
        "adapter-dtypes-differ": dict(base, dtype=torch.bfloat16, adapter_dtype=(torch.float32, torch.bfloat16,
                                                                                   torch.float32)),
        "compute-dtype": dict(base, compute_dtype=torch.bfloat16),
        "float64": dict(base, kind="dense", dtype=torch.float64),
    }


@pytest.mark.parametrize("case", list(_not_grouped_cases()))
def test_per_projection_path_when_grouping_does_not_apply(case, seed, paths):
    c = _not_grouped_cases()[case]
    dtype = c["dtype"]
    projs = _projections(c["kind"], dtype if dtype != torch.float64 else torch.float32, c["p"], False)
    if dtype == torch.float64:
        projs = [p._replace(weight=p.weight.double(), lora_A=p.lora_A.detach().double().requires_grad_(),
                            lora_B=p.lora_B.detach().double().requires_grad_()) for p in projs]
    for i in range(3):
        if "blocksize" in c:
            w = make_weight("nf4-dq", OUTS[i], K, dtype, blocksize=c["blocksize"][i])
            projs[i] = projs[i]._replace(weight=w)
        if "rounding" in c:
            projs[i] = projs[i]._replace(rounding=c["rounding"][i])
        if "adapter_dtype" in c:
            adt = c["adapter_dtype"][i]
            projs[i] = projs[i]._replace(lora_A=projs[i].lora_A.detach().to(adt).requires_grad_(),
                                         lora_B=projs[i].lora_B.detach().to(adt).requires_grad_())
        if "compute_dtype" in c and i == 1:  # one projection computing in bf16 is enough to rule grouping out
            projs[i] = projs[i]._replace(compute_dtype=c["compute_dtype"],
                                         lora_A=projs[i].lora_A.detach().to(torch.float32).requires_grad_())
    x = torch.randn(2, 5, K, dtype=dtype, requires_grad=True)
    ys = lora_qkv(x, projs)
    sum(y.sum() for y in ys).backward()
    assert _took(paths, grouped=False), paths


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["dense", "nf4-dq"])
def test_grouped_gpu_operand_layout_is_the_same_math(dtype, kind, seed, monkeypatch):
    """On a GPU the big GEMMs take x's dtype (fp32 output); on the CPU fp32 operands. Both carry the
    same values (the weight decoded to x's dtype either way), so forcing the GPU layout here gives
    bit-identical results: the layout changes where values are widened, never which values."""
    projs = _projections(kind, dtype, 0.0, True, outs=(32, 16, 16))
    x = torch.randn(3, 11, K).to(dtype)
    results = []
    for force in (False, True):
        if force:
            monkeypatch.setattr(qkv_module, "_gemm_dtype", lambda t: t.dtype)
        xs = x.clone().requires_grad_()
        ys = lora_qkv(xs, projs)
        torch.autograd.backward(ys, [torch.ones_like(y) for y in ys])
        leaves = [t for p in projs for t in (p.lora_A, p.lora_B, p.bias)]
        results.append([*ys, xs.grad] + [t.grad.clone() for t in leaves])
        for t in leaves:
            t.grad = None
    for i, (a, b) in enumerate(zip(*results, strict=True)):
        assert torch.equal(a, b), i


class _MaskDropout(torch.nn.Module):
    def __init__(self, p, seed):
        super().__init__()
        self.p, self.seed = p, seed

    def forward(self, x):
        return lora_dropout(x, self.p, self.seed, backend="reference") if self.p > 0 else x


def _peft_layers(base_kind, dtype, p, outs=OUTS):
    peft = pytest.importorskip("peft")
    from peft.tuners.lora import layer as lora_layer

    layers = []
    for n in outs:
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
@pytest.mark.parametrize("base_kind,dtype,p,outs", [
    ("dense", torch.float32, 0.0, OUTS), ("dense", torch.bfloat16, 0.1, OUTS), ("nf4", torch.float32, 0.1, OUTS),
    ("nf4", torch.bfloat16, 0.0, OUTS),
    # dropout 0: the grouped path, with Qwen2-style q/k/v biases and GQA-like unequal outputs
    ("dense", torch.float32, 0.0, (64, 16, 16)), ("dense", torch.bfloat16, 0.0, (64, 16, 16)),
    ("nf4", torch.float32, 0.0, (64, 16, 16)), ("nf4", torch.bfloat16, 0.0, (64, 16, 16)),
], ids=lambda v: str(v).replace("torch.", "").replace(" ", ""))  # fmt: skip
def test_matches_peft_layers(backend, base_kind, dtype, p, outs, seed, paths):
    layers = _peft_layers(base_kind, dtype, p, outs)
    seeds = _next_seeds(3) if p > 0 else [0, 0, 0]
    for layer, s in zip(layers, seeds, strict=True):
        layer.lora_dropout["default"] = _MaskDropout(p, s)
    projs = [LoraProjection(m.base_layer.weight, m.lora_A["default"].weight, m.lora_B["default"].weight,
                            m.scaling["default"], m.base_layer.bias, p) for m in layers]
    params = [t for m in layers for t in m.parameters() if t.requires_grad]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 7, K, generator=gen).to(dtype)
    gs = [torch.randn(3, 7, n, generator=gen).to(dtype) for n in outs]
    x_peft = x.clone().requires_grad_()
    ys_peft = [m(x_peft) for m in layers]
    torch.autograd.backward(ys_peft, gs)
    want = [*ys_peft, x_peft.grad] + [t.grad.clone() for t in params]
    for t in params:
        t.grad = None
    x_ours = x.clone().requires_grad_()
    ys = lora_qkv(x_ours, projs, backend=backend)
    torch.autograd.backward(ys, gs)
    assert _took(paths, grouped=p == 0), paths
    got = [*ys, x_ours.grad] + [t.grad for t in params]
    # PEFT's bf16 dx adds six bf16-rounded terms; ours three fp32 sums rounded once each (grouped: one).
    tol = {torch.float32: 1e-5, torch.bfloat16: 8e-3}[dtype]
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert rel_err(a, b) < tol, i


MODES = [(reentrant, preserve) for reentrant in (True, False) for preserve in (True, False)]


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "triton"])
@pytest.mark.parametrize("mode", [None, *MODES], ids=lambda m: "plain" if m is None else f"r{m[0]}-p{m[1]}")
@pytest.mark.parametrize("p", [0.2, 0.0], ids=["per-projection", "grouped"])
def test_checkpoint_gives_identical_gradients(backend, mode, p, seed, paths):
    projs = _projections("nf4-dq", torch.float32, p, True)
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
    assert paths["grouped_fwd"] > 0 if p == 0 else paths["grouped_fwd"] == 0, paths
    assert paths["single_fwd"] == 0 if p == 0 else paths["single_fwd"] > 0, paths


@pytest.mark.parametrize("p,grouped", [(0.1, False), (0.0, True)], ids=["per-projection", "grouped"])
def test_saves_x_once_and_s_per_projection(p, grouped, seed, paths):
    """Grouped: one S_cat (M × sum r) instead of one S per projection; otherwise the same tensors."""
    projs = _projections("nf4-dq", torch.float32, p, True)
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
    s_bytes = [74 * (8 + 4 + 16) * 4] if grouped else [74 * r * 4 for r in (8, 4, 16)]
    assert sorted(saved.values()) == sorted(s_bytes + [8] * 3)
    sum(y.sum() for y in ys).backward()
    assert _took(paths, grouped), paths


@pytest.mark.parametrize("p", [0.3, 0.0], ids=["per-projection", "grouped"])
def test_unused_output_and_frozen_x(p, seed, paths):
    """Only k is used: q's and v's adapters get no gradient and their seeds are still forgotten."""
    projs = _projections("nf4-dq" if p == 0 else "dense", torch.float32, p, True)
    x = torch.randn(9, K)
    q, k, v = lora_qkv(x, projs)
    k.square().sum().backward()
    assert projs[0].lora_A.grad is None and projs[2].lora_B.grad is None and projs[0].bias.grad is None
    assert projs[1].lora_A.grad is not None and projs[1].lora_B.grad is not None
    assert all(_dropout_seed.pending_count(p.lora_A) == 0 for p in projs)
    x2 = torch.randn(9, K, requires_grad=True)
    q, k, v = lora_qkv(x2, projs)
    g = torch.randn_like(v)
    v.backward(g)
    assert x2.grad is not None and x2.grad.shape == x2.shape
    if p == 0:  # the grouped dx of v alone, q's and k's blocks of g_cat being zero
        v_proj = projs[2]
        want = expected64(x2, v_proj.weight, v_proj.lora_A, v_proj.lora_B, v_proj.scaling, v_proj.bias, 0.0, 0, g)
        assert rel_err(x2.grad, want[1]) < REL_TOL[torch.float32]
        assert paths["grouped_bwd"] == 2 and paths["single_fwd"] == 0, paths


@pytest.mark.parametrize("change,error,words", [
    (dict(projections=[]), TypeError, "non-empty sequence"),
    (dict(projections="q"), TypeError, "non-empty sequence"),
    (dict(projections=[(1, 2)]), TypeError, r"projections\[0\] must be a fastlora.ops.LoraProjection"),
    (dict(x=torch.randn(4, K + 1)), ValueError, r"projections\[0\].weight has in_features"),
    (dict(x=torch.randn(4, K).to(torch.int64)), TypeError, "x must have dtype"),
    (dict(backend="npu"), ValueError, "backend"),
    (dict(training=1), TypeError, "training must be a bool"),
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


@pytest.mark.parametrize("kind", ["dense", "nf4-dq"])
def test_grouped_path_compiles_without_graph_break(kind, seed, paths):
    """torch.compile (aot_eager) traces the grouped ops as two opaque custom ops: no graph break in
    fastlora code, and the same outputs and gradients as eager."""
    dynamo = pytest.importorskip("torch._dynamo")
    projs = _projections(kind, torch.float32, 0.0, True, outs=(64, 16, 16))

    def block(t):
        q, k, v = lora_qkv(t, projs)
        return q.sum(-1) + k.square().sum(-1) + v.sum(-1)

    def run(fn, x):
        xs = x.clone().requires_grad_()
        out = fn(xs)
        out.sum().backward()
        leaves = [t for p in projs for t in (p.lora_A, p.lora_B, p.bias)]
        got = [out.detach(), xs.grad] + [t.grad.clone() for t in leaves]
        for t in leaves:
            t.grad = None
        return got

    x = torch.randn(2, 5, K)
    want = run(block, x)
    dynamo.reset()
    explained = dynamo.explain(block)(x)
    assert not [b for b in explained.break_reasons if any("/fastlora/" in f.filename for f in b.user_stack)]
    dynamo.reset()
    got = run(torch.compile(block, backend="aot_eager"), x)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(a, b), i
    assert paths["grouped_fwd"] >= 2 and paths["single_fwd"] == 0, paths


@pytest.mark.parametrize("backend,grouped", [("cpp", False), ("reference", True)])
def test_bf16_gemm_mode_keeps_the_per_projection_path(backend, grouped, seed, paths, monkeypatch):
    """bf16 x on the C++ backend in its bf16 GEMM mode runs the per-projection kernels (faster than
    the grouped fp32 GEMMs there); other backends, and fp32 x, still group."""
    if backend == "cpp" and not backends.available("cpu")["cpp"]:
        pytest.skip("compiled extension not available")
    monkeypatch.setenv("FASTLORA_CPU_BF16_GEMM", "1")
    projs = _projections("nf4-dq", torch.bfloat16, 0.0, False)
    x = torch.randn(2, 5, K).to(torch.bfloat16).requires_grad_()
    ys = lora_qkv(x, projs, backend=backend)
    sum(y.float().sum() for y in ys).backward()
    assert _took(paths, grouped), paths
    paths.update(dict.fromkeys(paths, 0))
    x32 = torch.randn(2, 5, K, requires_grad=True)
    ys = lora_qkv(x32, _projections("nf4-dq", torch.float32, 0.0, False), backend=backend)
    sum(y.sum() for y in ys).backward()
    assert _took(paths, True), paths


@pytest.mark.parametrize("suffix", ["", "_reference", "_triton"])
@pytest.mark.parametrize("kind,dtype", [("dense", torch.float32), ("nf4-dq", torch.bfloat16)], ids=str)
def test_opcheck_grouped_ops(suffix, kind, dtype, seed):
    """Schemas, fake implementations and aliasing of fastlora::lora_qkv_grouped_fwd / _bwd."""
    projs = _projections(kind, dtype, 0.0, True, outs=(32, 16, 16))
    weights, absmax, preps = [], [], []
    for i, proj in enumerate(projs):
        prep, run = qkv_module.prepare(torch.empty(0, K, dtype=dtype), K, proj, f"projections[{i}]", True, "auto")
        w, am = qkv_module._WeightParts.kernel_args(prep.meta, run[4:])  # double quant resolved
        preps.append(prep)
        weights.append(w.detach())
        absmax.append(am)
    lora_A = [p.lora_A.detach() for p in projs]
    lora_B = [p.lora_B.detach() for p in projs]
    biases = [projs[0].bias.detach(), None, projs[2].bias.detach()]
    x = torch.randn(5, K).to(dtype)
    blocksize, quant_type = preps[0].meta[2:]
    fwd = getattr(torch.ops.fastlora, "lora_qkv_grouped_fwd" + suffix)
    args = (x, weights, absmax, blocksize, quant_type, lora_A, lora_B, [2.0, 0.5, 1.0], biases, "linear")
    torch.library.opcheck(fwd, args)
    ys, S = fwd(*args)
    bwd = getattr(torch.ops.fastlora, "lora_qkv_grouped_bwd" + suffix)
    grads = [torch.randn_like(ys[0]), None, torch.randn_like(ys[2])]
    torch.library.opcheck(bwd, (grads, x, S, weights, absmax, blocksize, quant_type, lora_A, lora_B, [2.0, 0.5, 1.0],
                                True, [True, False, True], [False, False, True]))


@pytest.mark.parametrize("xdt", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("same_adapter_dtype", [False, True], ids=["fp32-adapters", "x-dtype-adapters"])
@pytest.mark.parametrize("rounding", ["linear", "linear4bit"])
def test_grouped_rounding_sequence_is_the_reference(xdt, same_adapter_dtype, rounding, seed, paths):
    """Small integers make every GEMM exact whatever its summation order, so only the roundings can
    differ: y and S equal reference_lora.lora_linear_fwd of each projection bit for bit (scaling 0.3:
    its product is rounded), dA and dB equal lora_linear_bwd's (scaling 0.5 keeps them exact), and dx
    is the exact sum over the projections rounded once to x's dtype."""
    from fastlora import reference_lora

    adt = xdt if same_adapter_dtype else torch.float32
    k, outs, ranks = 64, (24, 8, 8), (4, 2, 4)

    def ints(*shape, dtype, high=15):
        # |sums| stay far below 2^24 (exact in fp32) but above 2^8 (bf16 rounds them), fp16 does not overflow
        return torch.randint(-high, high + 1, shape).to(dtype)

    x = ints(2, 9, k, dtype=xdt)
    results = {}
    for scaling in (0.3, 0.5):
        torch.manual_seed(seed)
        projs = [LoraProjection(ints(n, k, dtype=xdt), ints(r, k, dtype=adt).requires_grad_(),
                                ints(n, r, dtype=adt, high=2).requires_grad_(), scaling,
                                ints(n, dtype=xdt).requires_grad_(), rounding=rounding)
                 for n, r in zip(outs, ranks, strict=True)]
        xs = x.clone().requires_grad_()
        ys = lora_qkv(xs, projs)
        gs = [ints(2, 9, n, dtype=xdt) for n in outs]
        torch.autograd.backward(ys, gs)
        results[scaling] = (projs, xs, ys, gs)
    projs, _, ys, _ = results[0.3]
    x2d = x.reshape(-1, k)
    for proj, y in zip(projs, ys, strict=True):
        want, _ = reference_lora.lora_linear_fwd(x2d, proj.weight, None, 64, "nf4", proj.weight.shape[0], proj.lora_A,
                                                 proj.lora_B, 0.3, proj.bias, 0.0, 0, rounding)
        assert torch.equal(y.reshape(want.shape), want)
    projs, xs, _, gs = results[0.5]
    dx_exact = 0
    for proj, g in zip(projs, gs, strict=True):
        g2d = g.reshape(-1, g.shape[-1])
        _, S = reference_lora.lora_linear_fwd(x2d, proj.weight, None, 64, "nf4", proj.weight.shape[0], proj.lora_A,
                                              proj.lora_B, 0.5, proj.bias, 0.0, 0, rounding)
        _, dA, dB = reference_lora.lora_linear_bwd(g2d, x2d, S, proj.weight, None, 64, "nf4", proj.weight.shape[0],
                                                   proj.lora_A, proj.lora_B, 0.5, 0.0, 0, False, True, True)
        assert torch.equal(proj.lora_A.grad, dA) and torch.equal(proj.lora_B.grad, dB)
        assert torch.equal(proj.bias.grad, g2d.double().sum(0).to(xdt))
        g64 = g2d.double()
        dx_exact = dx_exact + g64 @ proj.weight.double() + 0.5 * (g64 @ proj.lora_B.double()) @ proj.lora_A.double()
    assert torch.equal(xs.grad.reshape(dx_exact.shape), dx_exact.to(xdt))
    assert paths["grouped_fwd"] == 2 and paths["single_fwd"] == 0, paths
