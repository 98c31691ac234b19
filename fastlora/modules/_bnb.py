"""bitsandbytes' ``Linear4bit`` class, looked up without importing bitsandbytes (one of its layers can only exist
once bitsandbytes was imported, and importing it here would cost seconds for models that have none), and the
per-layer cache of a ``Params4bit``'s fastlora view that the patched 4-bit layers keep between calls."""

from __future__ import annotations

import sys

import torch


def linear4bit_class() -> type | None:
    """``bitsandbytes.nn.Linear4bit``, or None when bitsandbytes is not imported."""
    bnb = sys.modules.get("bitsandbytes")
    return None if bnb is None else bnb.nn.Linear4bit


class Params4bitView:
    """``fastlora.nf4.from_bnb(param)`` of a layer's bitsandbytes ``Params4bit``, built again only when the param
    or its quant state or statistics change (building and validating the view is ~25 us of host time, on every
    call otherwise). The view holds the statistics it shares, so none of their ids in its key can be reused by a
    new object while it is cached. ``get`` replaces the cached pair rather than mutating it, so a shallow copy
    (deepcopy of patch state) never shares a stale one."""

    def __init__(self):
        self.cached = None

    @staticmethod
    def _key(param) -> tuple:
        # Identities only: a tensor property costs ~2 us on a Params4bit (its __torch_function__), and data_ptr()
        # is refused on the FakeTensors of fastlora's memory estimates. New packed bytes come with a new quant state
        # (bitsandbytes quantizes into both), and a device move gives the statistics new objects (QuantState.to).
        state = param.quant_state
        state2 = getattr(state, "state2", None)
        return (id(param), id(state), id(state.absmax), id(state.code),
                getattr(state, "packing_format_for_cpu", False), getattr(state, "nested", False),
                None if state2 is None else (id(state2.absmax), id(state2.code), id(state.offset)))

    def get(self, param):
        """The view of ``param``; under torch.compile ``param`` itself (a cache of Python objects keyed by ids is
        nothing it can trace: the op then views the weight per call)."""
        from .. import nf4

        if torch.compiler.is_compiling():
            return param
        key = self._key(param)
        if self.cached is None or self.cached[0] != key:
            self.cached = (key, nf4.from_bnb(param))
        return self.cached[1]

    def __deepcopy__(self, memo):
        return Params4bitView()

    def __getstate__(self):
        return {"cached": None}  # views are rebuilt, not pickled with the model
