"""fastlora.patch / fastlora.unpatch: model surgery. Finds the modules fastlora can accelerate, installs
the forwards of :mod:`fastlora.modules` on them (in place, per instance) and returns a handle that
reports what was done and undoes it.

Which module gets which forward is a table (``_ACCELERATORS``): each entry is a module of
:mod:`fastlora.modules` with ``claims(module) -> bool`` (the module is of its kind: accelerated or
reported), ``skip_reason(module) -> str | None`` and ``install(module, backend)``. Matching is structural
(module types and attributes), never per model family.

Nothing global changes: classes of torch, transformers and PEFT are never modified, so a patched and an
unpatched model live side by side. No parameter, buffer or submodule is added, removed or replaced, so
``state_dict`` keys and parameter objects (and optimizers built before the patch) stay.
"""

from __future__ import annotations

import sys

import torch

from . import adapters
from . import backends as _backends
from . import distributed as _distributed
from .modules import _instance, bnb_linear4bit, gated_mlp, grouped_qkv, linear4bit, neftune, peft_lora, plain_linear
from .modules import lora as lora_module

_HANDLE_ATTR = "_fastlora_handle"

# (kind shown in reports, accelerator); the order is the order a module is offered to them. The
# submodules of a claimed module (a LoRA layer's base layer, lora_A, lora_B) are not offered again,
# unless the accelerator says ``CLAIMS_CHILDREN = False`` (a fused block whose projections are patched
# one by one as well, for the calls the block hands back). An accelerator with ``UNCHANGED = True`` lists
# the modules it gives a skip reason as unchanged (nothing to do there), not as skipped.
_ACCELERATORS = (("gated MLP", gated_mlp), ("grouped q/k/v", grouped_qkv), ("LoRA layer", peft_lora),
                 ("4-bit linear", bnb_linear4bit), ("frozen bf16 linear", plain_linear))
_FUSED = (gated_mlp, grouped_qkv)  # what fuse_projections=False leaves out


class PatchHandle:
    """Returned by :func:`patch`: which modules run fastlora's ops, which were left and why."""

    def __init__(self, model: torch.nn.Module, options: dict, patched: dict[str, str], skipped: dict[str, str],
                 unchanged: dict[str, str], modules: dict[str, torch.nn.Module], restorers: dict[str, object]):
        self.model, self.options = model, options
        self.patched, self.skipped, self.unchanged = list(patched), skipped, unchanged
        self.kinds = patched  # {module name: kind}
        self._modules = modules
        self._restorers = restorers  # name -> restore function, where not _instance.restore
        self._added_lora: list = []  # lora=: the modules given adapters, and every parameter's requires_grad
        self._requires_grad: list = []  # before (plain data, so a patched model pickles)
        self.quantized: list[str] = []  # quantize=: replaced by fastlora Linear4bit (kept by unpatch)
        self._first_step_check = None  # under torch.distributed: the cross-rank check at the first forward
        self.active = True

    @property
    def backend(self) -> str:
        return self.options["backend"]

    def report(self) -> dict:
        """Data: ``patched`` module names, ``kinds`` {name: kind}, ``skipped`` {name: reason} (could be
        accelerated but is not), ``unchanged`` {name: reason} (nothing to accelerate, e.g. a dense lm_head),
        ``fallback_calls`` {name: count} (calls a patched module handed to its own forward, see
        :mod:`fastlora.modules.peft_lora`), ``options``, ``backend``, ``active``."""
        fallbacks = {}
        for name, module in self._modules.items():
            state = _instance.state_of(module)
            if state is not None and state.fallback_calls:
                fallbacks[name] = state.fallback_calls
        return {"patched": list(self.patched), "kinds": dict(self.kinds), "skipped": dict(self.skipped),
                "unchanged": dict(self.unchanged),
                "fallback_calls": fallbacks, "options": dict(self.options), "backend": self.backend,
                "active": self.active}

    def summary(self) -> str:
        """One line: how many modules of each kind were patched, which were left and why."""
        counts: dict[str, int] = {}
        for kind in self.kinds.values():
            counts[kind] = counts.get(kind, 0) + 1
        done = ", ".join(f"{n} {kind}(s)" for kind, n in counts.items()) or "nothing"
        line = f"fastlora.patch: {done} accelerated (backend={self.backend!r})"
        if self.skipped:
            by_reason: dict[str, list[str]] = {}
            for name, reason in self.skipped.items():
                by_reason.setdefault(reason, []).append(name)
            parts = [f"{reason}: {len(names)} ({names[0]}{', ...' if len(names) > 1 else ''})"
                     for reason, names in by_reason.items()]
            line += f"; {len(self.skipped)} left unpatched: " + "; ".join(parts)
        else:
            line += "; none left unpatched"
        if self.unchanged:
            names = list(self.unchanged)
            line += f"; {len(names)} unchanged, nothing to fuse ({names[0]}{', ...' if len(names) > 1 else ''})"
        return line

    def save_adapter(self, path, config=None) -> None:
        """Save the fastlora LoRA adapters (``lora=``) in PEFT's format, see :func:`fastlora.save_adapter`.
        For a PEFT model use PEFT's ``save_pretrained``."""
        adapters.save_adapter(self.model, path, config if config is not None else self.options["lora"])

    def unpatch(self) -> None:
        """Restore every patched module's own forward and repr, remove the adapters ``lora=`` added (save
        them first) and restore every parameter's requires_grad. The 4-bit weights of ``quantize=`` stay
        (the original weights no longer exist). Idempotent."""
        if not self.active:
            return
        _restore_all(self._modules, self._restorers)
        _remove_lora(self._added_lora, self._requires_grad)
        if self._first_step_check is not None:
            self._first_step_check.remove()
        self.active = False
        if self.model.__dict__.get(_HANDLE_ATTR) is self:
            del self.model.__dict__[_HANDLE_ATTR]

    def __repr__(self) -> str:
        return f"PatchHandle({self.summary()!r}, active={self.active})"


def _restore_all(modules: dict, restorers: dict) -> None:
    for name, module in modules.items():
        restorers.get(name, _instance.restore)(module)


def _check_options(backend, neftune_alpha, neftune_mode, lora, quantize, fuse_projections) -> dict:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend != "auto" and backend not in _backends.BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {_backends.BACKENDS}, got {backend!r}")
    if isinstance(lora, dict):
        lora = adapters.LoraConfig(**lora)
    if lora is not None and not isinstance(lora, adapters.LoraConfig):
        raise TypeError(f"lora must be None, a fastlora.LoraConfig or a dict of its fields, got {type(lora).__name__}")
    if not isinstance(fuse_projections, bool):
        raise TypeError(f"fuse_projections must be a bool, got {type(fuse_projections).__name__}")
    if quantize not in (None, "nf4", "fp4"):
        raise ValueError(f"quantize must be None, 'nf4' or 'fp4', got {quantize!r}")
    options = {"backend": backend, "neftune_alpha": None, "neftune_mode": neftune_mode, "lora": lora,
               "quantize": quantize, "fuse_projections": fuse_projections}
    if neftune_alpha is not None:
        options["neftune_alpha"], options["neftune_mode"] = neftune.check_options(neftune_alpha, neftune_mode)
    return options


def patch(model, *, lora=None, quantize: str | None = None, neftune_alpha: float | None = None,
          neftune_mode: str = "padded", fuse_projections: bool = True, backend: str = "auto",
          verbose: bool = False) -> PatchHandle:
    """Accelerate ``model`` in place; returns a :class:`PatchHandle`.

    Args:
      model: a transformers / PEFT model (any ``torch.nn.Module``).
      lora: a :class:`fastlora.LoraConfig` (or a dict of its fields) to add LoRA adapters to a model that has
        none, without PEFT (:mod:`fastlora.adapters`; saved and loaded in PEFT's format with
        :meth:`PatchHandle.save_adapter` / :func:`fastlora.load_adapter`). Every other parameter is frozen.
      quantize: "nf4" or "fp4": first replace every ``nn.Linear`` but the output layer by fastlora's
        bitsandbytes-compatible 4-bit linear (nf4 with double quant; works on CPU). This modifies the model
        for good: unpatch keeps the 4-bit layers.
      neftune_alpha: turn on NEFTune noise in the input embedding (:mod:`fastlora.modules.neftune`);
        None (default) leaves the embedding alone.
      neftune_mode: "padded" (transformers' Trainer formula) or "per_sequence" (real lengths, no
        noise on padding).
      fuse_projections: run gated MLP blocks whose gate / up / down projections all carry LoRA as one
        fused op (:mod:`fastlora.modules.gated_mlp`: gate and up outputs saved, the activation and the
        down projection's input recomputed in backward), and attention's q / k / v projections as one
        (:mod:`fastlora.modules.grouped_qkv`).
      backend: "auto" or one of fastlora.backends.BACKENDS, for every op the patch installs.
      verbose: print :meth:`PatchHandle.summary` to stderr.

    Patching a patched model with the same options returns the existing handle; with different options
    it raises ValueError (unpatch first). All-or-nothing: if anything fails, every module already patched
    is restored. Under a torch.distributed process group with several ranks, the model's first forward
    checks that every rank patched it the same way (:mod:`fastlora.distributed`)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    options = _check_options(backend, neftune_alpha, neftune_mode, lora, quantize, fuse_projections)
    _distributed.refuse_wrapped(model, options)
    existing = model.__dict__.get(_HANDLE_ATTR)
    if existing is not None and existing.active:
        if existing.options != options:
            raise ValueError(f"model is already patched with {existing.options}; call unpatch() before patching "
                             f"with {options}")
        return existing
    patched: dict[str, str] = {}
    skipped: dict[str, str] = {}
    unchanged: dict[str, str] = {}
    claimed: list[str] = []  # prefixes whose submodules are not offered again
    modules: dict[str, torch.nn.Module] = {}
    restorers: dict[str, object] = {}
    added_lora: list = []
    requires_grad: list = []
    quantized: list[str] = []
    put_back_dense = None
    try:
        if options["quantize"] is not None:
            quantized, put_back_dense = _quantize(model, options)
        if options["lora"] is not None:
            requires_grad = [(p, p.requires_grad) for p in model.parameters()]
            added_lora = _add_lora(model, options)
        if options["neftune_alpha"] is not None:
            name, embedding = neftune.input_embedding(model)
            reason = neftune.skip_reason(embedding)
            if reason is not None:
                raise ValueError(f"neftune_alpha: cannot make {name or 'the input embedding'} noisy: {reason}")
            neftune.install(embedding, backend, options["neftune_alpha"], options["neftune_mode"], model)
            modules[name], restorers[name], patched[name] = embedding, neftune.restore, "NEFTune embedding"
        for name, module in model.named_modules():
            if name in modules or any(name.startswith(prefix) for prefix in claimed):
                continue
            if lora_module.has_lora(module):  # fastlora's own LoRA: its forward is the fused op already
                claimed.append(name + ".")
                patched[name] = "LoRA layer"
                continue
            if isinstance(module, linear4bit.Linear4bit):  # fastlora's own 4-bit linear: runs linear_4bit
                patched[name] = "4-bit linear"
                continue
            for kind, accelerator in _ACCELERATORS:
                if accelerator in _FUSED and not options["fuse_projections"]:
                    continue
                if not accelerator.claims(module):
                    continue
                if getattr(accelerator, "CLAIMS_CHILDREN", True):
                    claimed.append(name + ".")
                reason = accelerator.skip_reason(module)
                if reason is not None and getattr(accelerator, "UNCHANGED", False):
                    unchanged[name] = reason
                elif reason is not None:
                    skipped[name] = reason
                else:
                    accelerator.install(module, options["backend"])
                    modules[name] = module
                    patched[name] = kind
                break
        if not patched and not skipped:
            what = f"{len(unchanged)} dense linear(s) without an adapter" if unchanged else "no linear layers"
            raise ValueError(f"nothing to accelerate in {type(model).__name__}: {what}, no LoRA layers, no 4-bit "
                             f"linears, no neftune_alpha")
        handle = PatchHandle(model, options, patched, skipped, unchanged, modules, restorers)
        handle._added_lora, handle._requires_grad, handle.quantized = added_lora, requires_grad, quantized
        model.__dict__[_HANDLE_ATTR] = handle
        handle._first_step_check = _distributed.install_first_step_check(model)
    except BaseException:
        _restore_all(modules, restorers)
        _remove_lora(added_lora, requires_grad)
        if put_back_dense is not None:
            put_back_dense()
        raise
    if verbose:
        print(handle.summary(), file=sys.stderr)
    return handle


def _quantize(model, options: dict):
    """quantize=: every nn.Linear but the output layer becomes a fastlora Linear4bit. Returns (names, the
    step that puts the dense layers back): run only if the patch fails; a successful patch drops it, and
    with it the last reference to the dense weights."""
    before = dict(model.named_modules())
    output = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    skip = tuple(name for name, module in before.items() if module is output and name)
    quant_type = options["quantize"]
    names = linear4bit.quantize_linears(model, quant_type=quant_type, double_quant=quant_type == "nf4",
                                        skip=skip, backend=options["backend"])

    def put_back():
        for name in names:
            parent_name, _, child = name.rpartition(".")
            setattr(before[parent_name] if parent_name else model, child, before[name])

    return names, put_back


def _add_lora(model, options: dict) -> list:
    """lora=: fastlora adapters on the targets; returns the modules (unpatch removes their adapters)."""
    names = set(adapters.add_lora(model, options["lora"], backend=options["backend"]))
    return [module for name, module in model.named_modules() if name in names]


def _remove_lora(modules: list, requires_grad: list) -> None:
    for module in modules:
        if lora_module.has_lora(module):
            lora_module.detach_lora(module)
    for p, flag in requires_grad:
        p.requires_grad_(flag)


def unpatch(model) -> bool:
    """Undo :func:`patch` on ``model``; returns whether it was patched."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    handle = model.__dict__.get(_HANDLE_ATTR)
    if handle is None or not handle.active:
        return False
    handle.unpatch()
    return True


def patch_handle(model) -> PatchHandle | None:
    """The active handle of a patched model, else None."""
    handle = model.__dict__.get(_HANDLE_ATTR) if isinstance(model, torch.nn.Module) else None
    return handle if handle is not None and handle.active else None
