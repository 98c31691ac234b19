"""``torch.compile`` of fastlora-patched PEFT models (tiny Llama, dense fp32 and bitsandbytes nf4 bases): forward
and backward of one patched layer, one fused gated MLP block and the whole model match eager (backend
"aot_eager": the graphs are traced and run through AOTAutograd, no C++ build; inductor is tried once on one layer,
marked slow). Graph breaks are counted with ``torch._dynamo.explain`` and attributed to fastlora when fastlora
code is on the break's user stack.

fastlora's ops cause no graph break: the dropout / NEFTune seed is a ``Tensor seed`` argument of the custom ops,
drawn inside the graph (``torch.randint`` in fastlora.ops._dropout_seed.draw_seed) and never read on the host. So a
compiled model draws a fresh seed on every call (never a constant baked into the graph: checked on the captured FX
graphs below, the mechanism that keeps CUDA-graph replays fresh), and with aot_eager (or inductor's
``fallback_random``) the same ``torch.manual_seed`` gives the same masks as eager.
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


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("part", ["layer", "mlp"])
def test_no_graph_break_from_fastlora_ops(part, dropout):
    model, _ = _patched("nf4", dropout=dropout)
    breaks = _fastlora_breaks(_parts(model)[part], torch.randn(2, 5, 64))
    assert not breaks, [str(b.reason).splitlines()[0] for b in breaks]


@pytest.mark.parametrize("base", ["dense", "nf4"])
def test_whole_patched_model_has_no_fastlora_graph_break(base):
    """The whole model: LoRA dropout on every projection, the fused gated MLPs and the NEFTune embedding."""
    model, handle = _patched(base, dropout=0.1)
    handle.unpatch()
    fastlora.patch(model, neftune_alpha=5.0)
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))
    breaks = _fastlora_breaks(lambda ids: model(input_ids=ids).logits, ids)
    assert not breaks, [str(b.reason).splitlines()[0] for b in breaks]


def _seed_sources(graph: torch.fx.Graph) -> dict[str, list[str]]:
    """For every fastlora op node of an ATen-level graph: what produces its ``seed`` argument."""
    sources: dict[str, list[str]] = {}
    for node in graph.nodes:
        target = str(node.target)
        if node.op != "call_function" or not target.startswith("fastlora.") or "seed" not in str(node.target._schema):
            continue
        names = [a.name for a in node.target._schema.arguments]
        seed = node.kwargs.get("seed", node.args[names.index("seed")] if len(node.args) > names.index("seed") else None)
        what = f"{seed.op}:{seed.target}" if isinstance(seed, torch.fx.Node) else f"constant {seed!r}"
        sources.setdefault(target.split(".")[1], []).append(what)
    return sources


def test_seed_is_drawn_inside_the_captured_graph():
    """What keeps a replayed (CUDA) graph drawing fresh noise: in the graph AOTAutograd hands the backend, every
    fastlora op's seed is an input tensor produced by an in-graph ``aten.randint`` (dropout, NEFTune) or a zero
    tensor (no dropout), never a Python int fixed at capture."""
    from torch._functorch.aot_autograd import aot_module_simplified

    model, handle = _patched("nf4", dropout=0.1)
    module = _parts(model)["mlp"]
    graphs = []

    def capture(gm, example_inputs):
        def fw(gm2, inputs):
            graphs.append(gm2.graph)
            return gm2.forward

        return aot_module_simplified(gm, example_inputs, fw_compiler=fw)

    dynamo.reset()
    torch.compile(module, backend=capture)(torch.randn(2, 5, 64))
    sources = [s for g in graphs for ss in _seed_sources(g).values() for s in ss]
    assert len(sources) == 3  # gate, up and down projections of the fused MLP
    assert all(s.startswith("call_function:aten.randint") for s in sources), sources


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
