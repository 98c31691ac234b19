"""fastlora.patch's grouped q/k/v (fastlora/modules/grouped_qkv.py): each attention forward runs its three LoRA
projections as one ``ops.lora_qkv`` call (counted with a spy), the model equals unpatched PEFT and the same model
patched with fuse_projections=False (projections one by one), under gradient checkpointing too; an attention that
reads k / v from another input than q stops grouping after its first call, with correct results; unpatch restores
the module; fastlora's own lora= layers group as well."""

import pytest
import torch
from lora_cases import loss_and_grads
from model_zoo import VOCAB, tiny_model, to_4bit

import fastlora
from fastlora.modules import _instance, grouped_qkv

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _peft_model(family: str, base: str, dropout: float = 0.0):
    model = tiny_model(family)
    if base == "nf4":
        model = to_4bit(model, "nf4")
    torch.manual_seed(1)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                    lora_dropout=dropout))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    return pm.train()


def _ids():
    return torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _close(got, want, rtol):
    assert _rel(got[0], want[0]) < rtol
    assert got[1].keys() == want[1].keys() and want[1]
    worst = max(_rel(got[1][n], want[1][n]) for n in want[1])
    assert worst < rtol, worst


@pytest.fixture
def qkv_calls(monkeypatch):
    calls = []
    real = grouped_qkv.lora_qkv

    def spy(x, projections, **kw):
        calls.append(len(projections))
        return real(x, projections, **kw)

    monkeypatch.setattr(grouped_qkv, "lora_qkv", spy)
    return calls


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma"])
@pytest.mark.parametrize("base", ["dense", "nf4"])
def test_grouped_matches_peft(family, base, qkv_calls):
    pm = _peft_model(family, base)
    ids = _ids()
    want = loss_and_grads(pm, ids)
    handle = fastlora.patch(pm)
    attention = [n for n, k in handle.kinds.items() if k == "grouped q/k/v"]
    assert len(attention) == 2 and all(n.endswith("self_attn") for n in attention)
    got = loss_and_grads(pm, ids)
    assert qkv_calls == [3, 3]  # one grouped call per attention forward, none per projection
    _close(got, want, 2e-5)
    assert handle.report()["fallback_calls"] == {}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("checkpointing", [None, "reentrant", "non-reentrant"])
def test_grouped_equals_one_by_one(dropout, checkpointing, qkv_calls):
    """Same seeds drawn in the same order: the grouped run equals fuse_projections=False (projections one by one)."""
    results = []
    for fuse in (True, False):
        pm = _peft_model("llama", "nf4", dropout)
        if checkpointing:
            pm.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"})
        fastlora.patch(pm, fuse_projections=fuse)
        torch.manual_seed(5)
        results.append(loss_and_grads(pm, _ids()))
    assert qkv_calls == [3, 3] * (2 if checkpointing else 1)  # checkpointing recomputes each attention once
    _close(*results, 1e-5)


class _CrossAttention(torch.nn.Module):
    """q from x, k and v from a memory: the group computes all three on x first, then sees k read another input."""

    def __init__(self, d=32):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (torch.nn.Linear(d, d, bias=False) for _ in range(3))

    def forward(self, x, memory):
        q, k, v = self.q_proj(x), self.k_proj(memory), self.v_proj(memory)
        return torch.softmax(q @ k.transpose(-1, -2), -1) @ v


class _Holder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = _CrossAttention()

    def forward(self, x, memory):
        return self.attn(x, memory)


def test_attention_reading_another_input_stops_grouping(qkv_calls):
    torch.manual_seed(0)
    pm = peft.get_peft_model(_Holder(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj",
                                                                                           "v_proj"]))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    x, memory = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    want = pm(x, memory)
    handle = fastlora.patch(pm)
    attn = pm.base_model.model.attn
    assert handle.kinds["base_model.model.attn"] == "grouped q/k/v"
    first = pm(x, memory)
    assert _instance.state_of(attn).grouping is False and qkv_calls == [3]
    second = pm(x, memory)
    assert qkv_calls == [3]  # no group any more: the projections run one by one
    assert _rel(first, want) < 1e-5 and _rel(second, want) < 1e-5  # q grouped, then alone: other GEMM sums
    handle.unpatch()
    assert "forward" not in attn.__dict__ and _instance.state_of(attn) is None
    assert torch.equal(pm(x, memory), want)


def test_own_lora_layers_group_too(qkv_calls):
    results = []
    for fuse in (True, False):
        model = tiny_model("llama")
        torch.manual_seed(3)
        handle = fastlora.patch(model, lora=fastlora.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
                                quantize="nf4", fuse_projections=fuse)
        assert sum(k == "grouped q/k/v" for k in handle.kinds.values()) == (2 if fuse else 0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(len(name)))
        results.append(loss_and_grads(model, _ids()))
    assert qkv_calls == [3, 3]
    _close(*results, 1e-5)


def test_inference_mode_and_generate(qkv_calls):
    pm = _peft_model("llama", "nf4")
    ids = _ids()
    with torch.no_grad():
        want = pm(input_ids=ids).logits
    fastlora.patch(pm)
    pm.eval()
    with torch.inference_mode():
        got = pm(input_ids=ids).logits
    assert qkv_calls == [3, 3] and _rel(got, want) < 2e-5
    out = pm.generate(input_ids=ids[:1, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7) and len(qkv_calls) > 2
