"""fastlora.ops.dora_linear against a float64 DoRA written from the paper's formula (weight norm detached),
dense and 4-bit weights, fp32 and bf16, odd shapes; gradients of x, A, B, magnitude and bias; bad input."""

import pytest
import torch
from lora_cases import decoded_weight, make_weight, rel_err

from fastlora.ops.dora_linear import dora_linear

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def _truth(x, w, A, B, s, magnitude, bias, grad):
    x, A, B, magnitude = (t.detach().double().requires_grad_() for t in (x, A, B, magnitude))
    bias64 = None if bias is None else bias.detach().double().requires_grad_()
    w = w.double()
    norm = torch.linalg.norm(w + s * (B @ A), dim=1).detach()
    y = (magnitude / norm) * (x @ w.T + s * (x @ A.T) @ B.T)
    if bias64 is not None:
        y = y + bias64
    y.backward(grad.double())
    grads = [x.grad, A.grad, B.grad, magnitude.grad] + ([] if bias64 is None else [bias64.grad])
    return y.detach(), grads


@pytest.mark.parametrize("kind", ["dense", "nf4-dq", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,out_features,in_features,rank", [(1, 64, 128, 4), (7, 192, 64, 8), (33, 128, 320, 3)])
def test_matches_float64(kind, dtype, tokens, out_features, in_features, rank):
    torch.manual_seed(tokens * 7 + rank)
    weight = make_weight(kind, out_features, in_features, dtype)
    w = decoded_weight(weight, dtype).float()
    x = torch.randn(2, tokens, in_features).to(dtype).requires_grad_()
    A = (torch.randn(rank, in_features) / in_features ** 0.5).requires_grad_()
    B = (torch.randn(out_features, rank) * 0.1).requires_grad_()
    s = 2.0 / rank
    magnitude = (torch.linalg.norm(w + s * (B @ A).detach(), dim=1) * (1 + 0.2 * torch.rand(out_features)))
    magnitude = magnitude.detach().requires_grad_()
    bias = (torch.randn(out_features) * 0.1).to(dtype).requires_grad_()
    grad = torch.randn(2, tokens, out_features).to(dtype)
    y = dora_linear(x, weight, A, B, s, magnitude, bias=bias)
    y.backward(grad)
    want_y, want_grads = _truth(x.float(), w, A, B, s, magnitude, bias.float(), grad)
    assert y.dtype == dtype and y.shape == want_y.shape
    assert rel_err(y, want_y) < TOL[dtype]
    for name, got, want in zip(("x", "A", "B", "magnitude", "bias"), (x.grad, A.grad, B.grad, magnitude.grad,
                                                                      bias.grad), want_grads, strict=True):
        assert rel_err(got, want) < TOL[dtype], name


def test_bad_input():
    x, w = torch.randn(3, 64), torch.randn(32, 64)
    A, B = torch.randn(4, 64), torch.randn(32, 4)
    with pytest.raises(ValueError, match="magnitude must have out_features=32"):
        dora_linear(x, w, A, B, 1.0, torch.ones(31))
    with pytest.raises(TypeError, match="magnitude must have lora_A's dtype"):
        dora_linear(x, w, A, B, 1.0, torch.ones(32, dtype=torch.float64))
    with pytest.raises(ValueError, match="magnitude"):
        dora_linear(x, w, A, B, 1.0, torch.ones(32, 1))
