"""fastlora.ops.lora_gated_mlp: against float64 ground truth (masks regenerated with the Philox mirror),
against an unpatched PEFT model's MLP block (Llama's gate/up/down and Phi-3's fused gate_up; dense
fp32, bf16 base with fp32 adapters, bitsandbytes nf4 base), on every CPU backend; exact gradients
under torch.utils.checkpoint; what is saved for backward; partial gradients; bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from lora_cases import backend_params, decoded_weight, make_weight, rel_err
from torch.utils.checkpoint import checkpoint

from fastlora import nf4, reference_lora
from fastlora.ops import _dropout_seed, lora_dropout
from fastlora.ops.lora_gated_mlp import lora_gated_mlp
from fastlora.ops.lora_projection import LoraProjection

BACKENDS = backend_params()
HIDDEN, INTER, RANK = 64, 96, 8
# Norm-wise relative error against float64 truth of the same inputs. The block rounds g, u, act(g),
# the product and y to x's dtype (as the unpatched module does): a few units of the dtype's epsilon.
TRUTH_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
# Against PEFT on the same inputs: the same roundings, only fp32 summation orders differ (bf16: a
# rounding flipped here and there, then carried through the block).
PEFT_TOL = {torch.float32: 1e-5, torch.bfloat16: 4e-3}
# PEFT's bf16 dx is four bf16-rounded terms (two base, two LoRA) added in bf16; ours two fp32 sums
# rounded once each, then added: up to ~2 units of bf16 (2^-8) apart norm-wise.
DX_TOL_BF16 = 8e-3


def _next_seeds(n: int) -> list[int]:
    """The next n dropout seeds draw_seed will take from torch's CPU generator."""
    with torch.random.fork_rng(devices=[]):
        return [int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64).item()) for _ in range(n)]


def _projection(kind, out_features, in_features, dtype, p=0.0, bias=False, scaling=2.0):
    weight = make_weight(kind, out_features, in_features, dtype)
    a = (torch.randn(RANK, in_features) / math.sqrt(in_features)).requires_grad_()
    b = (torch.randn(out_features, RANK) / math.sqrt(RANK)).requires_grad_()
    bias_t = torch.randn(out_features).mul(0.1).to(dtype).requires_grad_() if bias else None
    return LoraProjection(weight, a, b, scaling, bias_t, p)


def _block(kind, dtype, fused, p=0.0, bias=False, hidden=HIDDEN, inter=INTER):
    if fused:
        gate = _projection(kind, 2 * inter, hidden, dtype, p, bias)
        up = None
    else:
        gate = _projection(kind, inter, hidden, dtype, p, bias)
        up = _projection(kind, inter, hidden, dtype, p, bias, scaling=0.5)
    down = _projection(kind, hidden, inter, dtype, p, bias, scaling=1.5)
    return gate, up, down


def _leaves(projs) -> list[torch.Tensor]:
    out = []
    for proj in projs:
        if proj is not None:
            out += [proj.lora_A, proj.lora_B] + ([proj.bias] if proj.bias is not None else [])
    return out


def _linear64(inp, proj, x_dtype, seed):
    """One PEFT LoRA linear in float64 with the op's dropout mask for ``seed``; inp (M, in) float64."""
    w = decoded_weight(proj.weight, x_dtype)
    y = inp @ w.T
    if proj.bias is not None:
        y = y + proj.bias_64
    xd = inp
    if proj.dropout_p > 0:
        keep = reference_lora.dropout_keep_mask(seed, tuple(inp.shape), proj.dropout_p)
        xd = torch.where(keep, inp * reference_lora.dropout_scale(proj.dropout_p), torch.zeros((), dtype=inp.dtype))
    return y + proj.scaling * ((xd @ proj.a64.T) @ proj.b64.T)


class _P64:
    """float64 leaf copies of one projection's adapters and bias."""

    def __init__(self, proj):
        self.weight, self.scaling, self.dropout_p = proj.weight, proj.scaling, proj.dropout_p
        self.a64 = proj.lora_A.detach().double().requires_grad_()
        self.b64 = proj.lora_B.detach().double().requires_grad_()
        self.bias = proj.bias
        self.bias_64 = None if proj.bias is None else proj.bias.detach().double().requires_grad_()

    def grads(self):
        return [self.a64.grad, self.b64.grad] + ([self.bias_64.grad] if self.bias is not None else [])


def _truth64(x, gate, up, down, activation, seeds, grad_y):
    """Float64 y and gradients (x first, then each projection's A, B, bias) of the exact math."""
    x64 = x.detach().reshape(-1, x.shape[-1]).double().requires_grad_()
    projs = [_P64(p) for p in (gate, up, down) if p is not None]
    drop_seeds = iter(seeds)
    seed_of = [next(drop_seeds) if p.dropout_p > 0 else 0 for p in projs]
    act = F.silu if activation == "silu" else (lambda t: F.gelu(t, approximate="tanh"))
    if up is None:
        g, u = _linear64(x64, projs[0], x.dtype, seed_of[0]).chunk(2, dim=-1)
    else:
        g = _linear64(x64, projs[0], x.dtype, seed_of[0])
        u = _linear64(x64, projs[1], x.dtype, seed_of[1])
    y = _linear64(act(g) * u, projs[-1], x.dtype, seed_of[-1])
    y.backward(grad_y.reshape(y.shape).double())
    return y.detach(), [x64.grad] + [g for p in projs for g in p.grads()]


def _run(backend, x, gate, up, down, activation, seed_grad=0):
    n_drop = sum(1 for p in (gate, up, down) if p is not None and p.dropout_p > 0)
    seeds = _next_seeds(n_drop)
    y = lora_gated_mlp(x, gate, up, down, activation=activation, backend=backend)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed_grad)).to(y.dtype)
    y.backward(g)
    return y, g, seeds


def _small(backend):
    # The Triton interpreter runs each program in Python: fewer tokens keep it quick.
    return (2, 5) if backend == "triton" else (3, 37)


TRUTH_CASES = [  # (weight kind, activation, fused, dropout_p, bias)
    ("dense", "silu", False, 0.0, True),
    ("nf4-dq", "gelu_tanh", False, 0.1, False),
    ("nf4", "silu", True, 0.1, True),
    ("dense", "gelu_tanh", True, 0.0, False),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", TRUTH_CASES, ids=lambda c: "-".join(map(str, c)))
def test_against_float64(backend, dtype, case, seed):
    kind, activation, fused, p, bias = case
    gate, up, down = _block(kind, dtype, fused, p, bias)
    x = torch.randn(*_small(backend), HIDDEN).to(dtype).requires_grad_()
    y, g, seeds = _run(backend, x, gate, up, down, activation)
    assert y.shape == x.shape and y.dtype == dtype
    y64, want = _truth64(x, gate, up, down, activation, seeds, g)
    got = [x.grad.reshape(-1, HIDDEN)] + [t.grad for t in _leaves((gate, up, down))]
    tol = TRUTH_TOL[dtype]
    assert rel_err(y.reshape(-1, HIDDEN), y64) < tol
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert rel_err(a, b) < tol, i
    for proj in (gate, up, down):
        if proj is not None:
            assert proj.lora_A.grad.dtype == torch.float32


@pytest.mark.parametrize("tokens", [1, 7, 130])
def test_token_counts_and_3d_x(tokens, seed):
    gate, up, down = _block("nf4-dq", torch.float32, False, 0.1, True)
    x = torch.randn(1, tokens, HIDDEN, requires_grad=True)
    y, g, seeds = _run("auto", x, gate, up, down, "silu")
    y64, want = _truth64(x, gate, up, down, "silu", seeds, g)
    assert y.shape == (1, tokens, HIDDEN)
    assert rel_err(y.reshape(-1, HIDDEN), y64) < TRUTH_TOL[torch.float32]
    got = [x.grad.reshape(-1, HIDDEN)] + [t.grad for t in _leaves((gate, up, down))]
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert rel_err(a, b) < TRUTH_TOL[torch.float32], i


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "reference"])
def test_backends_agree_with_reference(backend, seed):
    """bf16, nf4 double quant, dropout 0.1 on every projection: each backend against the reference backend."""
    gate, up, down = _block("nf4-dq", torch.bfloat16, False, 0.1, False)
    x = torch.randn(*_small(backend), HIDDEN).to(torch.bfloat16)
    outs = {}
    for name in ("reference", backend):
        xs = x.clone().requires_grad_()
        for t in _leaves((gate, up, down)):
            t.grad = None
        torch.manual_seed(seed)
        y = lora_gated_mlp(xs, gate, up, down, backend=name)
        y.backward(torch.ones_like(y))
        outs[name] = [y, xs.grad] + [t.grad.clone() for t in _leaves((gate, up, down))]
    for i, (got, want) in enumerate(zip(outs[backend], outs["reference"], strict=True)):
        assert rel_err(got, want) < 8e-3, i


# ---------------------------------------------------------------------------------------------
# against an unpatched PEFT model


class _MaskDropout(torch.nn.Module):
    """Stand-in for PEFT's nn.Dropout applying fastlora's mask of ``seed``."""

    def __init__(self, p, seed):
        super().__init__()
        self.p, self.seed = p, seed

    def forward(self, x):
        return lora_dropout(x, self.p, self.seed, backend="reference") if self.p > 0 else x


class _Holder(torch.nn.Module):
    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp

    def forward(self, x):
        return self.mlp(x)


def _to_bnb_4bit(mlp):
    bnb = pytest.importorskip("bitsandbytes")
    for name, child in list(mlp.named_children()):
        if type(child) is torch.nn.Linear:
            q = nf4.quantize(child.weight.detach(), 64, "nf4", True)
            new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False, compute_dtype=torch.float32,
                                    quant_type="nf4", compress_statistics=True)
            new.weight = nf4.to_bnb(q)
            setattr(mlp, name, new)


def _peft_mlp(base, activation, fused, dropout):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    hidden_act = "silu" if activation == "silu" else "gelu_pytorch_tanh"
    torch.manual_seed(0)
    if fused:
        from transformers.models.phi3.modeling_phi3 import Phi3MLP

        mlp = Phi3MLP(transformers.Phi3Config(hidden_size=64, intermediate_size=128, hidden_act=hidden_act))
        targets = ["gate_up_proj", "down_proj"]
    else:
        from transformers.models.llama.modeling_llama import LlamaMLP

        mlp = LlamaMLP(transformers.LlamaConfig(hidden_size=64, intermediate_size=128, hidden_act=hidden_act))
        targets = ["gate_proj", "up_proj", "down_proj"]
    holder = _Holder(mlp)
    if base == "bf16":
        holder.to(torch.bfloat16)
    if base == "nf4":
        _to_bnb_4bit(mlp)
        holder.is_loaded_in_4bit = True  # what from_pretrained(load_in_4bit=True) sets: PEFT's lora.bnb.Linear4bit
    pm = peft.get_peft_model(holder, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=targets))
    torch.manual_seed(1)
    for name, prm in pm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(prm, std=0.05)
    layers = [getattr(mlp, t) for t in targets]
    if base == "nf4":
        from peft.tuners.lora import bnb as lora_bnb

        assert all(isinstance(layer, lora_bnb.Linear4bit) for layer in layers)
    return pm.train(), layers


def _as_projection(layer) -> LoraProjection:
    return LoraProjection(layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                          layer.scaling["default"], layer.base_layer.bias,
                          getattr(layer.lora_dropout["default"], "p", 0.0))  # nn.Identity when dropout is 0


PEFT_CASES = [  # (base, dtype of x, activation, fused, dropout, leading dims of x)
    ("dense", torch.float32, "silu", False, 0.0, (2, 65)),
    ("dense", torch.float32, "gelu_tanh", True, 0.1, (1, 7)),
    ("dense", torch.float32, "silu", False, 0.1, (1,)),
    ("bf16", torch.bfloat16, "silu", False, 0.1, (2, 65)),
    ("bf16", torch.bfloat16, "gelu_tanh", True, 0.0, (1, 1)),
    ("bf16", torch.bfloat16, "silu", True, 0.1, (7,)),
    ("nf4", torch.float32, "silu", False, 0.1, (1, 130)),
    ("nf4", torch.float32, "gelu_tanh", True, 0.0, (7,)),
]


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "triton"])
@pytest.mark.parametrize("case", PEFT_CASES, ids=lambda c: "-".join(str(v).replace("torch.", "") for v in c))
def test_matches_unpatched_peft_mlp(backend, case, seed):
    base, dtype, activation, fused, dropout, lead = case
    pm, layers = _peft_mlp(base, activation, fused, dropout)
    projs = [_as_projection(layer) for layer in layers]
    seeds = _next_seeds(len(projs)) if dropout > 0 else [0] * len(projs)
    for layer, s in zip(layers, seeds, strict=True):
        layer.lora_dropout["default"] = _MaskDropout(dropout, s)
    params = [p for p in pm.parameters() if p.requires_grad]
    assert len(params) == 2 * len(layers)
    x = torch.randn(*lead, 64, generator=torch.Generator().manual_seed(seed)).to(dtype)

    x_peft = x.clone().requires_grad_()
    y_peft = pm(x_peft)
    g = torch.randn(y_peft.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    y_peft.backward(g)
    want = [y_peft.detach(), x_peft.grad] + [p.grad.clone() for p in params]
    pm.zero_grad(set_to_none=True)

    x_ours = x.clone().requires_grad_()
    gate, up, down = (projs[0], None, projs[1]) if fused else projs
    y = lora_gated_mlp(x_ours, gate, up, down, activation=activation, backend=backend)
    assert y.dtype == dtype
    y.backward(g)
    got = [y.detach(), x_ours.grad] + [p.grad for p in params]
    tol = PEFT_TOL[dtype]
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert rel_err(a, b) < (DX_TOL_BF16 if i == 1 and dtype == torch.bfloat16 else tol), i


def test_peft_masks_are_the_ops_masks(seed):
    """The seeds predicted for the PEFT stand-in are those the op draws: with them swapped the
    PEFT comparison fails (the dropout case above cannot pass by accident)."""
    pm, layers = _peft_mlp("dense", "silu", False, 0.3)
    projs = [_as_projection(layer) for layer in layers]
    seeds = _next_seeds(3)
    for layer, s in zip(layers, reversed(seeds), strict=True):
        layer.lora_dropout["default"] = _MaskDropout(0.3, s)
    x = torch.randn(2, 9, 64)
    y_ours = lora_gated_mlp(x, *projs)
    assert rel_err(y_ours, pm(x)) > 1e-3


# ---------------------------------------------------------------------------------------------
# checkpointing, saved tensors, partial gradients


MODES = [(reentrant, preserve) for reentrant in (True, False) for preserve in (True, False)]


def _ckpt_grads(blocks, x, mode, activation):
    torch.manual_seed(4321)
    h = x.clone().requires_grad_()
    x_leaf = h
    for gate, up, down in blocks:
        def fn(t, gate=gate, up=up, down=down):
            return t + lora_gated_mlp(t, gate, up, down, activation=activation)

        h = fn(h) if mode is None else checkpoint(fn, h, use_reentrant=mode[0], preserve_rng_state=mode[1])
    loss = (h * h).sum()
    loss.backward()
    leaves = [t for blk in blocks for t in _leaves(blk)]
    grads = [x_leaf.grad] + [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
        assert _dropout_seed.pending_count(t) == 0
    return loss.detach(), grads


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "triton"])
@pytest.mark.parametrize("mode", MODES, ids=lambda m: f"reentrant={m[0]}-preserve={m[1]}")
def test_checkpoint_gives_identical_gradients(backend, mode, seed):
    blocks = [_block("nf4-dq", torch.float32, fused, 0.1, True, hidden=32, inter=48) for fused in (False, True)]
    x = torch.randn(2, 11, 32)
    loss0, plain = _ckpt_grads(blocks, x, None, "silu")
    loss1, ckpt = _ckpt_grads(blocks, x, mode, "silu")
    assert torch.equal(loss0, loss1)
    for i, (a, b) in enumerate(zip(plain, ckpt, strict=True)):
        assert torch.equal(a, b), i


def _saved_storages(fn, owned):
    """{storage ptr: (shape, nbytes)} of tensors saved for backward while running fn, owned excluded."""
    skip = {t.untyped_storage().data_ptr() for t in owned}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            saved.setdefault(ptr, (tuple(t.shape), t.untyped_storage().nbytes()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return saved, out


@pytest.mark.parametrize("fused", [False, True], ids=["gate-up", "fused-gate_up"])
def test_saves_less_than_peft(fused, seed):
    """The op saves x, S of each projection, g and u, and the seeds; among (tokens x intermediate)
    tensors only g and u. PEFT's unpatched MLP saves more (act(g), the product, ...)."""
    pm, layers = _peft_mlp("dense", "silu", fused, 0.0)
    owned = [*pm.parameters(), *pm.buffers()]
    x = torch.randn(2, 37, 64, requires_grad=True)
    tokens, inter = 74, 128
    peft_saved, y = _saved_storages(lambda: pm(x), owned + [x])
    del y
    projs = [_as_projection(layer) for layer in layers]
    gate, up, down = (projs[0], None, projs[1]) if fused else projs
    ours, y = _saved_storages(lambda: lora_gated_mlp(x, gate, up, down), owned + [x])
    ours_bytes = sum(n for _, n in ours.values()) + x.numel() * 4  # x itself is saved too (not new memory)
    peft_bytes = sum(n for _, n in peft_saved.values()) + x.numel() * 4
    ratio = ours_bytes / peft_bytes
    assert ours_bytes < peft_bytes, f"ours {ours_bytes} B vs PEFT {peft_bytes} B (ratio {ratio:.3f})"
    big = sorted(shape for shape, n in ours.values() if n >= tokens * inter * 4)
    assert big == ([(tokens, 2 * inter)] if fused else [(tokens, inter), (tokens, inter)]), big
    g_and_u = [4 * tokens * 2 * inter] if fused else [4 * tokens * inter] * 2
    want = g_and_u + [4 * tokens * RANK] * len(projs) + [8] * len(projs)  # g, u; S of each projection; seeds
    assert sorted(n for _, n in ours.values()) == sorted(want), f"ratio ours/PEFT {ratio:.3f}"
    y.sum().backward()


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("fused", [False, True], ids=["gate-up", "fused-gate_up"])
def test_compute_dtype_projections_match_peft(fused, dropout, seed):
    """fp32 x into bitsandbytes layers computing in bf16 (prepare_model_for_kbit_training): each base product in
    bf16 on the cast x (bit-identical to bitsandbytes on the CPU), the LoRA terms in fp32, as PEFT computes them;
    saved for backward among (tokens x intermediate) tensors still only g and u (fp32)."""
    pm, layers = _peft_mlp("nf4", "silu", fused, dropout)
    for layer in layers:
        layer.base_layer.compute_dtype = torch.bfloat16
    projs = [_as_projection(layer)._replace(compute_dtype=torch.bfloat16) for layer in layers]
    seeds = _next_seeds(len(projs)) if dropout > 0 else [0] * len(projs)
    for layer, s in zip(layers, seeds, strict=True):
        layer.lora_dropout["default"] = _MaskDropout(dropout, s)
    params = [p for p in pm.parameters() if p.requires_grad]
    x = torch.randn(3, 41, 64, generator=torch.Generator().manual_seed(seed))
    g = torch.randn(3, 41, 64, generator=torch.Generator().manual_seed(seed + 1))
    x_peft = x.clone().requires_grad_()
    y_peft = pm(x_peft)
    y_peft.backward(g)
    want = [y_peft.detach(), x_peft.grad] + [p.grad.clone() for p in params]
    pm.zero_grad(set_to_none=True)

    x_ours = x.clone().requires_grad_()
    gate, up, down = (projs[0], None, projs[1]) if fused else projs
    owned = [*pm.parameters(), *pm.buffers(), x_ours]
    saved, y = _saved_storages(lambda: lora_gated_mlp(x_ours, gate, up, down), owned)
    assert y.dtype == torch.float32
    y.backward(g)
    got = [y.detach(), x_ours.grad] + [p.grad for p in params]
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert rel_err(a, b) < PEFT_TOL[torch.float32], i
    tokens, inter = 3 * 41, 128
    big = sorted(shape for shape, n in saved.values() if n >= tokens * inter * 4)
    assert big == ([(tokens, 2 * inter)] if fused else [(tokens, inter), (tokens, inter)]), big


@pytest.mark.parametrize("which", ["x-only", "no-x", "down-only", "gate-bias"])
def test_only_the_needed_gradients(which, seed):
    gate, up, down = _block("nf4-dq", torch.float32, False, 0.2, True)
    x = torch.randn(3, 13, HIDDEN)
    groups = {"gate": _leaves((gate,)), "up": _leaves((up,)), "down": _leaves((down,))}
    full = [x.clone().requires_grad_()] + [t.detach().clone().requires_grad_() for g in groups.values() for t in g]

    def rebuild(leaves):
        xs, ga, gb, gbias, ua, ub, ubias, da, db, dbias = leaves
        return (xs, gate._replace(lora_A=ga, lora_B=gb, bias=gbias), up._replace(lora_A=ua, lora_B=ub, bias=ubias),
                down._replace(lora_A=da, lora_B=db, bias=dbias))

    torch.manual_seed(seed)
    xs, g_, u_, d_ = rebuild(full)
    lora_gated_mlp(xs, g_, u_, d_).square().sum().backward()
    wanted = {"x-only": [0], "no-x": list(range(1, 10)), "down-only": [7, 8, 9], "gate-bias": [3]}[which]
    part = [t.detach().clone().requires_grad_(i in wanted) for i, t in enumerate(full)]
    torch.manual_seed(seed)
    xs, g_, u_, d_ = rebuild(part)
    # the call sites are new tensors: the seeds must still be consumed by the backward
    lora_gated_mlp(xs, g_, u_, d_).square().sum().backward()
    for i, (f, p) in enumerate(zip(full, part, strict=True)):
        if i in wanted:
            assert torch.equal(p.grad, f.grad), i
        else:
            assert p.grad is None, i
    for t in part[1:]:
        assert _dropout_seed.pending_count(t) == 0


def test_eval_mode_has_no_dropout_and_inputs_untouched(seed):
    gate, up, down = _block("nf4-dq", torch.float32, False, 0.3, True)
    x = torch.randn(5, HIDDEN)
    before = [t.detach().clone() for t in (x, *_leaves((gate, up, down)), down.weight.packed)]
    y_eval = lora_gated_mlp(x, gate, up, down, training=False)
    no_drop = [p._replace(dropout_p=0.0) for p in (gate, up, down)]
    assert torch.equal(y_eval, lora_gated_mlp(x, *no_drop))
    lora_gated_mlp(x, gate, up, down).sum().backward()
    after = [t.detach() for t in (x, *_leaves((gate, up, down)), down.weight.packed)]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


# ---------------------------------------------------------------------------------------------
# bad input


def _good():
    gate, up, down = _block("dense", torch.float32, False)
    return dict(x=torch.randn(5, HIDDEN), gate=gate, up=up, down=down)


def _bad_cases():
    g = _good()
    return [
        (dict(x=torch.randn(5, HIDDEN).to(torch.int32)), TypeError, "x must have dtype"),
        (dict(x=torch.randn(5, HIDDEN + 1)), ValueError, "gate.weight has in_features"),
        (dict(gate=(1, 2, 3)), TypeError, "gate must be a fastlora.ops.LoraProjection"),
        (dict(up=g["up"]._replace(lora_A=torch.randn(RANK, HIDDEN + 1))), ValueError, "up.lora_A"),
        (dict(up=g["up"]._replace(weight=torch.randn(INTER + 1, HIDDEN), lora_B=torch.randn(INTER + 1, RANK))),
         ValueError, "same out_features"),
        (dict(down=g["down"]._replace(weight=torch.randn(HIDDEN, INTER + 2))), ValueError,
         "down.weight .*intermediate"),
        (dict(down=g["down"]._replace(scaling=float("nan"))), ValueError, "down.scaling"),
        (dict(down=g["down"]._replace(dropout_p=1.0)), ValueError, "down.dropout_p"),
        (dict(gate=g["gate"]._replace(bias=torch.randn(3))), ValueError, "gate.bias"),
        (dict(gate=g["gate"]._replace(weight=torch.randn(INTER, HIDDEN).double())), TypeError, "gate.weight"),
        (dict(gate=g["gate"]._replace(rounding="fast")), ValueError, "gate.rounding"),
        (dict(activation="relu"), ValueError, "activation"),
        (dict(backend="gpu"), ValueError, "backend"),
        (dict(up=None), ValueError, "gate .*even|down.weight"),
        (dict(gate=g["gate"]._replace(compute_dtype=torch.bfloat16)), ValueError, "gate.compute_dtype .*4-bit"),
        (dict(gate=g["gate"]._replace(compute_dtype=torch.int8)), TypeError, "gate.compute_dtype"),
    ]


@pytest.mark.parametrize("index", range(len(_bad_cases())))
def test_bad_input_names_the_argument(index):
    change, error, words = _bad_cases()[index]
    args = _good() | change
    x = args.pop("x")
    with pytest.raises(error, match=words):
        lora_gated_mlp(x, args.pop("gate"), args.pop("up"), args.pop("down"), **args)


def test_fused_gate_up_needs_even_outputs():
    gate = _projection("dense", 2 * INTER + 1, HIDDEN, torch.float32)
    down = _projection("dense", HIDDEN, INTER, torch.float32)
    with pytest.raises(ValueError, match="even number of outputs"):
        lora_gated_mlp(torch.randn(3, HIDDEN), gate, None, down)


@pytest.mark.parametrize("fused,activation", [(False, "silu"), (True, "gelu_tanh")])
def test_gradcheck_float64(fused, activation, seed):
    gate, up, down = _block("nf4", torch.float64, fused, 0.3, True, hidden=16, inter=12)
    gate, up, down = (None if p is None else p._replace(lora_A=p.lora_A.detach().double().requires_grad_(),
                                                       lora_B=p.lora_B.detach().double().requires_grad_())
                      for p in (gate, up, down))
    x = torch.randn(2, 3, 16, dtype=torch.float64, requires_grad=True)
    leaves = _leaves((gate, up, down))

    def fn(x, *adapters):
        it = iter(adapters)
        projs = [None if p is None else p._replace(lora_A=next(it), lora_B=next(it), bias=next(it))
                 for p in (gate, up, down)]
        torch.manual_seed(seed)  # the same masks on every evaluation
        return lora_gated_mlp(x, *projs, activation=activation)

    assert torch.autograd.gradcheck(fn, (x, *leaves), fast_mode=True)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "triton"])
def test_empty_tokens(backend):
    gate, up, down = _block("nf4-dq", torch.float32, True, 0.1, True)
    x = torch.randn(0, HIDDEN, requires_grad=True)
    y = lora_gated_mlp(x, gate, up, down, backend=backend)
    assert y.shape == (0, HIDDEN)
    y.sum().backward()
    assert x.grad.shape == (0, HIDDEN) and torch.equal(gate.lora_A.grad, torch.zeros_like(gate.lora_A))
