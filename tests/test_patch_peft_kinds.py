"""PEFT models of other kinds keep working after fastlora.patch: prompt tuning and prefix tuning over a
bitsandbytes 4-bit model (fastlora runs the frozen 4-bit linears and, with neftune_alpha, the embedding),
and bias-only training (BitFit) whose trainable biases get their gradients through the fused 4-bit op.
Loss and every trainable gradient match the unpatched model."""

import pytest
import torch
from lora_cases import loss_and_grads
from model_zoo import VOCAB, tiny_model, to_4bit

import fastlora

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

RTOL = 2e-6


def _ids():
    return torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(5))


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _check(model, n_4bit):
    ids = _ids()
    want_loss, want = loss_and_grads(model, ids)
    handle = fastlora.patch(model)
    assert list(handle.kinds.values()).count("4-bit linear") == n_4bit and not handle.skipped, handle.summary()
    got_loss, got = loss_and_grads(model, ids)
    assert handle.report()["fallback_calls"] == {}
    assert _rel(got_loss, want_loss) < RTOL
    assert got.keys() == want.keys() and want
    for name in want:
        assert _rel(got[name], want[name]) < RTOL, name
    handle.unpatch()
    assert torch.equal(loss_and_grads(model, ids)[0], want_loss)


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_prompt_and_prefix_tuning_over_4bit(kind):
    base = to_4bit(tiny_model("llama"), "nf4")
    if kind == "prompt":
        config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    else:
        config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    model = peft.get_peft_model(base, config).train()
    _check(model, 14)


def test_bitfit_over_4bit_qwen2():
    """Qwen2's q/k/v projections have a bias: train only biases; their gradients come through linear_4bit."""
    model = to_4bit(tiny_model("qwen2"), "fp4")
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("bias"))
    assert sum(p.requires_grad for p in model.parameters()) == 6
    _check(model.train(), 14)


def test_prompt_tuning_with_neftune():
    base = to_4bit(tiny_model("llama"), "nf4")
    model = peft.get_peft_model(base, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).train()
    handle = fastlora.patch(model, neftune_alpha=5.0)
    assert "NEFTune embedding" in handle.kinds.values()
    loss = model(input_ids=_ids(), labels=_ids()).loss
    loss.backward()
    prompt = [p for p in model.parameters() if p.requires_grad]
    assert prompt and all(p.grad is not None and p.grad.abs().sum() > 0 for p in prompt)
