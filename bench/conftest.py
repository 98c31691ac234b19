"""Benchmarks run with pytest-benchmark: `pytest bench/ --benchmark-only` (the kernels suite of
`python -m fastlora bench` is bench_kernels_suite.py). Each file prints a ratio summary at the end.

bench_*.py files are collected when a directory is given (pytest's default pattern is test_*.py).
A bench module may define ``bench_summary() -> str``: it is printed after pytest-benchmark's tables."""

from __future__ import annotations

import pytest

_summary_modules: list = []


def pytest_collect_file(file_path, parent):
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):  # an explicit path is collected by pytest itself
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_collection_modifyitems(session, config, items):
    for item in items:
        module = getattr(item, "module", None)
        if hasattr(module, "bench_summary") and module not in _summary_modules:
            _summary_modules.append(module)


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter):
    for module in _summary_modules:
        text = module.bench_summary()
        if text:
            terminalreporter.write_line(text)
