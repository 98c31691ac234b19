"""Build of fastlora and its compiled extension ``fastlora._C``.

The extension is built with torch's C++ extension tooling against the torch that is installed in
the build environment, so install with ``pip install --no-build-isolation .`` after torch.

Environment switches:
  FASTLORA_BUILD_CUDA=1|0   force the CUDA kernels on or off (default: on when torch has CUDA and
                            nvcc is found).
  FASTLORA_NO_EXTENSION=1   skip the compiled extension entirely (pure-Python install; fastlora
                            then runs on its torch reference with a warning).
  FASTLORA_NATIVE_ARCH=1    compile the portable C++ code with -march=native (off by default: the
                            AVX2 kernels are selected at run time either way).
"""

import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    return value.strip().lower() not in ("0", "false", "no", "off")


def _extensions():
    if _flag("FASTLORA_NO_EXTENSION"):
        return [], {}
    import torch
    from torch.utils import cpp_extension

    build_cuda = _flag("FASTLORA_BUILD_CUDA")
    cuda_possible = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if build_cuda is None:
        build_cuda = cuda_possible
    if build_cuda and not cuda_possible:
        raise RuntimeError(
            "FASTLORA_BUILD_CUDA=1 but torch has no CUDA "
            f"(torch.version.cuda={torch.version.cuda}) or nvcc was not found "
            f"(CUDA_HOME={cpp_extension.CUDA_HOME})"
        )

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-ffp-contract=off"]
    if _flag("FASTLORA_NATIVE_ARCH"):
        cxx.append("-march=native")
    define_macros = []
    extra_compile_args = {"cxx": cxx}
    ext_cls = cpp_extension.CppExtension
    if build_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
        extra_compile_args["nvcc"] = ["-O3", "-std=c++17", "--fmad=false"]
        define_macros.append(("FASTLORA_WITH_CUDA", "1"))
        ext_cls = cpp_extension.CUDAExtension
    ext = ext_cls(
        name="fastlora._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc", "include")],
        define_macros=define_macros,
        extra_compile_args=extra_compile_args,
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    packages=["fastlora", "fastlora.bench", "fastlora.demo", "fastlora.kernels", "fastlora.modules", "fastlora.ops"],
    package_data={"fastlora": ["data/*.txt"]},
    package_dir={"fastlora": "fastlora", "fastlora.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
