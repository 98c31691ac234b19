"""``python -m fastlora info``: what this installation has and which backends run here."""

from __future__ import annotations

import importlib.metadata
import platform

import torch

from . import __version__, _extension, backends


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def collect() -> dict:
    """The facts printed by ``info``, as data."""
    ext = _extension.load()
    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)"
    return {
        "fastlora": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "bitsandbytes": _version("bitsandbytes"),
        "peft": _version("peft"),
        "extension": "loaded" if ext is not None else f"NOT AVAILABLE ({_extension.error()})",
        "extension_built_with_cuda": backends.extension_cuda(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_features_used": list(ext.cpu_features()) if ext is not None else [],
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "backends_cpu": backends.available("cpu"),
        "backends_cuda": backends.available("cuda"),
        "triton_interpret": backends.triton_interpret(),
    }


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fastlora info",
                                     description="Print versions, the compiled extension's state, the CPU features "
                                                 "its kernels use, the GPU, and which backends can run here.")
    parser.add_argument("--json", action="store_true", help="print the same facts as one JSON object")
    args = parser.parse_args(argv)
    facts = collect()
    if args.json:
        import json

        print(json.dumps(facts, indent=2))
        return 0
    width = max(len(k) for k in facts)
    for key, value in facts.items():
        if isinstance(value, dict):
            value = ", ".join(f"{name}: {'yes' if ok else 'no'}" for name, ok in value.items())
        elif isinstance(value, list):
            value = ", ".join(value) or "-"
        elif value is None:
            value = "none"
        print(f"{key.replace('_', ' '):<{width}}  {value}")
    return 0
