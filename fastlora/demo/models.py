"""The two models the demo trains, from the same base weights:

- fastlora: ``fastlora.patch(model, lora=..., quantize="nf4", neftune_alpha=...)`` on the plain
  transformers model (4-bit linears, LoRA without PEFT, fused gated MLPs, NEFTune in the embedding).
- PEFT + bitsandbytes: every linear but the output layer becomes a bitsandbytes ``Linear4bit`` holding the
  very same NF4 codes, then ``peft.get_peft_model`` and transformers' NEFTune hook, the way a
  ``load_in_4bit`` model fine-tuned with ``Trainer(neftune_noise_alpha=...)`` runs. Its LoRA A / B start
  as copies of fastlora's.
"""

from __future__ import annotations

import copy

import torch

import fastlora
from fastlora import adapters, nf4


def lora_config(rank: int, alpha: float) -> fastlora.LoraConfig:
    return fastlora.LoraConfig(r=rank, lora_alpha=alpha, target_modules="all-linear")


def fastlora_model(base: torch.nn.Module, *, rank: int, alpha: float, neftune_alpha: float | None):
    """Patch a deep copy of ``base``; returns (model, :class:`fastlora.PatchHandle`)."""
    model = copy.deepcopy(base)
    handle = fastlora.patch(model, lora=lora_config(rank, alpha), quantize="nf4", neftune_alpha=neftune_alpha)
    return model, handle


def comparison_available() -> str | None:
    """None when PEFT and bitsandbytes import, else why the comparison cannot run."""
    missing = []
    for name in ("peft", "bitsandbytes"):
        try:
            __import__(name)
        except Exception as e:  # bitsandbytes can fail with more than ImportError on odd setups
            missing.append(f"{name} ({type(e).__name__}: {e})")
    return None if not missing else "not importable: " + ", ".join(missing)


def to_bnb_4bit(model: torch.nn.Module) -> torch.nn.Module:
    """In place: every ``nn.Linear`` but the output layer becomes a bitsandbytes ``Linear4bit`` with NF4
    double-quant codes from :func:`fastlora.nf4.quantize` (what ``fastlora.patch(quantize="nf4")`` makes
    from the same weight), computing in the weight's dtype; the model then reports ``is_loaded_in_4bit``
    so PEFT picks its bitsandbytes LoRA layers."""
    import bitsandbytes as bnb

    output = model.get_output_embeddings()
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is not torch.nn.Linear or child is output:
                continue
            new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                    compute_dtype=child.weight.dtype, quant_type="nf4", compress_statistics=True)
            new.weight = nf4.to_bnb(nf4.quantize(child.weight.detach(), 64, "nf4", True))
            if child.bias is not None:
                new.bias = torch.nn.Parameter(child.bias.detach().clone(), requires_grad=False)
            setattr(module, child_name, new)
    model.is_loaded_in_4bit = True
    return model


def add_transformers_neftune(model: torch.nn.Module, neftune_alpha: float) -> None:
    """transformers' NEFTune: what ``Trainer(neftune_noise_alpha=...)`` installs on the input embedding."""
    from transformers.integrations.neftune import neftune_post_forward_hook

    embedding = model.get_input_embeddings()
    embedding.neftune_noise_alpha = neftune_alpha
    embedding.register_forward_hook(neftune_post_forward_hook)


def peft_model(base: torch.nn.Module, like: torch.nn.Module, *, rank: int, alpha: float,
               neftune_alpha: float | None):
    """PEFT + bitsandbytes QLoRA on a deep copy of ``base``, its LoRA weights copied from the fastlora model
    ``like`` (same targets, same initial A and B)."""
    import peft

    model = to_bnb_4bit(copy.deepcopy(base))
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, config)
    ours = adapters.lora_modules(like)
    theirs = {name: m for name, m in model.base_model.model.named_modules() if hasattr(m, "lora_A")
              and "default" in getattr(m, "lora_A", {})}
    if set(ours) != set(theirs):
        raise RuntimeError(f"PEFT chose other LoRA targets than fastlora: only PEFT {sorted(set(theirs) - set(ours))}, "
                        f"only fastlora {sorted(set(ours) - set(theirs))}")
    with torch.no_grad():
        for name, module in ours.items():
            for part in ("lora_A", "lora_B"):
                getattr(theirs[name], part)["default"].weight.copy_(getattr(module, part).weight)
    if neftune_alpha is not None:
        add_transformers_neftune(model, neftune_alpha)
    return model
