"""What the demo ran on, for the table."""

from __future__ import annotations

import importlib.metadata
import os
import platform


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device) -> dict:
    import torch

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": f"{device.type} ({name})" if device.type == "cuda" else "cpu",
            "cpu": cpu_name(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "python": platform.python_version(),
            **{pkg: _version(pkg) for pkg in ("fastlora", "torch", "transformers", "peft", "bitsandbytes")}}
