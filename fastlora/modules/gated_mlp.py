"""Gated MLP blocks run as one fused op (:func:`fastlora.ops.lora_gated_mlp`): ``down(act(gate(x)) * up(x))``
with the gate and up outputs kept for backward and the activation, the product and the down projection's
input recomputed from them (PEFT's unpatched block saves all four).

Matching is structural, a table of child names (``LAYOUTS``), not a list of model families: a module with
children ``gate_proj`` / ``up_proj`` / ``down_proj`` (or Phi-3's fused ``gate_up_proj`` / ``down_proj``)
and an activation child is a candidate. It is accepted only if
  - its activation computes exactly ``F.silu`` or ``F.gelu(approximate="tanh")`` (probed on a vector), and
  - its own forward computes exactly ``down(act(gate(x)) * up(x))`` (probed once per class on two random
    tokens, with dropout modules briefly in eval mode, nothing else changed: no bitsandbytes repacking, no
    random numbers drawn), and
  - each projection is a LoRA layer fastlora accelerates on its own (PEFT's or fastlora's own LoRA).
Under ``torch.autocast`` the fused block computes in the autocast dtype, as the unpatched block's linears would
(:mod:`fastlora.modules._autocast`); with bitsandbytes projections whose ``compute_dtype`` is not x's (fp32
hidden states after ``prepare_model_for_kbit_training``) each base product runs in the compute dtype and the
LoRA terms on x, as PEFT computes them. Each call falls back to the block's own forward — whose projections are
patched one by one — when a projection's call would not be fused on its own, it is DoRA, or the projections
disagree on training mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.lora_gated_mlp import lora_gated_mlp
from . import _autocast, _instance, _projection_args, lora, peft_lora

# (gate child, up child or None for a fused gate_up projection, down child)
LAYOUTS = (("gate_proj", "up_proj", "down_proj"), ("gate_up_proj", None, "down_proj"))
ACTIVATION_CHILDREN = ("act_fn", "activation_fn", "act")
CLAIMS_CHILDREN = False  # the projections are patched one by one too: they run when a call falls back


def _layout(module):
    for gate, up, down in LAYOUTS:
        names = [gate, down] + ([up] if up else [])
        if all(isinstance(getattr(module, n, None), torch.nn.Module) for n in names):
            return gate, up, down
    return None


def _activation_child(module):
    for name in ACTIVATION_CHILDREN:
        act = getattr(module, name, None)
        if isinstance(act, torch.nn.Module):
            return act
    return None


def claims(module) -> bool:
    """A gated MLP block with at least one LoRA projection (one without any has nothing to fuse)."""
    layout = _layout(module)
    if layout is None or _activation_child(module) is None:
        return False
    children = [getattr(module, name) for name in layout if name is not None]
    return any(lora.has_lora(child) or peft_lora.claims(child) for child in children)


def _activation_kind(act) -> str | None:
    z = torch.linspace(-6, 6, 257)
    for dtype in (torch.float32, torch.bfloat16):
        zd = z.to(dtype)
        try:
            out = act(zd)
        except Exception:  # noqa: BLE001 - any failure means: not an activation we know
            return None
        if torch.equal(out, F.silu(zd)):
            kind = "silu"
        elif torch.equal(out, F.gelu(zd, approximate="tanh")):
            kind = "gelu_tanh"
        else:
            return None
        if dtype == torch.float32:
            first = kind
        elif kind != first:
            return None
    return first


def _probe_dtype(child) -> torch.dtype:
    base = child.get_base_layer() if hasattr(child, "get_base_layer") else child
    weight = getattr(base, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dtype.is_floating_point:
        return weight.dtype
    compute = getattr(base, "compute_dtype", None)
    return compute if isinstance(compute, torch.dtype) else torch.float32


def _forward_matches(module, layout, act) -> bool:
    """Whether the module's own forward is ``down(act(gate(x)) * up(x))`` (bitwise on one probe)."""
    gate_name, up_name, down_name = layout
    gate, down = getattr(module, gate_name), getattr(module, down_name)
    dropouts = [m for m in module.modules() if isinstance(m, torch.nn.Dropout) and m.training]
    in_features = getattr(gate, "in_features", None)
    if not isinstance(in_features, int):
        return False
    x = torch.randn(2, in_features, generator=torch.Generator().manual_seed(0)).to(_probe_dtype(gate))
    x = x.to(next(module.parameters()).device).requires_grad_()
    # bitsandbytes fixes its compute dtype on a layer's first call: the probe must not be that call
    firsts = [(m, dict(m.__dict__)) for m in module.modules() if "compute_type_is_set" in m.__dict__]
    try:
        for m in dropouts:
            m.training = False
        # x requires grad: bitsandbytes repacks a weight in place for eval-mode calls without grad on
        # AVX512-BF16 CPUs; with grad it does not
        with torch.enable_grad():
            if up_name is None:
                g, u = gate(x).chunk(2, dim=-1)
            else:
                g, u = gate(x), getattr(module, up_name)(x)
            want = down(act(g) * u)
            got = type(module).forward(module, x)
    except Exception:  # noqa: BLE001 - a forward that does not take one tensor is not this block
        return False
    finally:
        for m in dropouts:
            m.training = True
        for m, saved in firsts:
            for key in ("compute_type_is_set", "compute_dtype"):
                if key in saved:
                    m.__dict__[key] = saved[key]
    return isinstance(got, torch.Tensor) and got.shape == want.shape and torch.equal(got, want)


class GatedMLPState(_instance.InstanceState):
    def __init__(self, backend: str, layout: tuple, activation: str):
        super().__init__(backend)
        self.layout, self.activation = layout, activation

    def describe(self) -> str:
        return f"fastlora.gated_mlp(activation={self.activation!r}, backend={self.backend!r})"


_verified_classes: dict = {}  # (class, layout, activation class) -> bool, filled by the forward probe


def skip_reason(module) -> str | None:
    layout = _layout(module)
    conflict = _instance.conflict_reason(module)
    if conflict is not None:
        return conflict
    act = _activation_child(module)
    if _activation_kind(act) is None:
        return f"activation {type(act).__name__} is neither SiLU nor GELU-tanh"
    reason = _projection_args.skip_reason(module, layout)
    if reason is not None:
        return reason
    key = (type(module), layout, type(act))
    if key not in _verified_classes:
        _verified_classes[key] = _forward_matches(module, layout, act)
    if not _verified_classes[key]:
        return f"{type(module).__name__}.forward is not down(act(gate(x)) * up(x))"
    return None


def install(module, backend: str) -> None:
    state = GatedMLPState(backend, _layout(module), _activation_kind(_activation_child(module)))
    _instance.install(module, _fused_forward, state)


def _fused_forward(self, x, *args, **kwargs):
    state = _instance.state_of(self)
    projections = None if args or kwargs or not isinstance(x, torch.Tensor) else _projections(self, state, x)
    if projections is None:
        state.fallback_calls += 1
        return type(self).forward(self, x, *args, **kwargs)
    training, dtype, (gate, up, down) = projections
    return _autocast.run(lora_gated_mlp, x, dtype, gate, up, down, activation=state.activation, training=training,
                         backend=state.backend)


def _projections(module, state: GatedMLPState, x):
    return _projection_args.projections([None if name is None else getattr(module, name) for name in state.layout], x)
