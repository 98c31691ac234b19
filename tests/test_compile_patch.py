"""``torch.compile`` of fastlora-patched PEFT models (tiny Llama, dense fp32 and bitsandbytes nf4 bases): forward
and backward of one patched layer, one fused gated MLP block and the whole model match eager (backend
"aot_eager": the graphs are traced and run through AOTAutograd, no C++ build; inductor is tried once on one layer,
marked slow). Graph breaks are counted with ``torch._dynamo.explain`` and attributed to fastlora when fastlora
code is on the break's user stack.

Known gap (strict xfail below, so it fails loudly once fixed): every fused op call breaks the graph twice, at
``int(seed_t.item())`` in ``_LoraLinearFunction.forward`` (fastlora/ops/lora_linear.py), which turns the seed tensor
into a Python int for the op schema's ``int seed`` (dynamo first tries to trace the autograd.Function, breaks,
and breaks again inside its forward). With ``capture_scalar_outputs=True`` the op fails instead (the schema would
need ``SymInt``) and ``apply`` also breaks for getting lora_A twice ("duplicate tensor input": ``lora_A.contiguous()``
and ``lora_A``). The compiled model is still correct: the pieces between breaks are compiled, the ops run eagerly.
Measured (2 shared cores): a whole tiny Llama compiles to ~30 graphs with aot_eager, ~35 s for the first
forward + backward; hence those tests are marked slow.

Dropout seeds are drawn eagerly (``torch.compiler.disable`` on fastlora.ops._dropout_seed.draw_seed), so a
compiled model draws a fresh seed from torch's generator on every call (never a constant baked into the graph)
and the same ``torch.manual_seed`` gives the same masks as eager.
"""

import time

import pytest
import torch
import torch._dynamo as dynamo
from model_zoo import VOCAB, tiny_model, to_4bit

import fastlora

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")

RTOL = 1e-5  # fp32: the same ops, at most regrouped by AOTAutograd


def _patched(base: str, dropout: float = 0.0):
    model = tiny_model("llama")
    if base == "nf4":
        model = to_4bit(model, "nf4")
    torch.manual_seed(1)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=dropout)
    model = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    handle = fastlora.patch(model)
    return model.train(), handle


def _parts(model):
    layer0 = model.get_base_model().model.layers[0]
    return {"layer": layer0.self_attn.q_proj, "mlp": layer0.mlp}


def _rel(got, want):
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def _fwd_bwd(fn, module, x):
    """(output, d x, {name: grad} of the trainable parameters) of sum(out · w) for a fixed w."""
    x = x.detach().requires_grad_()
    torch.manual_seed(9)
    out = fn(x)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (out * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}
    module.zero_grad(set_to_none=True)
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("base", ["dense", "nf4"])
@pytest.mark.parametrize("part", ["layer", "mlp"])
def test_compiled_part_matches_eager(base, part):
    model, handle = _patched(base)
    module = _parts(model)[part]
    x = torch.randn(2, 5, 64)
    want = _fwd_bwd(module, module, x)
    dynamo.reset()
    got = _fwd_bwd(torch.compile(module, backend="aot_eager"), module, x)
    assert _rel(got[0], want[0]) < RTOL and _rel(got[1], want[1]) < RTOL
    assert got[2].keys() == want[2].keys() and want[2]
    assert max(_rel(got[2][n], want[2][n]) for n in want[2]) < RTOL
    assert handle.report()["fallback_calls"] == {}


@pytest.mark.slow
@pytest.mark.parametrize("base", ["dense", "nf4"])
def test_compiled_model_matches_eager(base):
    model, handle = _patched(base)
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))

    def step(fn):
        loss = fn(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        return loss.detach(), grads

    want_loss, want = step(model)
    dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    got_loss, got = step(compiled)
    again_loss, _ = step(compiled)  # a second call reuses the compiled graphs
    assert _rel(got_loss, want_loss) < RTOL and torch.equal(again_loss, got_loss)
    assert got.keys() == want.keys() and want
    assert max(_rel(got[n], want[n]) for n in want) < RTOL
    assert handle.report()["fallback_calls"] == {}


def _fastlora_breaks(fn, *args):
    dynamo.reset()
    explained = dynamo.explain(fn)(*args)
    return [b for b in explained.break_reasons if any("/fastlora/" in f.filename for f in b.user_stack)]


@pytest.mark.xfail(strict=True, reason="fastlora/ops/lora_linear.py breaks the graph (see the module docstring)")
@pytest.mark.parametrize("part", ["layer", "mlp"])
def test_no_graph_break_from_fastlora_ops(part):
    model, _ = _patched("nf4")
    breaks = _fastlora_breaks(_parts(model)[part], torch.randn(2, 5, 64))
    assert not breaks, [str(b.reason).splitlines()[0] for b in breaks]


def test_graph_breaks_from_fastlora_are_the_known_two_per_op():
    """Pins the known gap: exactly the two breaks per fused call that the module docstring names, nothing else."""
    model, _ = _patched("nf4")
    breaks = _fastlora_breaks(_parts(model)["layer"], torch.randn(2, 5, 64))
    assert len(breaks) == 2, [str(b.reason).splitlines()[0] for b in breaks]
    for b in breaks:
        assert "Tensor.item()" in str(b.reason)
        last = b.user_stack[-1]
        assert last.filename.endswith("fastlora/ops/lora_linear.py") and "seed_t.item()" in last.line


@pytest.mark.parametrize("part", ["layer", "mlp"])
def test_compiled_dropout_draws_fresh_masks(part):
    model, _ = _patched("dense", dropout=0.5)
    module = _parts(model)[part]
    x = torch.randn(2, 5, 64)
    dynamo.reset()
    compiled = torch.compile(module, backend="aot_eager")
    first, second = _fwd_bwd(compiled, module, x), _fwd_bwd(compiled, module, x)
    assert torch.equal(first[0], second[0])  # _fwd_bwd seeds torch's generator the same way: same masks
    with torch.no_grad():
        torch.manual_seed(9)
        a = compiled(x)
        b = compiled(x)  # the generator moved on: another seed, another mask
    assert not torch.equal(a, b)
    eager = _fwd_bwd(module, module, x)  # same seed as the compiled calls: the same masks, forward and backward
    assert _rel(first[0], eager[0]) < RTOL and _rel(first[1], eager[1]) < RTOL
    assert max(_rel(first[2][n], eager[2][n]) for n in eager[2]) < RTOL


@pytest.mark.slow
def test_inductor_compiles_a_patched_layer():
    model, _ = _patched("nf4")
    module = _parts(model)["layer"]
    x = torch.randn(2, 5, 64)
    want = _fwd_bwd(module, module, x)
    dynamo.reset()
    start = time.perf_counter()
    got = _fwd_bwd(torch.compile(module, backend="inductor"), module, x)
    print(f"inductor first call (compile + run, forward and backward): {time.perf_counter() - start:.1f} s")
    assert _rel(got[0], want[0]) < RTOL and _rel(got[1], want[1]) < RTOL
    assert max(_rel(got[2][n], want[2][n]) for n in want[2]) < RTOL
