"""Shared builders of the LoRA linear tests: weights of every kind, adapters, the seed the op will
draw, and the float64 ground truth computed with the op's own dropout mask."""

from __future__ import annotations

import math

import torch

from fastlora import backends, nf4, reference_lora

WEIGHT_KINDS = ("dense", "nf4", "nf4-dq", "fp4", "fp4-dq")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Norm-wise relative error allowed against the float64 ground truth of the same inputs. The bf16 /
# fp16 figures are a few units of the dtype's rounding (2^-9, 2^-11): PEFT's own roundings of the
# base output and of y put that much error in by design.
REL_TOL = {torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float64: 1e-12}
# Adapter gradients are fp32 sums of exactly representable inputs: fp32-level even for bf16 x.
ADAPTER_GRAD_TOL = 2e-6


def backend_params() -> list:
    """Backends that can run CPU tensors here (Triton only under the interpreter)."""
    import pytest

    have = backends.available("cpu")
    return [pytest.param(name, marks=() if have[name] else pytest.mark.skip(reason=f"{name} not available"))
            for name in ("reference", "cpp", "triton")]


def make_weight(kind: str, out_features: int, in_features: int, dtype: torch.dtype, blocksize: int = 64):
    """A frozen base weight of ``kind``: a dense tensor of ``dtype`` or a fastlora QuantizedWeight."""
    w = torch.randn(out_features, in_features) / math.sqrt(in_features)
    if kind == "dense":
        return w.to(dtype)
    quant_type, _, dq = kind.partition("-")
    return nf4.quantize(w, blocksize=blocksize, quant_type=quant_type, double_quant=dq == "dq")


def decoded_weight(weight, dtype: torch.dtype) -> torch.Tensor:
    """The weight as the op multiplies with it, float64: 4-bit weights are decoded to x's dtype."""
    if isinstance(weight, torch.Tensor):
        return weight.double()
    decode = torch.float32 if dtype == torch.float64 else dtype
    return nf4.dequantize(weight, decode, backend="reference").double()


def make_adapters(rank: int, out_features: int, in_features: int, dtype: torch.dtype = torch.float32):
    """lora_A, lora_B with requires_grad; B is random (not PEFT's zero init) so every term counts."""
    a = (torch.randn(rank, in_features) / math.sqrt(in_features)).to(dtype).requires_grad_()
    b = (torch.randn(out_features, rank) / math.sqrt(rank)).to(dtype).requires_grad_()
    return a, b


def next_seed(device: str | torch.device = "cpu") -> int:
    """The dropout seed the next lora_linear call on ``device`` will draw from that device's generator."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
        return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64, device=device).item())


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm().clamp_min(1e-300)).item()


def expected64(x, weight, lora_A, lora_B, scaling, bias, dropout_p, seed, grad_y):
    """Float64 y and gradients (dx, dA, dB, dbias) of the exact math, with the op's mask and scale."""
    in_features = x.shape[-1]
    x64 = x.detach().reshape(-1, in_features).to(lora_A.dtype).double().requires_grad_()
    a64 = lora_A.detach().double().requires_grad_()
    b64 = lora_B.detach().double().requires_grad_()
    bias64 = None if bias is None else bias.detach().double().requires_grad_()
    w64 = decoded_weight(weight, x.dtype)
    xb = x.detach().reshape(-1, in_features).double().requires_grad_()
    y = xb @ w64.T
    if bias64 is not None:
        y = y + bias64
    xd = x64
    if dropout_p > 0:
        keep = reference_lora.dropout_keep_mask(seed, tuple(x64.shape), dropout_p, x64.device)
        zero = torch.zeros((), dtype=torch.float64, device=x64.device)
        xd = torch.where(keep, x64 * reference_lora.dropout_scale(dropout_p), zero)
    y = y + scaling * ((xd @ a64.T) @ b64.T)
    g = grad_y.reshape(y.shape).double()
    y.backward(g)
    dx = xb.grad + x64.grad
    dbias = None if bias64 is None else bias64.grad
    return y.detach(), dx, a64.grad, b64.grad, dbias


def loss_and_grads(model, ids):
    """(loss, {name: grad} of every trainable parameter) of one causal-LM step on ``ids`` under a
    fixed seed (so dropout masks repeat); the model's grads are cleared afterwards."""
    torch.manual_seed(77)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads
