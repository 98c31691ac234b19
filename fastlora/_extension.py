"""Loading of the compiled extension ``fastlora._C``.

Importing fastlora never fails because of the extension: when it is missing or cannot be loaded
(built against another torch, no compiler at install time), fastlora runs on its torch reference
and says so once, here, and in ``python -m fastlora info``.
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

import torch  # noqa: F401  (fastlora._C links against libtorch: torch must be loaded first)

_module: ModuleType | None = None
_error: str | None = None
_tried = False


def load() -> ModuleType | None:
    """Import ``fastlora._C`` once; returns it, or None (with one warning) when unavailable."""
    global _module, _error, _tried
    if _tried:
        return _module
    _tried = True
    if os.environ.get("FASTLORA_DISABLE_EXTENSION", "") not in ("", "0"):
        _error = "disabled by FASTLORA_DISABLE_EXTENSION"
        advice = "Unset FASTLORA_DISABLE_EXTENSION to use it."
    else:
        try:
            _module = importlib.import_module("fastlora._C")
        except Exception as exc:  # ImportError, OSError (undefined symbols), RuntimeError from torch
            _error = f"{type(exc).__name__}: {exc}"
        # fastlora installs from a clone (README): an editable install there rebuilds the extension in place.
        advice = ("Rebuild it against the installed torch: in the fastlora clone run "
                  "`pip install --no-build-isolation -e .` (for a non-editable install, "
                  "`pip install --no-build-isolation --force-reinstall --no-deps .`).")
    if _module is None:
        warnings.warn(
            f"fastlora: the compiled extension fastlora._C is not available ({_error}); using the torch reference "
            f"implementation (slow). {advice}",
            RuntimeWarning,
            stacklevel=3,
        )
    return _module


def error() -> str | None:
    """Why the extension is unavailable (None when it loaded)."""
    load()
    return _error
