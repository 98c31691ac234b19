"""The training-step floor (fastlora.bench.train_setup.floor_model): the bound the train bench reports on any
speed-up over PEFT is only a bound if the floor does all of the model's own work and nothing more. Checked by
counting FLOPs: a PEFT LoRA step over the same dense model = the floor step + exactly the adapters' matmuls."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fastlora.bench import train_setup as ts

pytest.importorskip("peft")
pytest.importorskip("transformers")

SPEC = ts.PRESETS["tiny"]


def _step_flops(model, params) -> int:
    ids = ts.token_batch(SPEC, seed=3)
    with FlopCounterMode(display=False) as counter:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    assert all(p.grad is not None for p in params)
    return counter.get_total_flops()


def _lora_flops(spec: ts.Spec, rank: int) -> int:
    """Forward x·Aᵀ and S·Bᵀ; backward dB, dS, dA and, where the input needs a gradient, dS·A. The first
    layer's q/k/v read the normed embeddings, which need none."""
    t, h, i = spec.tokens, spec.hidden, spec.intermediate
    kv = spec.kv_heads * h // spec.heads
    shapes = {"q": (h, h), "k": (h, kv), "v": (h, kv), "o": (h, h), "gate": (h, i), "up": (h, i), "down": (i, h)}
    total = 0
    for layer in range(spec.layers):
        for name, (fan_in, fan_out) in shapes.items():
            per = 2 * t * rank * (2 * fan_in + 3 * fan_out)
            if layer > 0 or name not in ("q", "k", "v"):
                per += 2 * t * rank * fan_in
            total += per
    return total


def test_floor_is_the_lora_step_without_the_adapters():
    rank = 4
    peft_model = ts.peft_model(SPEC, four_bit=False, rank=rank, b_std=0.02)
    floor = ts.floor_model(SPEC)
    trainable = [p for p in floor.parameters() if p.requires_grad]
    assert [n for n, p in floor.named_parameters() if p.requires_grad] == ["gradient_tap"]
    lora = [p for p in peft_model.parameters() if p.requires_grad]
    assert _step_flops(peft_model, lora) - _step_flops(floor, trainable) == _lora_flops(SPEC, rank)


def test_floor_computes_the_base_model():
    """The tap is zero: the floor's loss is the dense base model's, so it runs the same ops on the same values."""
    ids = ts.token_batch(SPEC, seed=4)
    with torch.no_grad():
        want = ts.base_model(SPEC)(input_ids=ids, labels=ids).loss
        got = ts.floor_model(SPEC)(input_ids=ids, labels=ids).loss
    assert torch.equal(got, want)
