"""``python -m fastlora demo``: see :mod:`fastlora.demo.cli`."""

from .cli import main

__all__ = ["main"]
