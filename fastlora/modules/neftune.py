"""The model's input embedding run through :func:`fastlora.ops.neftune_embedding` (NEFTune noise made
in the lookup kernel from Philox, no noise tensor, nothing saved for backward but the ids).

Modes (see :func:`fastlora.ops.neftune_embedding`): ``"padded"`` is transformers' Trainer
``neftune_noise_alpha`` (mag = alpha / sqrt(L·d), L the padded length); ``"per_sequence"`` uses each
sequence's real length and puts no noise on padding. For ``"per_sequence"`` the model's own forward is
given a pre-hook that hands the ``attention_mask`` / ``position_ids`` keyword arguments of the current
call to the embedding (removed again by unpatch).

Noise is added only while the embedding module is in training mode, as in transformers.

transformers' Trainer with ``neftune_noise_alpha`` set puts its own NEFTune forward hook
(``neftune_post_forward_hook``) on this same embedding when ``train()`` starts; both together would add noise
twice. fastlora takes over: the first call of the patched embedding that finds that hook on the module removes
it (from the module's forward-hook table, so the Trainer's later ``handle.remove()`` is a harmless no-op) and
adds its own noise only, so noise is added exactly once, with fastlora's mode; it warns once (UserWarning) that
it did so. The Trainer's alpha (the
``neftune_noise_alpha`` attribute the Trainer sets on the embedding) must equal ``neftune_alpha`` of the patch:
otherwise that call raises ValueError naming both, rather than silently training with another noise level. The
removal is for good: unpatching afterwards leaves the embedding without the Trainer's hook for the rest of that
``train()`` call (the next ``train()`` installs it again).
"""

from __future__ import annotations

import warnings

import torch

from ..ops.neftune_embedding import MODES, check_alpha, neftune_embedding
from . import _instance


class NeftuneState(_instance.InstanceState):
    def __init__(self, backend: str, alpha: float, mode: str):
        super().__init__(backend)
        self.alpha, self.mode = alpha, mode
        self.call_kwargs: dict = {}
        self.hook_handles: list = []

    def __deepcopy__(self, memo):
        new = NeftuneState(self.backend, self.alpha, self.mode)
        new.fallback_calls = self.fallback_calls  # hooks live on the original model, not the copy
        return new

    def describe(self) -> str:
        return f"fastlora.neftune(alpha={self.alpha}, mode={self.mode!r}, backend={self.backend!r})"


def check_options(alpha, mode) -> tuple[float, str]:
    """Validated (neftune_alpha, neftune_mode) of :func:`fastlora.patch`."""
    alpha = check_alpha(alpha)
    if mode not in MODES:
        raise ValueError(f"neftune_mode must be one of {MODES}, got {mode!r}")
    return alpha, mode


def input_embedding(model) -> tuple[str, torch.nn.Module]:
    """(name, module) of the model's input embedding (``get_input_embeddings()``, which PEFT models and
    transformers models have). ValueError when there is none."""
    getter = getattr(model, "get_input_embeddings", None)
    embedding = getter() if callable(getter) else None
    if embedding is None:
        raise ValueError(f"neftune_alpha needs a model with an input embedding (get_input_embeddings()); "
                         f"{type(model).__name__} has none")
    for name, module in model.named_modules():
        if module is embedding:
            return name, module
    raise ValueError("the model's input embedding is not one of its submodules")


def skip_reason(module) -> str | None:
    if type(module) is not torch.nn.Embedding:
        return (f"input embedding is {type(module).__name__}, not nn.Embedding (a scaled or custom embedding "
                f"is not accelerated yet)")
    if module.max_norm is not None or module.sparse or module.scale_grad_by_freq:
        return "nn.Embedding with max_norm / sparse / scale_grad_by_freq is not accelerated"
    if module.weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"embedding weight is {module.weight.dtype}"
    return _instance.conflict_reason(module)


def install(module, backend: str, alpha: float, mode: str, model: torch.nn.Module) -> None:
    """Make ``module`` (the input embedding of ``model``, :func:`skip_reason` None) a NEFTune embedding."""
    state = NeftuneState(backend, alpha, mode)
    if mode == "per_sequence":
        state.hook_handles = [model.register_forward_pre_hook(_CaptureMask(state), with_kwargs=True),
                              model.register_forward_hook(_ReleaseMask(state), always_call=True)]
    _instance.install(module, _neftune_forward, state)


class _CaptureMask:
    """Model forward pre-hook: hands this call's attention_mask / position_ids to the embedding's state.
    A class, not a closure, so a patched model pickles."""

    def __init__(self, state: NeftuneState):
        self.state = state

    def __call__(self, module, args, kwargs):
        self.state.call_kwargs = {k: kwargs.get(k) for k in ("attention_mask", "position_ids")}


class _ReleaseMask(_CaptureMask):
    """Model forward hook (always called): drops the captured tensors."""

    def __call__(self, *_):
        self.state.call_kwargs = {}


def restore(module) -> None:
    state = _instance.state_of(module)
    if state is not None:
        for handle in state.hook_handles:
            handle.remove()
    _instance.restore(module)


def _take_over_trainer_hook(module, state: NeftuneState) -> None:
    """Remove transformers' NEFTune hook from ``module`` (see the module docstring)."""
    hooks = module._forward_hooks
    if not hooks:
        return
    for key, hook in list(hooks.items()):
        if getattr(hook, "__name__", "") != "neftune_post_forward_hook":
            continue
        trainer_alpha = getattr(module, "neftune_noise_alpha", None)
        if trainer_alpha is not None and float(trainer_alpha) != state.alpha:
            raise ValueError(f"the Trainer's neftune_noise_alpha={trainer_alpha} differs from "
                             f"fastlora.patch(neftune_alpha={state.alpha}) on the same embedding; fastlora adds the "
                             f"noise itself (once): pass the same alpha to both, or neftune_noise_alpha=None to "
                             f"the Trainer")
        del hooks[key]
        module._forward_hooks_with_kwargs.pop(key, None)
        module._forward_hooks_always_called.pop(key, None)
        warnings.warn("a transformers NEFTune hook (Trainer neftune_noise_alpha) is on the input embedding that "
                      "fastlora.patch(neftune_alpha=...) already makes noisy; with both, noise is added twice, so "
                      "fastlora removed the hook and adds the noise once itself", stacklevel=4)


def _neftune_forward(self, input_ids, *args, **kwargs):
    state = _instance.state_of(self)
    if args or kwargs or not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int32,
                                                                                            torch.int64):
        state.fallback_calls += 1
        return type(self).forward(self, input_ids, *args, **kwargs)
    _take_over_trainer_hook(self, state)
    extra = {}
    if state.mode == "per_sequence":
        for key, value in state.call_kwargs.items():
            if isinstance(value, torch.Tensor) and value.shape == input_ids.shape:
                extra[key] = value
            elif value is not None:
                raise ValueError(f"neftune_mode='per_sequence': the model's {key} has shape {tuple(value.shape)}, "
                                 f"the embedding's input_ids {tuple(input_ids.shape)}; they must match")
    return neftune_embedding(input_ids, self.weight, state.alpha, mode=state.mode, padding_idx=self.padding_idx,
                             training=self.training, backend=state.backend, **extra)
