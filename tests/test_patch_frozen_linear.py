"""fastlora.patch on a bf16 model whose CPU runs torch's bf16 GEMMs on the slow portable path: the frozen dense
linears without an adapter (the lm_head, the projections the LoRA does not target) run
fastlora.ops.frozen_linear; elsewhere they are left unchanged. FASTLORA_CPU_BF16_GEMM=0 stands in for a CPU
without native bf16 (what torch_bf16_gemms_slow reads), =1 for one with it."""

from __future__ import annotations

import importlib

import pytest
import torch
from lora_cases import loss_and_grads
from model_zoo import VOCAB, tiny_model

import fastlora

peft = pytest.importorskip("peft")
frozen_module = importlib.import_module("fastlora.ops.frozen_linear")
plain_linear = importlib.import_module("fastlora.modules.plain_linear")

FROZEN = ["k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # no adapter on these
BF16_RTOL = 3e-2  # one bf16 ulp (2^-8) of difference in a layer's output moves everything after it


def _peft_bf16(family="llama"):
    model = tiny_model(family, torch.bfloat16)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    for name, p in pm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return pm.train()


def _ids():
    return torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(3))


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_slow_bf16_cpu_runs_frozen_linears_in_fp32(family, monkeypatch):
    monkeypatch.setenv("FASTLORA_CPU_BF16_GEMM", "0")
    pm = _peft_bf16(family)
    ids = _ids()
    want_loss, want_grads = loss_and_grads(pm, ids)
    calls = []
    real = plain_linear.frozen_linear
    monkeypatch.setattr(plain_linear, "frozen_linear", lambda *a: calls.append(a[1].shape) or real(*a))
    handle = fastlora.patch(pm)
    frozen = {name for name, kind in handle.kinds.items() if kind == "frozen bf16 linear"}
    expected = {n for n, _ in pm.named_modules() if n.rsplit(".", 1)[-1] in FROZEN} | {"base_model.model.lm_head"}
    assert frozen == expected and not handle.unchanged
    assert "frozen bf16 linear(s)" in handle.summary()
    got_loss, got_grads = loss_and_grads(pm, ids)
    assert len(calls) == len(expected)  # each frozen linear once in the forward
    assert handle.report()["fallback_calls"] == {}
    assert _rel(got_loss, want_loss) < BF16_RTOL
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        assert _rel(got_grads[name], want_grads[name]) < BF16_RTOL, name
    fastlora.unpatch(pm)
    assert all("forward" not in m.__dict__ for m in pm.modules() if type(m) is torch.nn.Linear)


def test_native_bf16_cpu_leaves_them_unchanged(monkeypatch):
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        pytest.skip("torch without oneDNN: its bf16 GEMMs are always the slow ones")
    monkeypatch.setenv("FASTLORA_CPU_BF16_GEMM", "1")
    handle = fastlora.patch(_peft_bf16())
    assert "frozen bf16 linear" not in handle.kinds.values()
    assert handle.unchanged["base_model.model.lm_head"] == ("dense linear without an adapter (nothing to fuse); this "
                                                            "CPU runs torch's bf16 GEMMs natively")
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)  # oneDNN off: torch's bf16 GEMMs are slow again
    assert frozen_module.torch_bf16_gemms_slow()


def test_trainable_or_fp32_linears_stay(monkeypatch):
    monkeypatch.setenv("FASTLORA_CPU_BF16_GEMM", "0")
    pm = _peft_bf16()
    pm.base_model.model.lm_head.weight.requires_grad_(True)
    handle = fastlora.patch(pm)
    assert handle.unchanged["base_model.model.lm_head"].endswith("its weight is trainable")
    fastlora.unpatch(pm)
    fp32 = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=8, target_modules=["q_proj"]))
    handle = fastlora.patch(fp32)
    assert handle.unchanged["base_model.model.lm_head"] == "dense linear without an adapter (nothing to fuse)"


def test_other_calls_fall_back_and_are_counted(monkeypatch):
    monkeypatch.setenv("FASTLORA_CPU_BF16_GEMM", "0")
    pm = _peft_bf16()
    fastlora.patch(pm)
    head = pm.base_model.model.lm_head
    h = torch.randn(3, 64).bfloat16()
    want = torch.nn.functional.linear(h.float(), head.weight.float()).bfloat16()
    assert torch.equal(head(h), want)  # one block of rows: the same fp32 products, one rounding
    state = head.__dict__["_fastlora_patch_state"]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 x cast to bf16, as F.linear under autocast
        assert torch.equal(head(h.float()), want)
    assert state.fallback_calls == 0
    with torch.autocast("cpu", dtype=torch.float16):  # not a bf16 GEMM: nn.Linear's own forward
        assert head(h).dtype == torch.float16
    assert state.fallback_calls == 1
    with pytest.raises(RuntimeError):  # fp32 x, bf16 weight, no autocast: torch's own error, as unpatched
        head(h.float())
    assert state.fallback_calls == 2
    monkeypatch.setenv("FASTLORA_CPU_BF16_GEMM", "1")  # native bf16 GEMMs from now on: torch's own forward
    if torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled:
        head(h)
        assert state.fallback_calls == 3
