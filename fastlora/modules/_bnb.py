"""bitsandbytes' ``Linear4bit`` class, looked up without importing bitsandbytes: one of its layers can only exist
once bitsandbytes was imported, and importing it here would cost seconds for models that have none."""

from __future__ import annotations

import sys


def linear4bit_class() -> type | None:
    """``bitsandbytes.nn.Linear4bit``, or None when bitsandbytes is not imported."""
    bnb = sys.modules.get("bitsandbytes")
    return None if bnb is None else bnb.nn.Linear4bit
