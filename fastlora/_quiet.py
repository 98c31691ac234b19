"""Third-party messages every ``python -m fastlora demo`` / ``bench`` run would print, none of them about the
user's setup, hidden while those commands run (never in the test suite, which should see them).

* PEFT calls a transformers property deprecated in transformers 5 (a FutureWarning).
* bitsandbytes' CPU 4-bit ops have no autograd kernel registered: torch warns on every backward through them,
  though bitsandbytes' own autograd function computes the gradient.
* bitsandbytes, on a CPU with AVX512-BF16, logs at import that it cannot fetch an optional faster GEMM from the
  Hugging Face hub (the ``kernels`` package); fastlora never takes that path, and a source checkout's
  ``kernels/`` folder (fastlora's own Triton kernels) makes the message name fastlora's folder instead.
"""

from __future__ import annotations

import contextlib
import logging
import warnings

WARNINGS = [(FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
            (UserWarning, r"bitsandbytes::\w+: an autograd kernel was not registered")]
LOG_RECORDS = [("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community")]


class _DropPrefix(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def _ignore_warnings() -> None:
    for category, message in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


@contextlib.contextmanager
def quiet():
    """Hide the messages above inside the block. Enter it before bitsandbytes is imported: its message is logged
    once, at import."""
    filters = [(logging.getLogger(name), _DropPrefix(prefix)) for name, prefix in LOG_RECORDS]
    for logger, f in filters:
        logger.addFilter(f)
    try:
        with warnings.catch_warnings():
            _ignore_warnings()
            yield
    finally:
        for logger, f in filters:
            logger.removeFilter(f)
