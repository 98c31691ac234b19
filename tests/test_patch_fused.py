"""fastlora.patch's fused gated MLP blocks: accepted only when the block's own forward and activation are
what the fused op computes (a look-alike with another formula or activation is skipped with the reason),
fuse_projections=False leaves them out with the same results, patching does not touch bitsandbytes'
first-call state, and a patched model saves fewer bytes for backward than the unpatched PEFT model."""

import pytest
import torch
from lora_cases import loss_and_grads
from model_zoo import VOCAB, tiny_model, to_4bit

import fastlora

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


class _SwappedMLP(torch.nn.Module):
    """Looks like a Llama MLP, computes down(act(up(x)) * gate(x))."""

    def __init__(self, hidden=64, inter=128, act=None):
        super().__init__()
        self.gate_proj = torch.nn.Linear(hidden, inter, bias=False)
        self.up_proj = torch.nn.Linear(hidden, inter, bias=False)
        self.down_proj = torch.nn.Linear(inter, hidden, bias=False)
        self.act_fn = act or torch.nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))


class _LlamaLikeMLP(_SwappedMLP):
    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _lora(model):
    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj",
                                                                                         "down_proj"]))


def test_look_alikes_are_not_fused():
    torch.manual_seed(0)
    swapped = _lora(torch.nn.Sequential(_SwappedMLP()))
    handle = fastlora.patch(swapped)
    assert list(handle.skipped.values()) == ["_SwappedMLP.forward is not down(act(gate(x)) * up(x))"]
    relu = _lora(torch.nn.Sequential(_LlamaLikeMLP(act=torch.nn.ReLU())))
    assert list(fastlora.patch(relu).skipped.values()) == ["activation ReLU is neither SiLU nor GELU-tanh"]
    gelu = _lora(torch.nn.Sequential(_LlamaLikeMLP(act=torch.nn.GELU(approximate="tanh"))))
    handle = fastlora.patch(gelu)
    assert "gated MLP" in handle.kinds.values() and not handle.skipped
    x = torch.randn(3, 5, 64)
    loss = gelu(x).square().sum()
    loss.backward()
    assert handle.report()["fallback_calls"] == {}


def test_fuse_projections_false_gives_the_same_results():
    ids = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(5))
    results = []
    for fuse in (True, False):
        pm = peft.get_peft_model(tiny_model("gemma"), peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        torch.manual_seed(1)
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
        handle = fastlora.patch(pm, fuse_projections=fuse)
        assert ("gated MLP" in handle.kinds.values()) == fuse
        results.append(loss_and_grads(pm, ids))
    (loss_f, grads_f), (loss_u, grads_u) = results
    assert torch.allclose(loss_f, loss_u, rtol=1e-6, atol=0)
    for name in grads_u:
        scale = grads_u[name].abs().max()
        assert (grads_f[name] - grads_u[name]).abs().max() <= 2e-6 * scale, name


def test_probe_leaves_bitsandbytes_state_alone():
    pytest.importorskip("bitsandbytes")
    model = to_4bit(tiny_model("llama"), "nf4")
    for m in model.modules():
        if hasattr(m, "compute_type_is_set"):
            m.compute_dtype, m.compute_type_is_set = None, False
    pm = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")).eval()
    before = [(m.compute_dtype, m.compute_type_is_set, m.weight.data_ptr()) for m in pm.modules()
              if hasattr(m, "compute_type_is_set")]
    fastlora.patch(pm)
    after = [(m.compute_dtype, m.compute_type_is_set, m.weight.data_ptr()) for m in pm.modules()
             if hasattr(m, "compute_type_is_set")]
    assert after == before


def _saved_bytes(model, ids):
    """Bytes saved for backward in one forward (unique storages, parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return sum(seen.values())


def test_patched_model_saves_less_for_backward():
    ids = torch.randint(3, VOCAB, (2, 64), generator=torch.Generator().manual_seed(5))
    pm = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1,
                                                                  target_modules="all-linear"))
    unpatched = _saved_bytes(pm, ids)
    fastlora.patch(pm)
    patched = _saved_bytes(pm, ids)
    assert patched < 0.8 * unpatched, (patched, unpatched, patched / unpatched)
