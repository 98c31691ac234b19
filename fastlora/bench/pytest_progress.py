"""Progress lines for the pytest-benchmark files: shown on the terminal even while pytest captures output."""

from __future__ import annotations

import contextlib
import sys


class Progress:
    """``say(request, msg)`` prints ``[tag] msg`` to stderr past pytest's capture; ``start(request, what)`` also
    numbers it, "k/n what ...", n being the tests of the calling file."""

    def __init__(self, tag: str):
        self.tag, self.done, self.total = tag, 0, None

    def say(self, request, msg: str) -> None:
        capman = request.config.pluginmanager.getplugin("capturemanager")
        ctx = capman.global_and_fixture_disabled() if capman is not None else contextlib.nullcontext()
        with ctx:
            print(f"[{self.tag}] {msg}", file=sys.stderr, flush=True)

    def start(self, request, what: str) -> None:
        if self.total is None:
            here = request.node.path
            self.total = sum(1 for item in request.session.items if item.path == here)
        self.done += 1
        self.say(request, f"{self.done}/{self.total} {what} ...")
