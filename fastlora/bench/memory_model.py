"""The QLoRA training step the memory suite measures: a Hugging Face ``LlamaForCausalLM`` built from a
config (nothing downloaded), every decoder projection a bitsandbytes ``Linear4bit`` (NF4, double
quant, blocksize 64, compute dtype = the model dtype), PEFT LoRA on all seven projections, then one
step: forward with labels (transformers' own causal-LM loss), backward, AdamW step.

Under ``FakeTensorMode`` the 4-bit weights are fake tensors of exactly the bytes bitsandbytes holds
(packed uint8 codes ceil(N·K/2), uint8 absmax per 64 values, float32 absmax2 per 256 blocks, the
16- and 256-entry code books, the float32 offset); with real tensors they are quantized for real
with :func:`fastlora.nf4.quantize` (byte-identical to bitsandbytes).

The recipe modelled (stated in every report): the whole model in ``dtype`` (bfloat16 by default:
embeddings, norms and lm_head included — no ``prepare_model_for_kbit_training`` upcast, which would
make the hidden states float32 and send every call back to bitsandbytes), PEFT's default float32
adapters, lora_dropout 0 unless asked, SDPA attention, gradient checkpointing via transformers'
``activation_checkpointing_enable()`` (``gradient_checkpointing_enable()`` before transformers 5) on every
decoder layer.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from .. import nf4

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BLOCKSIZE = 64


@dataclass(frozen=True)
class Shape:
    """A Llama-architecture shape."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tie_embeddings: bool = False

    def config(self, dtype: torch.dtype):
        import transformers as tf

        return tf.LlamaConfig(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
                              num_hidden_layers=self.layers, num_attention_heads=self.heads,
                              num_key_value_heads=self.kv_heads, max_position_embeddings=131072,
                              tie_word_embeddings=self.tie_embeddings, attn_implementation="sdpa",
                              pad_token_id=None, bos_token_id=1, eos_token_id=2, dtype=dtype)


PRESETS = {
    "llama-3.2-1b": Shape(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, vocab=128256,
                          tie_embeddings=True),
    "llama-3-8b": Shape(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256),
    "llama-3-70b": Shape(hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8, vocab=128256),
}


@dataclass(frozen=True)
class StepConfig:
    """One QLoRA step: LoRA rank / alpha / dropout on all seven projections, batch x seq tokens."""

    seq: int = 2048
    batch: int = 1
    rank: int = 16
    alpha: int = 32
    lora_dropout: float = 0.0
    checkpointing: bool = False
    dtype: torch.dtype = torch.bfloat16


def _fake_4bit_weight(n: int, k: int, dtype: torch.dtype) -> nf4.QuantizedWeight:
    """Uninitialised tensors with bitsandbytes' exact layout and byte counts (nf4, double quant)."""
    blocks = math.ceil(n * k / BLOCKSIZE)
    nested = nf4.NestedStats(absmax2=torch.empty(math.ceil(blocks / nf4.NESTED_BLOCKSIZE), dtype=torch.float32),
                             code=torch.empty(256, dtype=torch.float32), offset=torch.empty((), dtype=torch.float32))
    return nf4.QuantizedWeight(packed=torch.empty(((n * k + 1) // 2, 1), dtype=torch.uint8),
                               absmax=torch.empty(blocks, dtype=torch.uint8), shape=torch.Size((n, k)), dtype=dtype,
                               blocksize=BLOCKSIZE, quant_type="nf4", code=torch.empty(16, dtype=torch.float32),
                               nested=nested)


def _fake_params4bit(q: nf4.QuantizedWeight) -> torch.nn.Parameter:
    """The fake-mode stand-in for a bitsandbytes ``Params4bit``: ``Params4bit`` cannot wrap a FakeTensor
    (``Tensor._make_subclass`` refuses it), so the packed codes become a frozen fake parameter carrying
    the attributes ``Params4bit`` has — ``quant_state`` (a real bitsandbytes ``QuantState`` over the fake
    statistics), blocksize, quant_type, ... — which is all bitsandbytes' ``Linear4bit.forward`` /
    ``matmul_4bit``, PEFT and fastlora read."""
    from bitsandbytes.functional import QuantState

    n = q.nested
    state2 = QuantState(absmax=n.absmax2, code=n.code, blocksize=n.blocksize, dtype=torch.float32)
    state = QuantState(absmax=q.absmax, shape=q.shape, code=q.code, blocksize=q.blocksize, quant_type=q.quant_type,
                       dtype=q.dtype, offset=n.offset, state2=state2)
    param = torch.nn.Parameter(q.packed, requires_grad=False)
    for key, value in dict(quant_state=state, blocksize=q.blocksize, compress_statistics=True,
                           quant_type=q.quant_type, quant_storage=torch.uint8, bnb_quantized=True, module=None).items():
        setattr(param, key, value)
    return param


def quantize_projections(model: torch.nn.Module, dtype: torch.dtype, fake: bool) -> None:
    """Replace every decoder projection by a bitsandbytes Linear4bit (nf4, double quant)."""
    import bitsandbytes as bnb
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name not in PROJECTIONS or type(child) is not torch.nn.Linear:
                continue
            n, k = child.out_features, child.in_features
            with unset_fake_temporarily():  # the layer's placeholder Params4bit, on meta: replaced below
                layer = bnb.nn.Linear4bit(k, n, bias=child.bias is not None, compute_dtype=dtype, quant_type="nf4",
                                          compress_statistics=True, device="meta")
            if fake:
                layer.weight = _fake_params4bit(_fake_4bit_weight(n, k, dtype))
            else:
                layer.weight = nf4.to_bnb(nf4.quantize(child.weight.detach(), BLOCKSIZE, "nf4", True))
            layer.weight.module = layer
            if child.bias is not None:
                layer.bias = torch.nn.Parameter(child.bias.detach(), requires_grad=False)
            setattr(module, name, layer)
    model.is_loaded_in_4bit = True  # what from_pretrained(load_in_4bit=True) sets: PEFT picks lora.bnb.Linear4bit


@contextlib.contextmanager
def _convert_with_set_data():
    """``Module.to`` by assigning ``.data`` (the parameter objects stay). Under FakeTensorMode
    ``Module.to`` always swaps parameters, and swapping a fake tensor fails (the fake mode keeps weak
    references to it); PEFT calls ``.to(base layer's device, compute dtype)`` on every new adapter."""
    original = torch.nn.Module.to

    def to(self, *args, **kwargs):
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        for t in list(self.parameters()) + list(self.buffers()):
            cast = dtype if dtype is not None and (t.is_floating_point() or t.is_complex()) else t.dtype
            if (device is not None and t.device != device) or cast != t.dtype:
                t.data = t.data.to(device=device or t.device, dtype=cast)
        return self

    torch.nn.Module.to = to
    try:
        yield
    finally:
        torch.nn.Module.to = original


def build_peft_model(shape: Shape, step: StepConfig, *, fake: bool, seed: int = 0) -> torch.nn.Module:
    """The PEFT + bitsandbytes QLoRA model (in the active fake mode when ``fake``), in train mode."""
    import peft
    import transformers as tf

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(step.dtype)  # build in the model dtype: no float32 copy of the weights first
    try:
        model = tf.LlamaForCausalLM(shape.config(step.dtype))
    finally:
        torch.set_default_dtype(previous)
    quantize_projections(model, step.dtype, fake)
    model.config.use_cache = False
    if step.checkpointing:
        # transformers 5 renamed it and warns on the old name, the only one before 5
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
        model.enable_input_require_grads()
    config = peft.LoraConfig(r=step.rank, lora_alpha=step.alpha, lora_dropout=step.lora_dropout,
                             target_modules=list(PROJECTIONS), task_type="CAUSAL_LM")
    if fake:
        with _convert_with_set_data():
            model = peft.get_peft_model(model, config)
    else:
        model = peft.get_peft_model(model, config)
    model.train()
    return model


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def inputs(shape: Shape, step: StepConfig, seed: int = 0) -> torch.Tensor:
    """(batch, seq) int64 token ids, also used as labels."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, shape.vocab, (step.batch, step.seq), generator=gen)
