"""Dispatch defaults measured on a GPU and saved for it: the small-M / large-M crossover of the LoRA forward.

On a GPU a 4-bit LoRA forward of few tokens runs the CUDA small-M kernel (fused decode + GEMV/``mma.sync``, at
most ``CUDA_MAX_ROWS`` = 16 rows); more tokens run the large-M path (the weight decoded once into a workspace,
cuBLAS, Triton epilogue). Where one beats the other depends on the GPU and the shape:
``python -m fastlora bench --suite kernels --crossover --save-tuned`` measures both paths per token count and
shape and saves the crossover here; ``fastlora.ops.lora_linear`` then reads it for that GPU.

File: ``$FASTLORA_TUNED_DIR`` (default ``~/.cache/fastlora/tuned``) / ``<device key>.json``, the device key
being the GPU's name and compute capability (e.g. ``NVIDIA-H100-80GB-HBM3-sm90``)::

    {"device": "NVIDIA H100 80GB HBM3", "capability": [9, 0],
     "lora_linear_cuda_max_rows": {"default": 16, "4096x14336": 12},   # K x N -> largest M for the CUDA kernel
     "measured": {...}}                                                # provenance: version, commit, time, data

A shape without its own entry takes ``default``; no file (or no entry) keeps the built-in rule (the CUDA kernel
for every M it supports). A file that cannot be read or has the wrong form is ignored with a warning naming it.
Files are read once per device and process (:func:`clear_cache` after editing one).
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import re
import warnings

import torch

CUDA_ROWS_KEY = "lora_linear_cuda_max_rows"


def tuned_dir() -> pathlib.Path:
    """Where tuned defaults live: $FASTLORA_TUNED_DIR, else ~/.cache/fastlora/tuned."""
    env = os.environ.get("FASTLORA_TUNED_DIR")
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "fastlora" / "tuned"


def device_key(name: str, capability: tuple[int, int]) -> str:
    """A file-name-safe key for a GPU model: its name, then ``-sm<major><minor>``."""
    safe = re.sub(r"[^A-Za-z0-9_.]+", "-", name).strip("-") or "gpu"
    return f"{safe}-sm{capability[0]}{capability[1]}"


def key_of(device: torch.device) -> str:
    """The device key of a CUDA device (asked of the driver once per device index)."""
    return _key_of_index(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _key_of_index(index: int) -> str:
    return device_key(torch.cuda.get_device_name(index), torch.cuda.get_device_capability(index))


def _valid_rows_table(table) -> bool:
    return isinstance(table, dict) and all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0 for k, v in table.items())


@functools.cache
def load(key: str) -> dict:
    """The tuned defaults saved for device ``key`` ({} when there are none)."""
    path = tuned_dir() / f"{key}.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        warnings.warn(f"fastlora: ignoring tuned defaults {path}: {exc}", stacklevel=2)
        return {}
    if not isinstance(data, dict) or not _valid_rows_table(data.get(CUDA_ROWS_KEY, {})):
        warnings.warn(f"fastlora: ignoring tuned defaults {path}: {CUDA_ROWS_KEY!r} must map 'default' or 'KxN' "
                      "to a row count >= 0", stacklevel=2)
        return {}
    return data


def clear_cache() -> None:
    load.cache_clear()


def save(key: str, data: dict) -> pathlib.Path:
    """Write ``data`` as the tuned defaults of device ``key``; returns the file's path."""
    if not _valid_rows_table(data.get(CUDA_ROWS_KEY, {})):
        raise ValueError(f"{CUDA_ROWS_KEY} must map 'default' or 'KxN' to a row count >= 0, got "
                         f"{data.get(CUDA_ROWS_KEY)!r}")
    folder = tuned_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key}.json"
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    clear_cache()
    return path


def cuda_max_rows(key: str, k: int, n: int, limit: int) -> int:
    """Largest M for which a K -> N 4-bit forward takes the CUDA small-M kernel on device ``key``: the saved
    value for that shape, else the saved default, else ``limit`` (the kernel's own maximum, never exceeded)."""
    table = load(key).get(CUDA_ROWS_KEY, {})
    return min(table.get(f"{k}x{n}", table.get("default", limit)), limit)
