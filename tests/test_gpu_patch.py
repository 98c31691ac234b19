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
from fastlora.bench import train_setup

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
pytest.importorskip("transformers")
pytest.importorskip("peft")

# bf16 base, fp32 adapters: PEFT and fastlora round x·Wᵀ to bf16 alike, but cuBLAS / Triton sum the LoRA
# term and the GEMM tiles in other orders (as tests/test_patch_families.py's bf16 tolerance).
RTOL_BF16 = 3e-2
DEVICE = "cuda"
SPEC = train_setup.Spec(hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2, vocab=256, batch=2, seq=37)
LORA = {"rank": 16, "alpha": 32, "b_std": 0.05}  # lora_B drawn, not PEFT's zeros: the LoRA branch matters


def _qlora(tmp_path, dropout=0.0, checkpointing=True):
    pytest.importorskip("bitsandbytes")
    train_setup.base_model(SPEC).save_pretrained(tmp_path / "tiny-llama")  # stands in for a hub checkpoint
    return train_setup.qlora_from_pretrained(tmp_path / "tiny-llama", DEVICE, checkpointing=checkpointing,
                                             dropout=dropout, **LORA)


def _bf16(dropout=0.0):
    return train_setup.add_lora(train_setup.base_model(SPEC, torch.bfloat16).to(DEVICE), dropout=dropout, **LORA)


def _ids():
    return train_setup.token_batch(SPEC, seed=5).to(DEVICE)


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
