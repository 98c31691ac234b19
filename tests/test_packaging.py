"""The wheel holds every Python package of fastlora (a subpackage missing from setup.py's list installs
fine in editable mode and fails only after `pip install .`), the Triton kernels as fastlora.kernels and the
demo corpus. Built without the compiled extension (FASTLORA_NO_EXTENSION=1): it checks the file list only."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_holds_every_package(tmp_path):
    # a clean copy: setuptools packs a stale build/lib left by earlier builds into the wheel
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.so", ".pytest_cache", ".benchmarks",
        "fastlora-*-results"))
    env = dict(os.environ, FASTLORA_NO_EXTENSION="1")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w",
                           str(tmp_path), str(source)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = tmp_path.glob("fastlora-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "fastlora").rglob("__init__.py")
                if "__pycache__" not in p.parts and not p.parent.is_symlink()}
    for package in sorted(packages):
        assert f"{package}/__init__.py" in names, f"{package} is not in the wheel (setup.py packages=)"
    for kernel in (ROOT / "kernels").glob("*.py"):
        assert f"fastlora/kernels/{kernel.name}" in names
    assert "fastlora/data/fables.txt" in names
    assert not any(name.startswith("kernels/") for name in names)  # no top-level `kernels` package


def test_bench_extra_is_in_the_demo_and_test_extras():
    """`python -m fastlora bench --suite kernels / train` run on pytest-benchmark: the bench extra holds pytest and
    pytest-benchmark, and the demo's and the tests' installs get them with the same pins."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert sorted(extras["bench"]) == ["pytest-benchmark>=4", "pytest>=8"]
    for name in ("demo", "test"):
        assert set(extras["bench"]) <= set(extras[name]), name
