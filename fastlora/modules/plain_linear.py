"""Dense linears without an adapter (``nn.Linear``, transformers ``Conv1D``).

Mostly nothing to fuse: torch's GEMM already is the whole layer, and such modules are claimed only so
:func:`fastlora.patch` can list them as unchanged. One exception: a frozen bf16 ``nn.Linear`` on a CPU where
torch's bf16 GEMMs take the slow portable path (no native bf16, FASTLORA_CPU_BF16_GEMM=0, or oneDNN off:
:func:`fastlora.ops.frozen_linear.torch_bf16_gemms_slow`) — a bf16 model's lm_head, or the projections a LoRA
does not target. There the installed forward runs :func:`fastlora.ops.frozen_linear` (fp32 GEMMs over blocks of
the weight, one rounding to bf16, as torch's bf16 linear up to summation order) on plain calls: one tensor on
the CPU, bf16 or cast to bf16 by a bf16 autocast (as F.linear would be), the weight still frozen and bf16, the
bias None or bf16, torch's bf16 GEMMs still slow. Any other call runs ``nn.Linear.forward`` and is counted as a
fallback.
"""

from __future__ import annotations

import torch

from ..ops.frozen_linear import frozen_linear, torch_bf16_gemms_slow
from . import _autocast, _instance

UNCHANGED = True  # a module with a skip reason is listed as unchanged, not skipped: there is nothing to fix
NOTHING_TO_FUSE = "dense linear without an adapter (nothing to fuse)"


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def claims(module) -> bool:
    return type(module) is torch.nn.Linear or (_conv1d_type() is not None and type(module) is _conv1d_type())


def skip_reason(module) -> str | None:
    """None where the fp32 path is installed (see the module docstring), else why the module stays as it is."""
    if type(module) is not torch.nn.Linear or module.weight.dtype != torch.bfloat16:
        return NOTHING_TO_FUSE
    if module.weight.device.type != "cpu":
        return NOTHING_TO_FUSE + "; bf16 on a GPU"
    if module.weight.requires_grad:
        return NOTHING_TO_FUSE + "; its weight is trainable"
    if not torch_bf16_gemms_slow():
        return NOTHING_TO_FUSE + "; this CPU runs torch's bf16 GEMMs natively"
    if module.bias is not None and module.bias.dtype != torch.bfloat16:
        return NOTHING_TO_FUSE + f"; its bias is {module.bias.dtype}"
    return _instance.conflict_reason(module)


def _plain_call(module, x) -> bool:
    if not isinstance(x, torch.Tensor) or x.device.type != "cpu" or x.dim() < 1 or x.shape[-1] != module.in_features:
        return False
    # bf16 x, or any x autocast would cast to bf16 (F.linear under a bf16 autocast: the bf16 GEMM too)
    if (_autocast.compute_dtype(x) or x.dtype) != torch.bfloat16:
        return False
    weight, bias = module.weight, module.bias
    return (weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and not weight.requires_grad
            and (bias is None or bias.dtype == torch.bfloat16) and torch_bf16_gemms_slow())


def _forward(self, x, *args, **kwargs):
    if args or kwargs or not _plain_call(self, x):
        _instance.state_of(self).fallback_calls += 1
        return type(self).forward(self, x, *args, **kwargs)
    return _autocast.run(frozen_linear, x, torch.bfloat16, self.weight, self.bias)


def install(module, backend: str) -> None:
    _instance.install(module, _forward, _instance.InstanceState(backend))
