"""TRL's SFTTrainer with a fastlora-patched PEFT model on CPU: trains fused (no fallback calls), and with
packing + padding-free batches (one row of concatenated sequences, position_ids restarting at 0 per
sequence) NEFTune's per_sequence mode gives every packed sequence its own scale alpha / sqrt(len · d)."""

import math

import pytest
import torch
from model_zoo import VOCAB, tiny_model

import fastlora

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

HIDDEN = 64


def _tokenizer():
    vocab = {f"t{i}": i for i in range(3, VOCAB)} | {"<pad>": 0, "<s>": 1, "</s>": 2}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>")


def _trainer(tmp_path, model, steps):
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, VOCAB, (int(n),), generator=g).tolist()}
            for n in torch.randint(5, 20, (32,), generator=g)]
    config = trl.SFTConfig(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4, packing=True,
                           padding_free=True, use_cpu=True, report_to=[], max_length=64, save_strategy="no",
                           learning_rate=1e-2, seed=0)
    return trl.SFTTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(rows),
                          processing_class=_tokenizer())


def _model():
    torch.manual_seed(0)
    return peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))


def test_sft_trainer_trains_fused(tmp_path):
    model = _model()
    handle = fastlora.patch(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
    result = _trainer(tmp_path, model, steps=3).train()
    assert math.isfinite(result.training_loss)
    assert handle.report()["fallback_calls"] == {}
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if "lora_A" in n)


def test_packed_sequences_get_their_own_neftune_scale(tmp_path):
    model = _model()
    fastlora.patch(model, neftune_alpha=5.0, neftune_mode="per_sequence")
    embedding = model.get_input_embeddings()
    seen = []
    hook = embedding.register_forward_hook(lambda m, args, out: seen.append((args[0].detach(), out.detach())))
    captured = {}
    pre = model.register_forward_pre_hook(lambda m, args, kwargs: captured.update(kwargs), with_kwargs=True)
    _trainer(tmp_path, model, steps=1).train()
    hook.remove()
    pre.remove()
    ids, out = seen[0]
    positions = captured["position_ids"]
    assert ids.shape[0] == 1 and positions.shape == ids.shape  # padding-free: one packed row
    noise = (out - embedding.weight.detach()[ids])[0]
    starts = (positions[0] == 0).nonzero().flatten().tolist() + [ids.shape[1]]
    assert len(starts) > 3
    for begin, end in zip(starts[:-1], starts[1:], strict=True):
        bound = 5.0 / math.sqrt((end - begin) * HIDDEN)
        segment = noise[begin:end].abs()
        assert segment.max() <= bound * (1 + 1e-5), (begin, end)
        assert segment.max() > 0.9 * bound, (begin, end)  # (end - begin) · 64 uniform draws reach the bound
