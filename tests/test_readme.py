"""Every ```python block of README.md runs as written (in a fresh interpreter, in a temporary folder)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_python_block_runs(index, tmp_path):
    code = BLOCKS[index]
    if "bitsandbytes" in code or "peft" in code:
        pytest.importorskip("bitsandbytes")
        pytest.importorskip("peft")
        pytest.importorskip("transformers")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"README block {index} failed:\n{code}\n--- stderr ---\n{done.stderr[-4000:]}"


def test_ci_runs_the_readme_test_command():
    """The README's test quick-start command is exactly what CI runs (.ci/run): it is executed on every push."""
    commands = re.findall(r"^ *```\n(.*?)^ *```", README.read_text(), flags=re.S | re.M)
    test_command = next(c.strip() for c in commands if c.strip().endswith("python -m pytest -q"))
    ci = (README.parent / ".ci" / "run").read_text()
    assert test_command in ci
