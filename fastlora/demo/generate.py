"""Greedy generation from the tuned model, byte by byte (no cache: the demo's texts are short)."""

from __future__ import annotations

import torch

from .corpus import ByteTokenizer
from .train import without_noise

GENERATED_BYTES = 60
PROMPT = "12. The Wise Owl and the Hare\n\nOne spring morning, "


def greedy(model: torch.nn.Module, tokenizer: ByteTokenizer, prompt: str, n_bytes: int,
           device: torch.device) -> str:
    """The ``n_bytes`` bytes that follow ``prompt`` when each next byte is the most likely one, decoded as
    UTF-8 (the prompt itself not included). No NEFTune noise (:func:`fastlora.demo.train.without_noise`)."""
    ids = tokenizer.encode(prompt).to(device)[None]
    start = ids.shape[1]
    with without_noise(model):
        for _ in range(n_bytes):
            logits = model(input_ids=ids).logits[:, -1, :256]  # only byte ids: specials are never generated
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return tokenizer.decode(ids[0, start:].tolist())
