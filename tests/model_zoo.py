"""Tiny random Hugging Face causal LMs of every family fastlora.patch is tested on, built from configs
(nothing downloaded), and their 4-bit (bitsandbytes Linear4bit) versions.

Hidden sizes are multiples of 64: bitsandbytes 0.50's native CPU dequantization is wrong for rows that
do not fill whole 64-element blocks (README, "Known differences")."""

from __future__ import annotations

import torch

from fastlora import nf4

VOCAB = 96
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2"]
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny_model(family: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    if family == "gpt2":
        config = tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                               eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = tf.GPT2LMHeadModel(config)
    else:
        classes = {
            "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
            "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {"sliding_window": 8}),
            "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}),
            "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {"head_dim": 16}),
            "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, {"head_dim": 16}),
            "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, {"head_dim": 16, "sliding_window": 8}),
            "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, {}),
        }
        config_cls, model_cls, extra = classes[family]
        model = model_cls(config_cls(**_COMMON, **extra))
    return model.to(dtype)


def to_4bit(model: torch.nn.Module, quant_type: str = "nf4", loaded_in_4bit: bool = True) -> torch.nn.Module:
    """Every nn.Linear (and GPT-2 Conv1D, transposed as transformers' 4-bit loading does) but the output layer
    becomes a bitsandbytes Linear4bit holding fastlora.nf4.quantize'd weights (nf4 double quant, or fp4), the
    way a load_in_4bit model holds them."""
    import bitsandbytes as bnb
    from transformers.pytorch_utils import Conv1D

    output = model.get_output_embeddings()
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) not in (torch.nn.Linear, Conv1D) or child is output:
                continue
            weight = child.weight.detach()
            weight = weight.t().contiguous() if type(child) is Conv1D else weight
            double_quant = quant_type == "nf4"
            q = nf4.quantize(weight, 64, quant_type, double_quant)
            new = bnb.nn.Linear4bit(weight.shape[1], weight.shape[0], bias=child.bias is not None,
                                    compute_dtype=child.weight.dtype, quant_type=quant_type,
                                    compress_statistics=double_quant)
            new.weight = nf4.to_bnb(q)
            if child.bias is not None:
                new.bias = torch.nn.Parameter(child.bias.detach().clone(), requires_grad=False)
            setattr(module, child_name, new)
    if loaded_in_4bit:  # what from_pretrained(load_in_4bit=True) reports; PEFT picks lora.bnb.Linear4bit then
        model.is_loaded_in_4bit = True
    return model
