"""LoRA dropout under activation checkpointing: gradients with and without checkpointing are
bitwise identical in all four torch.utils.checkpoint modes, with Hugging Face's
gradient_checkpointing_enable() and under save_on_cpu; runs reproduce under torch.manual_seed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lora_cases import backend_params, loss_and_grads, make_weight
from torch.utils.checkpoint import checkpoint

from fastlora.ops import _dropout_seed, lora_linear

BACKENDS = backend_params()
MODES = [(reentrant, preserve) for reentrant in (True, False) for preserve in (True, False)]


class Block(torch.nn.Module):
    """Two LoRA linears over 4-bit and dense weights; optionally a torch dropout between them (a
    random op after ours: it sees the right generator state only if the op keeps it in step)."""

    def __init__(self, width: int, backend: str, torch_dropout: bool):
        super().__init__()
        self.q1 = make_weight("nf4-dq", 2 * width, width, torch.float32)
        self.w2 = make_weight("dense", width, 2 * width, torch.float32)
        self.a1 = torch.nn.Parameter(torch.randn(8, width) * 0.1)
        self.b1 = torch.nn.Parameter(torch.randn(2 * width, 8) * 0.1)
        self.a2 = torch.nn.Parameter(torch.randn(8, 2 * width) * 0.1)
        self.b2 = torch.nn.Parameter(torch.randn(width, 8) * 0.1)
        self.backend, self.torch_dropout = backend, torch_dropout

    def forward(self, x):
        h = lora_linear(x, self.q1, self.a1, self.b1, 2.0, dropout_p=0.3, backend=self.backend)
        h = F.gelu(h)
        if self.torch_dropout:
            h = F.dropout(h, 0.2, training=True)
        return x + lora_linear(h, self.w2, self.a2, self.b2, 2.0, dropout_p=0.3, backend=self.backend)


def _grads(blocks, x, mode, context=None):
    torch.manual_seed(1234)
    xs = x.clone().requires_grad_()
    h = xs
    with context or torch.enable_grad():
        for block in blocks:
            if mode is None:
                h = block(h)
            else:
                reentrant, preserve = mode
                h = checkpoint(block, h, use_reentrant=reentrant, preserve_rng_state=preserve)
        loss = (h * h).sum()
    loss.backward()
    grads = [xs.grad] + [p.grad.clone() for b in blocks for p in b.parameters()]
    for b in blocks:
        b.zero_grad(set_to_none=True)
        assert _dropout_seed.pending_count(b.a1) == 0 and _dropout_seed.pending_count(b.a2) == 0
    return loss.detach(), grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES, ids=lambda m: f"reentrant={m[0]}-preserve={m[1]}")
def test_checkpoint_modes_give_identical_gradients(backend, mode, seed):
    # A torch dropout after ours only replays identically when the RNG state is preserved.
    blocks = [Block(24, backend, torch_dropout=mode[1]) for _ in range(3)]
    x = torch.randn(2, 19, 24)
    loss0, plain = _grads(blocks, x, None)
    loss1, ckpt = _grads(blocks, x, mode)
    assert torch.equal(loss0, loss1)
    for g0, g1 in zip(plain, ckpt, strict=False):
        assert torch.equal(g0, g1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_save_on_cpu_gives_identical_gradients(backend, seed):
    blocks = [Block(24, backend, torch_dropout=True) for _ in range(2)]
    x = torch.randn(2, 19, 24)
    _, plain = _grads(blocks, x, None)
    _, offloaded = _grads(blocks, x, None, torch.autograd.graph.save_on_cpu(pin_memory=False))
    for g0, g1 in zip(plain, offloaded, strict=False):
        assert torch.equal(g0, g1)


def test_manual_seed_reproduces_and_seeds_differ(seed):
    blocks = [Block(24, "reference", torch_dropout=False)]
    x = torch.randn(2, 19, 24)
    loss_a, grads_a = _grads(blocks, x, None)
    loss_b, grads_b = _grads(blocks, x, None)
    assert torch.equal(loss_a, loss_b) and all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=False))
    torch.manual_seed(99)
    y1 = blocks[0](x)
    y2 = blocks[0](x)  # the next call draws a new mask
    assert not torch.equal(y1, y2)


class HFLoraProjection(torch.nn.Module):
    """A test-local stand-in for what fastlora.patch will install: a frozen nn.Linear's weight used
    through lora_linear with a trainable adapter."""

    def __init__(self, base: torch.nn.Linear, backend: str):
        super().__init__()
        self.base = base
        self.lora_A = torch.nn.Parameter(torch.randn(4, base.in_features) * 0.05)
        self.lora_B = torch.nn.Parameter(torch.randn(base.out_features, 4) * 0.05)
        self.backend = backend

    def forward(self, x):
        return lora_linear(x, self.base.weight, self.lora_A, self.lora_B, 4.0, bias=self.base.bias, dropout_p=0.1,
                           training=self.training, backend=self.backend)


def _tiny_llama(backend: str):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.model.layers:
        layer.self_attn.q_proj = HFLoraProjection(layer.self_attn.q_proj, backend)
        layer.self_attn.v_proj = HFLoraProjection(layer.self_attn.v_proj, backend)
        layer.mlp.down_proj = HFLoraProjection(layer.mlp.down_proj, backend)
    return model.train()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs", [None, {"use_reentrant": False}], ids=["hf-default", "non-reentrant"])
def test_hugging_face_gradient_checkpointing(backend, kwargs, seed):
    model = _tiny_llama(backend)
    ids = torch.randint(0, 96, (2, 13))
    loss0, plain = loss_and_grads(model, ids)
    if kwargs is None:
        model.gradient_checkpointing_enable()
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.enable_input_require_grads()
    loss1, ckpt = loss_and_grads(model, ids)
    assert torch.equal(loss0, loss1)
    assert plain.keys() == ckpt.keys() and len(plain) == 12
    for name in plain:
        assert torch.equal(plain[name], ckpt[name]), name
