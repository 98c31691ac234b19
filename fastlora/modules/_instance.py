"""Installing a forward on one module instance, and taking it off again.

fastlora never edits a class (PEFT's, transformers' or torch's): each accelerated module gets instance
attributes ``forward`` (a bound method, so ``copy.deepcopy`` rebinds it to the copy) and ``extra_repr``
(so ``repr`` shows fastlora), plus a state object. Removing those three restores the module exactly.
"""

from __future__ import annotations

import copy
import types

STATE_ATTR = "_fastlora_patch_state"


class InstanceState:
    """Per-module state of an installed forward; lives in the module's ``__dict__`` (not a buffer, so
    ``state_dict`` is untouched). ``fallback_calls`` counts calls handed to the module's own forward."""

    tag = "fastlora"

    def __init__(self, backend: str):
        self.backend = backend
        self.fallback_calls = 0

    def __deepcopy__(self, memo):
        return copy.copy(self)  # plain Python values only: a shallow copy is a deep one

    def describe(self) -> str:
        return f"{self.tag}(backend={self.backend!r})"


def conflict_reason(module) -> str | None:
    """Why fastlora must not install a forward on ``module`` (someone else already did), else None."""
    if STATE_ATTR in module.__dict__:
        return "already patched by another fastlora.patch call (on an enclosing or inner model)"
    if "forward" in module.__dict__:
        return "forward already overridden on the instance (e.g. an accelerate hook)"
    if "extra_repr" in module.__dict__:
        return "extra_repr already overridden on the instance"
    return None


def _extra_repr(self):
    own = type(self).extra_repr(self)
    tag = self.__dict__[STATE_ATTR].describe()
    return f"{own}, {tag}" if own else tag


def install(module, forward, state: InstanceState) -> None:
    """Make ``forward(module, *args, **kwargs)`` the module's forward; ``state`` is reachable as
    ``module.__dict__[STATE_ATTR]``. The caller has checked :func:`conflict_reason`."""
    module.__dict__[STATE_ATTR] = state
    module.__dict__["forward"] = types.MethodType(forward, module)
    module.__dict__["extra_repr"] = types.MethodType(_extra_repr, module)


def state_of(module) -> InstanceState | None:
    return module.__dict__.get(STATE_ATTR)


def restore(module) -> None:
    """Take off what :func:`install` put on; a no-op on a module it did not touch."""
    state = module.__dict__.pop(STATE_ATTR, None)
    if state is None:
        return
    module.__dict__.pop("forward", None)
    module.__dict__.pop("extra_repr", None)
