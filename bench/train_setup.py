"""Moved into the package (fastlora/bench/train_setup.py) so that `python -m fastlora bench` can use it from an
installed wheel; this name stays so `import train_setup` in bench/ keeps working (the very same module object)."""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("fastlora.bench.train_setup")
