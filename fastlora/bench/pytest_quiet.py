"""pytest plugin of the bench suites' own pytest process (``-p fastlora.bench.pytest_quiet``, added by
:mod:`fastlora.bench.pytest_run`): hides the third-party noise :mod:`fastlora._quiet` names for the whole process.
Not loaded by ``pytest bench/`` or the test suite, which should see those messages."""

from __future__ import annotations

import contextlib

from fastlora._quiet import quiet

_quieted = contextlib.ExitStack()


def pytest_configure(config) -> None:
    # before collection imports bitsandbytes; kept until the process exits
    _quieted.enter_context(quiet())
