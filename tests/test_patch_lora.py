"""fastlora.patch(model, lora=..., quantize=...): LoRA without PEFT on a plain transformers model, over its
dense linears or over fastlora's own 4-bit linears. Loss and LoRA gradients equal PEFT's for the same weights
(PEFT over bitsandbytes layers holding the same 4-bit codes), the adapter saved by the handle loads into
PEFT with the same logits, unpatch removes the adapters and restores requires_grad (the 4-bit layers stay),
quantize= also works under an existing PEFT model, and bad options leave the model untouched."""

import pytest
import torch
from lora_cases import loss_and_grads
from model_zoo import VOCAB, tiny_model, to_4bit

import fastlora
from fastlora.modules.linear4bit import Linear4bit

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RTOL = 2e-6


def _ids():
    return torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(5))


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def _randomize_b(model):
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: make the LoRA branch matter
            torch.nn.init.normal_(p, std=0.05)


def _copy_lora(src, dst_peft):
    """fastlora adapter weights -> the PEFT model's default adapter (same module paths)."""
    params = dict(dst_peft.named_parameters())
    for name, p in src.named_parameters():
        if "lora_" in name:
            key = "base_model.model." + name.replace(".weight", ".default.weight")
            params[key].data.copy_(p.data)


def _assert_matches(fl_model, pm, ids):
    want_loss, want = loss_and_grads(pm, ids)
    got_loss, got = loss_and_grads(fl_model, ids)
    assert _rel(got_loss, want_loss) < RTOL
    want = {k.removeprefix("base_model.model.").replace(".default", ""): v for k, v in want.items()}
    assert got.keys() == want.keys() and want
    for name in want:
        assert _rel(got[name], want[name]) < RTOL, name


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3", "gemma", "gpt2"])
@pytest.mark.parametrize("quantize", [None, "nf4", "fp4"])
def test_lora_matches_peft(family, quantize):
    targets = "all-linear"
    model = tiny_model(family)
    handle = fastlora.patch(model, lora=fastlora.LoraConfig(r=8, lora_alpha=16, target_modules=targets),
                            quantize=quantize)
    n_linear = 2 * (4 if family in ("phi3", "gpt2") else 7)
    kinds = list(handle.kinds.values())  # LoRA layers over dense or fastlora 4-bit bases, fused MLP blocks
    assert kinds.count("LoRA layer") == n_linear and kinds.count("gated MLP") == (0 if family == "gpt2" else 2)
    assert not handle.skipped and list(handle.unchanged) == ["lm_head"]
    assert len(handle.quantized) == (n_linear if quantize else 0)
    _randomize_b(model)
    twin = tiny_model(family)
    if quantize:
        to_4bit(twin, quantize)  # bitsandbytes layers holding the very codes fastlora.nf4.quantize makes
    pm = peft.get_peft_model(twin, peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    _copy_lora(model, pm)
    _assert_matches(model, pm.train(), _ids())


def test_save_adapter_loads_into_peft_and_unpatch(tmp_path):
    model = tiny_model("llama")
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    model.eval()
    with torch.no_grad():
        plain = model(input_ids=_ids()).logits
    handle = fastlora.patch(model, lora={"r": 4, "lora_alpha": 8, "target_modules": TARGETS})
    _randomize_b(model)
    assert sum(p.requires_grad for p in model.parameters()) == 2 * 2 * 7
    with torch.no_grad():
        tuned = model(input_ids=_ids()).logits
    handle.save_adapter(tmp_path)
    loaded = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path).eval()
    with torch.no_grad():
        assert _rel(loaded(input_ids=_ids()).logits, tuned) < RTOL
    handle.unpatch()
    assert not any("lora_" in n for n, _ in model.named_parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    with torch.no_grad():
        assert torch.equal(model(input_ids=_ids()).logits, plain)


def test_quantize_under_a_peft_model():
    """quantize= on a PEFT LoRA model: the base layers under PEFT's lora.Linear become fastlora 4-bit
    linears, the PEFT layers run the fused op over them, and unpatch keeps them 4-bit."""
    pm = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    _randomize_b(pm)
    handle = fastlora.patch(pm, quantize="nf4")
    assert len(handle.quantized) == 14 and all(".base_layer" in n for n in handle.quantized)
    assert sum(kind == "LoRA layer" for kind in handle.kinds.values()) == 14 and not handle.skipped
    assert sum(kind == "gated MLP" for kind in handle.kinds.values()) == 2
    got = loss_and_grads(pm, _ids())
    assert handle.report()["fallback_calls"] == {}
    handle.unpatch()
    assert isinstance(pm.base_model.model.model.layers[0].self_attn.q_proj.base_layer, Linear4bit)
    want = loss_and_grads(pm, _ids())  # PEFT's own forward over the same fastlora 4-bit bases
    assert _rel(got[0], want[0]) < RTOL
    assert all(_rel(got[1][n], want[1][n]) < RTOL for n in want[1])


def test_bad_options_leave_the_model_untouched():
    model = tiny_model("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    with pytest.raises(ValueError, match="quantize"):
        fastlora.patch(model, quantize="int8")
    with pytest.raises(TypeError, match="lora"):
        fastlora.patch(model, lora=8)
    with pytest.raises(ValueError, match="r"):
        fastlora.patch(model, lora={"r": 0})
    with pytest.raises(ValueError, match="matched no module"):
        fastlora.patch(model, lora={"target_modules": ["nope"]}, quantize="nf4")
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all(a is b for a, b in zip(dict(model.named_modules()).values(), modules.values(), strict=True))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    pm = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(target_modules=TARGETS))
    with pytest.raises(ValueError, match="PEFT"):
        fastlora.patch(pm, lora={"r": 4})
    handle = fastlora.patch(model, lora={"r": 4})
    with pytest.raises(ValueError, match="already patched"):
        fastlora.patch(model, lora={"r": 8})
    assert fastlora.patch(model, lora={"r": 4}) is handle
