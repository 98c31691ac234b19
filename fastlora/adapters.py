"""LoRA adapters without PEFT, in PEFT's on-disk format: :class:`LoraConfig`, :func:`add_lora`,
:func:`remove_lora`, :func:`lora_modules`, :func:`save_adapter`, :func:`load_adapter`.

Targets are chosen exactly as ``peft.get_peft_model`` chooses them for the same config (a list: a module
whose name equals an entry or ends with ``"." + entry``; another string: a regex full match on the name;
``"all-linear"``: every linear layer except the model's output embeddings). Each target gets
:func:`fastlora.modules.lora.attach_lora`. A folder written by :func:`save_adapter` loads with
``peft.PeftModel.from_pretrained`` and a folder written by PEFT's ``save_pretrained`` loads with
:func:`load_adapter`: ``adapter_config.json`` + ``adapter_model.safetensors`` with keys
``base_model.model.<module path>.lora_A.weight`` (r, in) / ``.lora_B.weight`` (out, r).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field

import torch

from .modules import _conv1d
from .modules import lora as lora_module

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME_BIN = "adapter_model.bin"  # PEFT's save_pretrained(safe_serialization=False)
KEY_PREFIX = "base_model.model."
ALL_LINEAR = "all-linear"
TASK_TYPES = (None, "CAUSAL_LM", "SEQ_2_SEQ_LM", "FEATURE_EXTRACTION")

# adapter_config.json keys fastlora reads; any other key must hold its "off" value (None, False, {}, [], "")
# or the config is refused, naming the key.
_IGNORED_KEYS = {"peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                 "inference_mode", "megatron_core", "qalora_group_size", "layers_pattern", "init_lora_weights",
                 "bias", "task_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules"}
# Initialisations that leave the base weights untouched: the saved A / B are then a plain LoRA.
_PLAIN_INITS = (True, False, "gaussian")


@dataclass
class LoraConfig:
    """The LoRA configurations fastlora can represent (a subset of ``peft.LoraConfig``).

    ``target_modules``: a list of module names (suffix match, as PEFT), a regex string (full match), or
    ``"all-linear"`` (the default; PEFT's default ``None`` picks a per-architecture list instead)."""

    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: list[str] | str = ALL_LINEAR
    use_rslora: bool = False
    task_type: str | None = "CAUSAL_LM"
    extra: dict = field(default_factory=dict, repr=False)  # base_model_name_or_path, revision (written back)

    def __post_init__(self):
        lora_module.check_lora_args(self.r, self.lora_alpha, self.lora_dropout, self.use_rslora)
        targets = self.target_modules
        if isinstance(targets, (set, tuple)):
            targets = self.target_modules = sorted(targets)
        if isinstance(targets, str):
            if not targets:
                raise ValueError("target_modules must be a non-empty list of names, a regex or 'all-linear', got ''")
            if targets.lower() != ALL_LINEAR:
                try:
                    re.compile(targets)
                except re.error as e:
                    raise ValueError(f"target_modules {targets!r} is not a valid regex: {e}") from None
        elif isinstance(targets, list):
            if not targets or not all(isinstance(t, str) and t for t in targets):
                raise ValueError(f"target_modules must be a non-empty list of non-empty str, got {targets!r}")
        else:
            raise TypeError(f"target_modules must be a list of str or a str, got {type(targets).__name__}")
        if self.task_type not in TASK_TYPES:
            raise ValueError(f"task_type must be one of {TASK_TYPES}, got {self.task_type!r}")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / math.sqrt(self.r) if self.use_rslora else self.lora_alpha / self.r

    @classmethod
    def from_peft_dict(cls, d: dict) -> LoraConfig:
        """From an ``adapter_config.json`` dict (PEFT's ``LoraConfig.to_dict()``); refuses, naming the key,
        any setting fastlora cannot represent (DoRA, rank_pattern, lora_bias, modules_to_save, ...)."""
        if not isinstance(d, dict):
            raise TypeError(f"adapter config must be a dict, got {type(d).__name__}")
        peft_type = d.get("peft_type", "LORA")
        if str(peft_type).rsplit(".", 1)[-1] != "LORA":
            raise ValueError(f"adapter config peft_type must be 'LORA', got {peft_type!r}")
        for key, value in d.items():
            if key in _IGNORED_KEYS or _is_off(value):
                continue
            raise ValueError(f"adapter config key {key!r} = {value!r} is not supported by fastlora")
        if d.get("bias", "none") != "none":
            raise ValueError(f"adapter config key 'bias' = {d['bias']!r} is not supported by fastlora (only 'none')")
        init = d.get("init_lora_weights", True)
        if init not in _PLAIN_INITS:
            raise ValueError(f"adapter config key 'init_lora_weights' = {init!r} is not supported by fastlora "
                             f"(it changes the base weights); supported: {_PLAIN_INITS}")
        targets = d.get("target_modules")
        if targets is None:
            raise ValueError("adapter config key 'target_modules' is missing or null (PEFT's per-architecture "
                             "default is not supported): give the module names")
        task_type = d.get("task_type")
        task_type = None if task_type is None else str(task_type).rsplit(".", 1)[-1]
        extra = {k: d[k] for k in ("base_model_name_or_path", "revision") if d.get(k) is not None}
        return cls(r=d.get("r", 8), lora_alpha=d.get("lora_alpha", 8), lora_dropout=d.get("lora_dropout", 0.0),
                   target_modules=targets,
                   use_rslora=d.get("use_rslora", False), task_type=task_type, extra=extra)

    def to_peft_dict(self, base_model_name_or_path: str | None = None) -> dict:
        """The ``adapter_config.json`` dict; loads with ``peft.PeftConfig.from_pretrained``."""
        targets = self.target_modules if isinstance(self.target_modules, str) else sorted(self.target_modules)
        return {
            "peft_type": "LORA",
            "task_type": self.task_type,
            "base_model_name_or_path": base_model_name_or_path or self.extra.get("base_model_name_or_path"),
            "revision": self.extra.get("revision"),
            "inference_mode": True,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "target_modules": targets,
            "use_rslora": self.use_rslora,
            "bias": "none",
            "fan_in_fan_out": False,
            "init_lora_weights": True,
            "use_dora": False,
            "lora_bias": False,
            "modules_to_save": None,
            "exclude_modules": None,
            "layers_to_transform": None,
            "layers_pattern": None,
            "rank_pattern": {},
            "alpha_pattern": {},
        }


def _is_off(value) -> bool:
    # Identity / type checks: 0 == False, and layers_to_transform=0 means "layer 0", not off.
    return value is None or value is False or (isinstance(value, (str, list, dict, tuple)) and len(value) == 0)


def _output_embeddings(model):
    getter = getattr(model, "get_output_embeddings", None)
    if not callable(getter):
        return None
    try:
        return getter()
    except NotImplementedError:
        return None


def _is_linear(module) -> bool:
    # PEFT's "all-linear" takes nn.Linear and transformers' Conv1D; 4-bit linears are nn.Linear subclasses there
    return (isinstance(module, torch.nn.Linear) or callable(getattr(module, "quantized_weight", None))
            or _conv1d.is_conv1d(module))


def select_targets(model: torch.nn.Module, config: LoraConfig) -> list[str]:
    """Names of the modules PEFT would put LoRA on for ``config``, in ``named_modules`` order."""
    targets = config.target_modules
    # Like PEFT with its own layers: never the lora_A / lora_B inside a module that already has LoRA.
    inner = tuple(f"{n}." for n, m in model.named_modules() if lora_module.has_lora(m))
    named = [(n, m) for n, m in model.named_modules() if not (inner and n.startswith(inner))]
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        # PEFT's _maybe_include_all_linear_layers: every linear but the output embeddings, by full name.
        head = _output_embeddings(model)
        names = {n for n, m in named if _is_linear(m) and n and m is not head}
        return [n for n, _ in named if n in names or any(n.endswith("." + t) for t in names)]
    if isinstance(targets, str):
        return [n for n, _ in named if n and re.fullmatch(targets, n)]
    return [n for n, _ in named if n and (n in targets or any(n.endswith("." + t) for t in targets))]


def _check_model(model) -> None:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, module in model.named_modules():
        if type(module).__module__.startswith("peft."):
            raise ValueError(f"model already holds PEFT modules ({name or 'the model'}: {type(module).__name__}); "
                             f"use fastlora.patch on a PEFT model instead")


def _attach_all(model, plan: dict, *, dtype, backend) -> list[str]:
    """Attach LoRA per ``plan`` {name: (config, A or None, B or None, trainable)}; all-or-nothing."""
    modules = dict(model.named_modules())
    done: list[str] = []
    try:
        for name, (config, a, b, trainable) in plan.items():
            module = modules[name]
            lora_module.attach_lora(module, r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                                    use_rslora=config.use_rslora, dtype=dtype, backend=backend)
            done.append(name)
            if a is not None:
                with torch.no_grad():
                    module.lora_A.weight.copy_(a)
                    module.lora_B.weight.copy_(b)
            module.lora_A.weight.requires_grad_(trainable)
            module.lora_B.weight.requires_grad_(trainable)
    except BaseException:
        for name in done:
            lora_module.detach_lora(modules[name])
        raise
    return done


def _check_targets(model, names: list[str], what: str) -> None:
    modules = dict(model.named_modules())
    for name in names:
        module = modules[name]
        if lora_module.base_kind(module) is None:
            raise ValueError(f"{what} {name!r} is a {type(module).__module__}.{type(module).__name__}, not a "
                             f"torch.nn.Linear or 4-bit linear fastlora can put LoRA on")
        if lora_module.has_lora(module):
            raise ValueError(f"{what} {name!r} already has a fastlora LoRA adapter (remove_lora first)")


def add_lora(model: torch.nn.Module, config: LoraConfig, *, dtype: torch.dtype = torch.float32,
             backend: str = "auto", freeze_base: bool = True) -> list[str]:
    """Put a new LoRA adapter (PEFT's initialisation: A kaiming-uniform, B zeros) on every module ``config``
    targets; returns their names. ``freeze_base`` (like ``peft.get_peft_model``) sets requires_grad=False on
    every other parameter of ``model`` (:func:`remove_lora` does not turn it back on). All-or-nothing: on an
    error nothing is attached and no parameter is changed."""
    _check_model(model)
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a fastlora.adapters.LoraConfig, got {type(config).__name__}")
    lora_module.check_backend(backend)
    names = select_targets(model, config)
    if not names:
        raise ValueError(f"target_modules {config.target_modules!r} matched no module of the model")
    _check_targets(model, names, "target module")
    done = _attach_all(model, {n: (config, None, None, True) for n in names}, dtype=dtype, backend=backend)
    if freeze_base:
        _freeze_base(model)
    return done


def _freeze_base(model) -> None:
    lora = {id(p) for p in _lora_params(model)}
    for p in model.parameters():
        if id(p) not in lora:
            p.requires_grad_(False)


def lora_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """{name: module} of the modules of ``model`` with fastlora LoRA attached."""
    return {n: m for n, m in model.named_modules() if lora_module.has_lora(m)}


def _lora_params(model) -> list[torch.nn.Parameter]:
    return [p for m in lora_modules(model).values() for p in (m.lora_A.weight, m.lora_B.weight)]


def remove_lora(model: torch.nn.Module) -> list[str]:
    """Detach every fastlora LoRA adapter of ``model``; returns the module names."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    names = list(lora_modules(model))
    modules = dict(model.named_modules())
    for name in names:
        lora_module.detach_lora(modules[name])
    return names


def _uniform_settings(modules: dict) -> lora_module.LoraSettings:
    settings = {n: lora_module.lora_settings(m) for n, m in modules.items()}
    first_name, first = next(iter(settings.items()))
    for name, s in settings.items():
        for key in ("r", "lora_alpha", "lora_dropout", "use_rslora"):
            if getattr(s, key) != getattr(first, key):
                raise ValueError(f"LoRA {key} differs between {first_name!r} ({getattr(first, key)}) and {name!r} "
                                 f"({getattr(s, key)}): one adapter_config.json cannot describe both")
    return first


def save_adapter(model: torch.nn.Module, path: str | os.PathLike, config: LoraConfig | None = None) -> None:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` of the LoRA adapters on ``model`` into
    the folder ``path`` (created if needed), as ``peft.PeftModel.save_pretrained`` writes them.

    ``config`` (optional) supplies target_modules / task_type for the json; its r, alpha, dropout and rsLoRA
    must be those of the attached adapters. Without it (or when its targets do not select exactly the
    modules that have LoRA), target_modules lists the modules' full names."""
    from safetensors.torch import save_file

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    modules = lora_modules(model)
    if not modules:
        raise ValueError("model has no fastlora LoRA adapters to save")
    s = _uniform_settings(modules)
    if config is not None:
        if not isinstance(config, LoraConfig):
            raise TypeError(f"config must be a fastlora.adapters.LoraConfig or None, got {type(config).__name__}")
        for key in ("r", "lora_alpha", "lora_dropout", "use_rslora"):
            if getattr(config, key) != getattr(s, key):
                raise ValueError(f"config.{key} = {getattr(config, key)!r} but the model's adapters have "
                                 f"{getattr(s, key)!r}")
        if set(select_targets(model, config)) != set(modules):
            config = LoraConfig(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                                target_modules=sorted(modules), use_rslora=config.use_rslora,
                                task_type=config.task_type, extra=dict(config.extra))
    else:
        config = LoraConfig(r=s.r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout,
                            target_modules=sorted(modules), use_rslora=s.use_rslora)
    tensors = {}
    for name, module in modules.items():
        for part in ("lora_A", "lora_B"):
            tensors[f"{KEY_PREFIX}{name}.{part}.weight"] = getattr(module, part).weight.detach().to("cpu").contiguous()
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
    name_or_path = getattr(model, "name_or_path", None) or None
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config.to_peft_dict(name_or_path), f, indent=2, sort_keys=True)


def _read_weights(path) -> dict[str, torch.Tensor]:
    st, binary = os.path.join(path, WEIGHTS_NAME), os.path.join(path, WEIGHTS_NAME_BIN)
    if os.path.isfile(st):
        from safetensors.torch import load_file

        return load_file(st)
    if os.path.isfile(binary):
        return torch.load(binary, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"adapter folder {os.fspath(path)!r} has neither {WEIGHTS_NAME} nor {WEIGHTS_NAME_BIN}")


_KEY = re.compile(r"(?P<module>.+)\.(?P<part>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.weight")


def read_adapter(path: str | os.PathLike) -> tuple[LoraConfig, dict[str, dict[str, torch.Tensor]]]:
    """(config, {module path: {"lora_A": (r, in), "lora_B": (out, r)}}) of a PEFT-format adapter folder."""
    config_file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"adapter folder {os.fspath(path)!r} has no {CONFIG_NAME}")
    with open(config_file) as f:
        config = LoraConfig.from_peft_dict(json.load(f))
    weights: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in _read_weights(path).items():
        match = _KEY.fullmatch(key[len(KEY_PREFIX):]) if key.startswith(KEY_PREFIX) else None
        if match is None:
            raise ValueError(f"unexpected key {key!r} in the adapter weights (fastlora reads only "
                             f"'{KEY_PREFIX}<module>.lora_A.weight' / '.lora_B.weight')")
        entry = weights.setdefault(match["module"], {})
        if match["part"] in entry:
            raise ValueError(f"adapter weights hold more than one {match['part']} for module {match['module']!r} "
                             f"(several adapters in one file?)")
        entry[match["part"]] = tensor
    return config, weights


def load_adapter(model: torch.nn.Module, path: str | os.PathLike, *, backend: str = "auto",
                 dtype: torch.dtype = torch.float32, trainable: bool = True, freeze_base: bool = True) -> list[str]:
    """Attach the LoRA adapter stored in the PEFT-format folder ``path`` (written by PEFT's save_pretrained or
    by :func:`save_adapter`) to ``model``; returns the module names. Adapters are created in ``dtype``
    (float32, what PEFT loads them as) and require grad when ``trainable``; ``freeze_base`` as in
    :func:`add_lora` (PEFT's from_pretrained freezes the base too). Missing or unexpected keys, shape
    mismatches or unsupported settings raise naming them, and leave the model untouched."""
    _check_model(model)
    lora_module.check_backend(backend)
    config, weights = read_adapter(path)
    expected = select_targets(model, config)
    modules = dict(model.named_modules())
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        where = "no such module in the model" if unexpected[0] not in modules else "not selected by target_modules"
        raise ValueError(f"unexpected keys in the adapter: {KEY_PREFIX}{unexpected[0]}.lora_A.weight ({where})"
                         + (f" and {len(unexpected) - 1} more module(s)" if len(unexpected) > 1 else ""))
    missing = [f"{KEY_PREFIX}{n}.{part}.weight" for n in expected for part in ("lora_A", "lora_B")
               if part not in weights.get(n, {})]
    if missing:
        raise ValueError(f"missing keys in the adapter: {missing[:4]}" + (f" and {len(missing) - 4} more"
                                                                           if len(missing) > 4 else ""))
    _check_targets(model, expected, "adapter module")
    for name in expected:
        module = modules[name]
        want = {"lora_A": (config.r, module.in_features), "lora_B": (module.out_features, config.r)}
        for part, shape in want.items():
            tensor = weights[name][part]
            if not tensor.is_floating_point():
                raise ValueError(f"{KEY_PREFIX}{name}.{part}.weight has dtype {tensor.dtype}, expected floating")
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{KEY_PREFIX}{name}.{part}.weight has shape {tuple(tensor.shape)}, expected {shape} "
                                 f"(r={config.r}, in={module.in_features}, out={module.out_features})")
    plan = {n: (config, weights[n]["lora_A"], weights[n]["lora_B"], trainable) for n in expected}
    done = _attach_all(model, plan, dtype=dtype, backend=backend)
    if freeze_base:
        _freeze_base(model)
    return done
