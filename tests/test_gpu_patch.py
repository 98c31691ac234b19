"""fastlora.patch on a GPU, the way a user trains (skipped without CUDA): a QLoRA Llama loaded with
transformers' ``BitsAndBytesConfig`` (bitsandbytes quantizes it on the GPU), prepared for k-bit training
and wrapped by PEFT; and a bf16 Llama with PEFT LoRA. Loss and every adapter gradient match the
unpatched model, no patched call falls back to the reference, checkpointing recomputes the same dropout
masks, and unpatch gives back the unpatched outputs bit for bit."""

from __future__ import annotations

import pytest
import torch
from lora_cases import loss_and_grads

import fastlora

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

# bf16 base, fp32 adapters: PEFT and fastlora round x·Wᵀ to bf16 alike, but cuBLAS / Triton sum the LoRA
# term and the GEMM tiles in other orders (as tests/test_patch_families.py's bf16 tolerance).
RTOL_BF16 = 3e-2
VOCAB = 256
DEVICE = "cuda"


def _config():
    return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def _lora(model, dropout):
    config = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules="all-linear")
    pm = peft.get_peft_model(model, config)
    torch.manual_seed(1)
    for name, p in pm.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero: make the LoRA branch matter
            torch.nn.init.normal_(p, std=0.05)
    return pm.train()


def _qlora(tmp_path, dropout=0.0, checkpointing=True):
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(_config()).save_pretrained(tmp_path / "tiny-llama")
    quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_use_double_quant=True,
                                                   bnb_4bit_compute_dtype=torch.bfloat16)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "tiny-llama", quantization_config=quantization,
                                                              device_map={"": DEVICE}, dtype=torch.bfloat16)
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    return _lora(model, dropout)


def _bf16(dropout=0.0):
    torch.manual_seed(0)
    return _lora(transformers.LlamaForCausalLM(_config()).to(DEVICE, torch.bfloat16), dropout)


def _ids():
    return torch.randint(3, VOCAB, (2, 37), generator=torch.Generator().manual_seed(5)).to(DEVICE)


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def _check_against_unpatched(pm):
    ids = _ids()
    want_loss, want = loss_and_grads(pm, ids)
    with torch.no_grad():
        logits_before = pm(input_ids=ids).logits
    handle = fastlora.patch(pm)
    assert handle.patched and not handle.skipped, handle.summary()
    got_loss, got = loss_and_grads(pm, ids)
    assert handle.report()["fallback_calls"] == {}, handle.report()["fallback_calls"]
    assert _rel(got_loss, want_loss) < RTOL_BF16, (got_loss, want_loss)
    assert got.keys() == want.keys() and want
    worst = max(want, key=lambda n: _rel(got[n], want[n]))
    assert _rel(got[worst], want[worst]) < RTOL_BF16, (worst, _rel(got[worst], want[worst]))
    handle.unpatch()
    with torch.no_grad():
        assert torch.equal(pm(input_ids=ids).logits, logits_before)


def test_qlora_from_bitsandbytes_config(tmp_path):
    pm = _qlora(tmp_path)
    kinds = {type(m).__name__ for m in pm.modules()}
    assert "Linear4bit" in kinds and next(pm.parameters()).device.type == DEVICE
    # prepare_model_for_kbit_training's default, as users get it
    assert any(getattr(m, "gradient_checkpointing", False) for m in pm.modules())
    _check_against_unpatched(pm)


def test_bf16_lora():
    _check_against_unpatched(_bf16())


@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpointing_recomputes_the_same_dropout(tmp_path, reentrant):
    """With dropout, the patched model's adapter gradients are the same with and without gradient
    checkpointing: the masks are regenerated from their seeds, not stored and not redrawn."""
    pm = _qlora(tmp_path, dropout=0.1, checkpointing=False)
    fastlora.patch(pm)
    ids = _ids()
    _, plain = loss_and_grads(pm, ids)
    pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        pm.enable_input_require_grads()
    _, ckpt = loss_and_grads(pm, ids)
    assert plain.keys() == ckpt.keys() and plain
    for name in plain:  # the same kernels on the same inputs: equal up to atomics' summation order
        assert _rel(ckpt[name], plain[name]) < 1e-5, name
