"""fastlora: fused LoRA / QLoRA kernels with bitsandbytes-compatible 4-bit weights.

Layers (imports go downwards only): ``fastlora.patch`` (model surgery) -> ``fastlora.adapters`` (LoRA
without PEFT, PEFT's file format) -> ``fastlora.modules`` (per-module forwards) -> ``fastlora.nf4`` (4-bit
weights) -> ``fastlora.ops`` (custom ops: schema, fake implementation, backend choice) -> backends
(``fastlora._C`` C++/CUDA kernels, ``fastlora.kernels`` Triton kernels, ``fastlora.reference`` torch).
"""

__version__ = "0.1.0"

from . import _extension

_extension.load()

from . import backends, nf4, ops, reference  # noqa: E402
from .adapters import LoraConfig, load_adapter, save_adapter  # noqa: E402
from .patch import PatchHandle, patch, unpatch  # noqa: E402

__all__ = ["LoraConfig", "PatchHandle", "__version__", "backends", "load_adapter", "nf4", "ops", "patch", "reference",
           "save_adapter", "unpatch"]
