"""The C++ glue of the CUDA build (csrc/cuda/*.cpp, csrc/ops.cpp with FASTLORA_WITH_CUDA) compiles, without a GPU.

The .cu kernels are compiled by nvcc in tests/test_cuda_*.py and run on a CPU emulation; the host code that checks
arguments, picks the stream and launches them is only built where torch has CUDA, which this CPU-only machine's
torch does not. So each glue file is checked here with the host compiler (``-fsyntax-only``) against this torch's
headers and the CUDA toolkit's: a wrong ATen / c10 call, type or include is caught before a GPU build meets it.

The CPU wheel of torch leaves out one generated header of c10/cuda (cuda_cmake_macros.h, the build's
configuration); a CUDA build of torch generates it with ``C10_CUDA_BUILD_SHARED_LIBS`` defined, which is what the
stand-in written here says.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

from fastlora import compile_check

REPO = Path(__file__).resolve().parent.parent
GLUE = sorted((REPO / "csrc" / "cuda").glob("*.cpp")) + [REPO / "csrc" / "ops.cpp"]
CXX = shutil.which("g++") or shutil.which("c++")


def _cuda_include() -> Path | None:
    nvcc = compile_check._find_nvcc()
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    if nvcc:
        homes.insert(0, str(Path(os.path.realpath(nvcc)).parent.parent))
    for home in filter(None, homes):
        if (Path(home) / "include" / "cuda_runtime_api.h").is_file():
            return Path(home) / "include"
    return None


CUDA_INCLUDE = _cuda_include()
pytestmark = [
    pytest.mark.skipif(CXX is None, reason="no host C++ compiler"),
    pytest.mark.skipif(CUDA_INCLUDE is None, reason="CUDA toolkit headers not found"),
]


@pytest.fixture(scope="module")
def flags(tmp_path_factory) -> list[str]:
    from torch.utils import cpp_extension

    shim = tmp_path_factory.mktemp("c10_cuda_config")
    macros = shim / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    macros.parent.mkdir(parents=True)
    macros.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [*cpp_extension.include_paths(), str(CUDA_INCLUDE), str(REPO / "csrc" / "include"),
                sysconfig.get_paths()["include"], str(shim)]  # the shim last: a real header wins
    # setup.py's flags for a CUDA build (CUDAExtension defines TORCH_EXTENSION_NAME for ops.cpp's module)
    return ["-std=c++17", "-fsyntax-only", "-DFASTLORA_WITH_CUDA=1", "-DTORCH_EXTENSION_NAME=_C",
            *(f"-I{i}" for i in includes)]


def _compile(flags: list[str], source: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CXX, *flags, str(source)], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("source", GLUE, ids=lambda p: str(p.relative_to(REPO)))
def test_cuda_glue_compiles(flags, source):
    result = _compile(flags, source)
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert result.returncode == 0, f"{source.name} does not compile:\n" + "\n".join(errors[:20])


def test_a_broken_glue_file_is_caught(flags, tmp_path):
    """The check can fail: ops_cuda.cpp calling a c10::cuda function that does not exist does not compile."""
    source = REPO / "csrc" / "cuda" / "ops_cuda.cpp"
    text = source.read_text()
    marker = "c10::cuda::getCurrentCUDAStream("
    assert marker in text
    broken = tmp_path / "ops_cuda.cpp"
    broken.write_text(text.replace(marker, "c10::cuda::streamThatDoesNotExist(", 1))
    result = _compile(flags + [f"-I{source.parent}"], broken)
    assert result.returncode != 0
    assert "streamThatDoesNotExist" in result.stderr
