"""Model size presets of the demo: a Llama-style causal LM built from a config (random weights, nothing
downloaded) and the training settings that suit it.

Sizes are multiples of 64 (one 4-bit quantization block per 64 weights of a row; bitsandbytes' CPU
dequantization needs whole blocks)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Preset:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    steps: int
    batch: int
    seq_len: int
    lr: float
    about: str

    def model_config(self) -> dict:
        keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
        return {k: v for k, v in asdict(self).items() if k in keys}


PRESETS = {
    "tiny": Preset(64, 128, 2, 4, 2, steps=60, batch=4, seq_len=64, lr=1e-2,
                   about="hidden 64, 2 layers (for tests: seconds)"),
    "small": Preset(512, 1408, 4, 8, 8, steps=200, batch=4, seq_len=256, lr=3e-3,
                    about="hidden 512, 4 layers (default: about two minutes per run on a 2-core CPU in fp32)"),
    "medium": Preset(1024, 2816, 8, 16, 8, steps=300, batch=4, seq_len=512, lr=2e-3,
                     about="hidden 1024, 8 layers (for a GPU; slow on a CPU)"),
}
DEFAULT_PRESET = "small"
OUTPUT_LOGIT_REACH = 16.0


def build_model(preset: Preset, vocab_size: int, *, seed: int, dtype):
    """A fresh ``transformers.LlamaForCausalLM`` with ``preset``'s shape and weights drawn from ``seed`` (the
    same seed gives the same weights), cast to ``dtype``, on the CPU, in eval mode."""
    import torch
    import transformers

    config = transformers.LlamaConfig(vocab_size=vocab_size, max_position_embeddings=max(preset.seq_len, 2048),
                                      tie_word_embeddings=False, pad_token_id=None, bos_token_id=None,
                                      eos_token_id=None, **preset.model_config())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config)
        # The output layer is frozen (LoRA does not train it) and the final norm gives the hidden state a norm
        # of about sqrt(hidden): with the usual 0.02 init no logit could pass ~0.02 * hidden, and the loss
        # could not fall far below log(vocab) however the adapters learn. A pretrained output layer reaches
        # logits of ~16 and more; this init lets a hidden state aligned with a row do the same.
        torch.nn.init.normal_(model.lm_head.weight, std=OUTPUT_LOGIT_REACH / preset.hidden_size)
    return model.to(dtype).eval()
