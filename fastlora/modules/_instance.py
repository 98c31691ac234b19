"""Installing a forward on one module instance, and taking it off again.

fastlora never edits a class (PEFT's, transformers' or torch's): each accelerated module gets instance
attributes ``forward`` and ``extra_repr`` (so ``repr`` shows fastlora), each a :class:`BoundMethod`, plus a
state object. Removing those three restores the module exactly.
"""

from __future__ import annotations

import contextlib
import copy
import threading

STATE_ATTR = "_fastlora_patch_state"


class BoundMethod:
    """``function`` bound to ``module``, like ``types.MethodType`` but picklable (``torch.save(model)``):
    it pickles as the module-level function (by name) and the module, and ``copy.deepcopy`` rebinds it to
    the copied module."""

    __slots__ = ("__func__", "__self__")

    def __init__(self, function, module):
        self.__func__, self.__self__ = function, module

    def __call__(self, *args, **kwargs):
        return self.__func__(self.__self__, *args, **kwargs)

    def __reduce__(self):
        return BoundMethod, (self.__func__, self.__self__)

    def __repr__(self) -> str:
        return f"<fastlora bound {self.__func__.__qualname__} of {type(self.__self__).__name__}>"


def bind(module, name: str, function) -> None:
    """Set ``module.<name>`` (an instance attribute) to ``function`` bound to ``module``."""
    module.__dict__[name] = BoundMethod(function, module)


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
    bind(module, "forward", forward)
    bind(module, "extra_repr", _extra_repr)


def state_of(module) -> InstanceState | None:
    return module.__dict__.get(STATE_ATTR)


def restore(module) -> None:
    """Take off what :func:`install` put on; a no-op on a module it did not touch."""
    state = module.__dict__.pop(STATE_ATTR, None)
    if state is None:
        return
    module.__dict__.pop("forward", None)
    module.__dict__.pop("extra_repr", None)


# Sibling groups: a module whose forward runs several of its children on one input in one fused op (attention's
# q / k / v) registers, for the duration of its own forward, a provider that the children's patched forwards ask
# first. A thread-local stack, not a registry of children: nothing to keep in sync through deepcopy or pickling.
_groups = threading.local()


@contextlib.contextmanager
def sibling_group(provider):
    """While active, :func:`grouped_output` asks ``provider(child, x)`` (a tensor, or None: not mine / not now)."""
    stack = _groups.__dict__.setdefault("stack", [])
    stack.append(provider)
    try:
        yield
    finally:
        stack.pop()


def grouped_output(module, x):
    """The output a running sibling group computed for ``module`` on ``x``, or None (then run as usual)."""
    stack = getattr(_groups, "stack", None)
    if not stack:
        return None
    for provider in reversed(stack):
        out = provider(module, x)
        if out is not None:
            return out
    return None
