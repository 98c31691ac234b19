"""transformers' Trainer on CPU with a fastlora-patched PEFT QLoRA model (tiny Llama, bitsandbytes nf4 base +
PEFT LoRA on every linear): it trains, evaluates, saves a checkpoint and resumes from it to the same adapter
weights as a straight run; Trainer NEFTune (``neftune_noise_alpha``) on a model patched with ``neftune_alpha``
adds noise exactly once (fastlora takes the Trainer's hook over, fastlora/modules/neftune.py); and gradient
accumulation of 4 micro-batches of 1 gives the gradients / weights of one batch of 4, in a plain loop and in the
Trainer. Sequences all have the same length (no padding), so the token-mean loss of a batch of 4 is the mean of
the four per-sequence losses and the Trainer's num_items_in_batch normalisation gives the same result."""

import math
import warnings

import pytest
import torch
from model_zoo import VOCAB, tiny_model, to_4bit

import fastlora

tf = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

SEQ = 12
HIDDEN = 64
RTOL_FP32 = 2e-5  # fp32 sums of the same terms in another order / grouping


def _qlora(neftune_alpha=None):
    """Patched PEFT QLoRA tiny Llama; lora_B made non-zero so every adapter gets a gradient from step one."""
    model = to_4bit(tiny_model("llama"), "nf4")
    torch.manual_seed(1)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    handle = fastlora.patch(model, neftune_alpha=neftune_alpha)
    assert not handle.skipped, handle.summary()
    return model, handle


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, SEQ), generator=g)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4, learning_rate=1e-2,
                lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, save_strategy="no", report_to=[],
                seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True, max_steps=4)
    base.update(kw)
    return tf.TrainingArguments(**base)


def _adapters(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _assert_close(got, want, rtol):
    assert got.keys() == want.keys() and want
    worst = max(_rel(got[n], want[n]) for n in want)
    assert worst < rtol, worst


def _train_losses(trainer):
    return [row["loss"] for row in trainer.state.log_history if "loss" in row]


def test_trains_evaluates_saves_and_resumes(tmp_path):
    train_set, eval_set = _data(16, 0), _data(6, 1)
    model, handle = _qlora()
    start = _adapters(model)
    trainer = tf.Trainer(model=model, args=_args(tmp_path / "straight", save_strategy="steps", save_steps=2),
                         train_dataset=train_set, eval_dataset=eval_set)
    trainer.train()
    straight, straight_losses = _adapters(model), _train_losses(trainer)
    assert len(straight_losses) == 4 and all(math.isfinite(x) for x in straight_losses)
    assert max(_rel(straight[n], start[n]) for n in start) > 1e-3  # it really trained
    assert handle.report()["fallback_calls"] == {}

    metrics = trainer.evaluate()
    model.eval()
    with torch.no_grad():  # the Trainer's eval loss is the mean loss over eval batches of 4 (here 4 + 2)
        by_batch = [model(input_ids=torch.stack([r["input_ids"] for r in eval_set[i:i + 4]]),
                          labels=torch.stack([r["labels"] for r in eval_set[i:i + 4]])).loss for i in (0, 4)]
    want_eval = (by_batch[0] * 4 + by_batch[1] * 2).item() / 6
    assert metrics["eval_loss"] == pytest.approx(want_eval, rel=1e-5)

    checkpoint = tmp_path / "straight" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").exists()
    resumed_model, resumed_handle = _qlora()
    resumed = tf.Trainer(model=resumed_model, args=_args(tmp_path / "resumed", save_steps=2),
                         train_dataset=train_set)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    resumed_losses = _train_losses(resumed)  # steps 1-2 come from the checkpoint's trainer_state.json
    assert resumed_losses == pytest.approx(straight_losses, rel=1e-5)  # the loss continues where it stopped
    _assert_close(_adapters(resumed_model), straight, RTOL_FP32)
    assert resumed_handle.report()["fallback_calls"] == {}


def _noise_of_one_training_step(tmp_path, trainer_alpha, patch_alpha):
    model, _ = _qlora(neftune_alpha=patch_alpha)
    seen = {}
    base = model.get_base_model()
    embedding = base.get_input_embeddings()
    embedding.register_forward_pre_hook(lambda _, args: seen.setdefault("ids", args[0]))

    def grab(_, args, kwargs):
        seen.setdefault("hidden", args[0] if args else kwargs["hidden_states"])

    base.model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    trainer = tf.Trainer(model=model, args=_args(tmp_path, max_steps=1, neftune_noise_alpha=trainer_alpha),
                         train_dataset=_data(4, 2))
    trainer.train()
    assert not embedding._forward_hooks  # the Trainer's hook is gone after train() either way
    return (seen["hidden"] - embedding.weight[seen["ids"]]).detach()


def test_trainer_neftune_noise_is_added_once(tmp_path):
    alpha = 5.0
    mag = alpha / math.sqrt(SEQ * HIDDEN)
    with pytest.warns(UserWarning, match="fastlora removed the hook"):
        noise = _noise_of_one_training_step(tmp_path / "a", alpha, alpha)
    # one uniform(-mag, mag) draw per element: |noise| <= mag, std mag/sqrt(3) (twice would be sqrt(2) x that)
    assert noise.abs().max().item() <= mag * (1 + 1e-5)
    assert noise.std().item() == pytest.approx(mag / math.sqrt(3), rel=0.05)
    with warnings.catch_warnings():  # the Trainer alone (model patched without NEFTune) still works as before
        warnings.simplefilter("ignore")
        hook_only = _noise_of_one_training_step(tmp_path / "b", alpha, None)
    assert hook_only.std().item() == pytest.approx(mag / math.sqrt(3), rel=0.05)


def test_trainer_neftune_alpha_mismatch_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"neftune_noise_alpha=1.0 differs from fastlora.patch\(neftune_alpha=5.0\)"):
        _noise_of_one_training_step(tmp_path, 1.0, 5.0)


def test_gradient_accumulation_plain_loop():
    model, handle = _qlora()
    batch = torch.stack([r["input_ids"] for r in _data(4, 3)])
    model(input_ids=batch, labels=batch).loss.backward()
    whole = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    for row in batch:
        (model(input_ids=row[None], labels=row[None]).loss / 4).backward()
    micro = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    _assert_close(micro, whole, RTOL_FP32)
    assert handle.report()["fallback_calls"] == {}


def test_gradient_accumulation_in_trainer(tmp_path):
    train_set = _data(8, 4)
    runs = {}
    for name, kw in (("whole", dict(per_device_train_batch_size=4)),
                     ("accumulated", dict(per_device_train_batch_size=1, gradient_accumulation_steps=4))):
        model, _ = _qlora()
        start = _adapters(model)
        trainer = tf.Trainer(model=model, args=_args(tmp_path / name, max_steps=2, optim="sgd", learning_rate=0.5,
                                                     **kw), train_dataset=train_set)
        trainer.train()
        runs[name] = _adapters(model)
    assert max(_rel(runs["whole"][n], start[n]) for n in start) > 1e-3
    _assert_close(runs["accumulated"], runs["whole"], RTOL_FP32)


def test_trainer_bf16_runs_fused_like_peft(tmp_path):
    """bf16=True on CPU trains under torch.autocast(bf16): every patched layer runs fused (no fallback) and the
    adapters after 2 SGD steps match the unpatched PEFT model's within bf16 tolerance (rounding points differ)."""
    train_set = _data(8, 5)
    runs, handles = {}, {}
    for name in ("peft", "fastlora"):
        model, handle = _qlora()
        if name == "peft":
            handle.unpatch()
        start = _adapters(model)
        trainer = tf.Trainer(model=model, args=_args(tmp_path / name, max_steps=2, bf16=True, optim="sgd",
                                                     learning_rate=0.5), train_dataset=train_set)
        trainer.train()
        runs[name], handles[name] = _adapters(model), handle
    assert handles["fastlora"].report()["fallback_calls"] == {}
    moved = {n: runs["peft"][n] - start[n] for n in start}
    got = {n: runs["fastlora"][n] - start[n] for n in start}
    worst = max(_rel(got[n], moved[n]) for n in moved)
    print(f"bf16 Trainer: worst relative difference of the adapter updates {worst:.2e}")
    assert worst < 0.05  # the update, a few bf16 eps (2^-8) apart
