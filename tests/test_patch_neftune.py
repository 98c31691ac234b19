"""fastlora.patch(neftune_alpha=...): the input embedding of a tiny Llama / PEFT model becomes the fused
NEFTune lookup. Noise only in training mode, within transformers' magnitude, reproducible from torch's
seed, identical between backends, none on padding in per_sequence mode; a second (transformers) hook
warns; unpatch removes every hook and restores the exact outputs; bad options raise."""

import math
import warnings

import pytest
import torch

import fastlora

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB, HIDDEN = 96, 64


def _model(lora: bool = True):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config)
    if lora:
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    return model.train()


def _ids(rows=2, length=13):
    return torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(5))


def _embedding_output(model, **kwargs):
    """The input embedding's output during one forward of ``model``."""
    seen = []
    handle = model.get_input_embeddings().register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    try:
        model(**kwargs)
    finally:
        handle.remove()
    return seen[0]


def test_noise_bounds_reproducibility_and_eval():
    model = _model()
    ids = _ids()
    clean = model.get_input_embeddings().weight.detach()[ids]
    handle = fastlora.patch(model, neftune_alpha=5.0)
    assert handle.kinds["base_model.model.model.embed_tokens"] == "NEFTune embedding"
    assert "fastlora.neftune(alpha=5.0" in repr(model.get_input_embeddings())
    torch.manual_seed(11)
    noisy = _embedding_output(model, input_ids=ids)
    noise = noisy - clean
    mag = 5.0 / math.sqrt(ids.shape[1] * HIDDEN)
    assert noise.abs().max() <= mag * (1 + 1e-6) and noise.abs().max() > 0.9 * mag
    assert abs(noise.std().item() - mag / math.sqrt(3)) < 0.1 * mag  # U(-mag, mag) has std mag/sqrt(3)
    torch.manual_seed(11)
    assert torch.equal(_embedding_output(model, input_ids=ids), noisy)
    assert not torch.equal(_embedding_output(model, input_ids=ids), noisy)  # a fresh seed, fresh noise
    model.eval()
    assert torch.equal(_embedding_output(model, input_ids=ids), clean)


def test_backends_give_the_same_noise_and_training_works():
    ids = _ids()
    outs = {}
    for backend in ("reference", "cpp"):
        model = _model()
        fastlora.patch(model, neftune_alpha=10.0, backend=backend)
        torch.manual_seed(3)
        outs[backend] = _embedding_output(model, input_ids=ids)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    assert torch.equal(outs["reference"], outs["cpp"])


def test_per_sequence_mode_leaves_padding_clean():
    model = _model()
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0
    mask[1, 4:] = 0
    clean = model.get_input_embeddings().weight.detach()[ids]
    handle = fastlora.patch(model, neftune_alpha=5.0, neftune_mode="per_sequence")
    noise = _embedding_output(model, input_ids=ids, attention_mask=mask) - clean
    assert torch.equal(noise[mask == 0], torch.zeros_like(noise[mask == 0]))
    for row, length in ((0, 9), (1, 4)):
        mag = 5.0 / math.sqrt(length * HIDDEN)
        assert noise[row, :length].abs().max() <= mag * (1 + 1e-6)
        assert noise[row, :length].abs().max() > 0.5 * mag
    handle.unpatch()
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_transformers_hook_on_top_warns_once():
    from transformers.integrations.neftune import neftune_post_forward_hook

    model = _model()
    fastlora.patch(model, neftune_alpha=5.0)
    embedding = model.get_input_embeddings()
    embedding.neftune_noise_alpha = 5.0
    embedding.register_forward_hook(neftune_post_forward_hook)
    with pytest.warns(UserWarning, match="noise is added twice"):
        model(input_ids=_ids())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(input_ids=_ids())


def test_unpatch_restores_exact_outputs_and_plain_models_work():
    model = _model(lora=False)
    ids = _ids()
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    model.train()
    handle = fastlora.patch(model, neftune_alpha=5.0)
    assert handle.patched == ["model.embed_tokens"]
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids).logits, want)
    handle.unpatch()
    assert "forward" not in model.get_input_embeddings().__dict__
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, want)


def test_bad_options():
    with pytest.raises(ValueError, match="input embedding"):
        fastlora.patch(torch.nn.Sequential(torch.nn.Linear(4, 4)), neftune_alpha=5.0)
    with pytest.raises(ValueError, match="neftune_mode"):
        fastlora.patch(_model(), neftune_alpha=5.0, neftune_mode="per_token")
    with pytest.raises((ValueError, TypeError), match="alpha"):
        fastlora.patch(_model(), neftune_alpha=-1.0)
    model = _model()
    fastlora.patch(model, neftune_alpha=5.0)
    assert fastlora.patch(model, neftune_alpha=5.0) is fastlora.patch(model, neftune_alpha=5.0)
    with pytest.raises(ValueError, match="already patched"):
        fastlora.patch(model, neftune_alpha=7.0)
