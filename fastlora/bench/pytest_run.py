"""Running a packaged pytest-benchmark module (fastlora.bench.pytest_*) from ``python -m fastlora bench``.

The suite's tests run in a pytest process of their own: pytest's configuration and plugins stay out of the
calling process (which may itself be a test run), and pytest-benchmark times and reports as it does for
``pytest bench/``. The process gets a configuration file of its own and a scratch root folder, loads no conftest.py
(a checkout's tests/conftest.py would set TRITON_INTERPRET), and an installed fastlora runs from the scratch
folder: a source checkout's top-level folders (kernels/ is one) would otherwise shadow packages of the same name
(PyPI's ``kernels``, which bitsandbytes looks for). Its output is passed on line by line as progress, without the
third-party noise :mod:`fastlora._quiet` names (loaded as a plugin, :mod:`fastlora.bench.pytest_quiet`).

pytest and pytest-benchmark are optional dependencies (the ``bench`` extra): :func:`missing` says, before
anything runs, which of them is not installed and how to install it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import tempfile
from collections.abc import Callable

REQUIRED = (("pytest", "pytest"), ("pytest_benchmark", "pytest-benchmark"))  # (module, distribution)
INSTALL = 'pip install "fastlora[bench]" (or: pip install pytest pytest-benchmark)'


def missing() -> str | None:
    """None if the pytest process can start, else one line: the packages that are not installed and the fix.
    Without this, a missing pytest-benchmark surfaces as pytest's "unrecognized arguments: --benchmark-json"."""
    absent = [dist for module, dist in REQUIRED if importlib.util.find_spec(module) is None]
    if not absent:
        return None
    verb = "is" if len(absent) == 1 else "are"
    return f"{' and '.join(absent)} {verb} not installed (this suite is timed by pytest-benchmark): {INSTALL}"


def _installed() -> bool:
    try:
        importlib.metadata.distribution("fastlora")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def run(module: str, env: dict[str, str], progress: Callable[[str], None], *,
        read: Callable[[pathlib.Path], object] | None = None) -> tuple[int, dict | None, object]:
    """Run the tests of ``module`` (a dotted name) with ``env`` added to the environment ("{scratch}" in a value:
    the scratch folder). Returns (pytest's exit status, pytest-benchmark's JSON report or None,
    ``read(scratch folder)`` or None): ``read`` picks up anything else the tests wrote into the scratch folder."""
    with tempfile.TemporaryDirectory(prefix="fastlora-bench-") as scratch:
        folder = pathlib.Path(scratch)
        # DeprecationWarnings raised while torch and transformers import would fill pytest's warnings summary
        # (tests/ ignores them too, pyproject.toml)
        (folder / "pytest.ini").write_text("[pytest]\nfilterwarnings =\n    ignore::DeprecationWarning\n")
        report = folder / "report.json"
        argv = [sys.executable, "-m", "pytest", "--pyargs", module, "-c", str(folder / "pytest.ini"), "--rootdir",
                scratch, "--noconftest", "-p", "no:cacheprovider", "-p", "fastlora.bench.pytest_quiet", "-v", "-rs",
                f"--benchmark-json={report}", "--benchmark-columns=median,min,rounds", "--benchmark-sort=name"]
        full_env = dict(os.environ, **{k: v.replace("{scratch}", scratch) for k, v in env.items()})
        with subprocess.Popen(argv, env=full_env, cwd=scratch if _installed() else None, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) as proc:
            for line in proc.stdout:
                progress(line.rstrip("\n"))
        parsed = json.loads(report.read_text()) if report.exists() else None
        return proc.returncode, parsed, (read(folder) if read is not None else None)
