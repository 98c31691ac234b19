"""The grouped ops (lora_qkv, grouped and per projection; lora_gated_mlp) flatten x's leading dimensions inside
their autograd.Function, as lora_linear does (tests/test_lora_linear.py has its own case): the op's node is each
output's grad_fn and leads straight to x (no reshape nodes: host time on every call), outputs take in-place ops,
and values and gradients equal those of the same call on the flattened x, bitwise."""

from __future__ import annotations

import pytest
import torch
from lora_cases import make_adapters, make_weight

from fastlora.ops import lora_gated_mlp, lora_qkv
from fastlora.ops.lora_projection import LoraProjection

K = 64


def _projection(kind, n, k, dropout_p=0.0):
    a, b = make_adapters(8, n, k)
    return LoraProjection(make_weight(kind, n, k, torch.float32), a, b, 1.5, torch.randn(n).requires_grad_(),
                          dropout_p)


def _cases():
    """name -> (projections, op(x, projections) -> tuple of outputs)."""
    def qkv(projs, x):
        return lora_qkv(x, projs)

    def mlp(projs, x):
        return (lora_gated_mlp(x, *projs),)

    return {
        "qkv-grouped": ([_projection("nf4-dq", n, K) for n in (64, 32, 32)], qkv),
        "qkv-per-projection": ([_projection("nf4-dq", n, K, 0.1) for n in (64, 32, 32)], qkv),  # dropout: not grouped
        "gated-mlp": ([_projection("nf4-dq", 96, K), _projection("nf4-dq", 96, K), _projection("nf4-dq", K, 96)], mlp),
    }


def _leaves(projs):
    return [t for p in projs for t in (p.lora_A, p.lora_B, p.bias)]


@pytest.mark.parametrize("case", ["qkv-grouped", "qkv-per-projection", "gated-mlp"])
@pytest.mark.parametrize("shape", [(3, 5, K), (K,)], ids=["3-D", "1-D"])
def test_one_node_in_place_outputs_and_the_2d_results(case, shape, seed):
    projs, op = _cases()[case]
    base = torch.randn(*shape)
    x = base.clone().requires_grad_()
    torch.manual_seed(seed)
    ys = op(projs, x)
    for y in ys:
        assert y.shape[:-1] == x.shape[:-1]
        assert type(y.grad_fn).__name__.endswith("FunctionBackward")
        following = y.grad_fn.next_functions[0][0]
        assert type(following).__name__ == "AccumulateGrad" and following.variable is x
    values = [y.detach().clone() for y in ys]
    for y in ys:
        y += 1.0  # a view made inside a custom Function would refuse this
    gs = [torch.randn_like(y) for y in ys]
    torch.autograd.backward(ys, gs)
    grads = [x.grad] + [t.grad.clone() for t in _leaves(projs)]

    for t in _leaves(projs):
        t.grad = None
    x2 = base.clone().requires_grad_()
    torch.manual_seed(seed)
    ys2 = op(projs, x2.reshape(-1, K))
    torch.autograd.backward(ys2, [g.reshape(-1, g.shape[-1]) for g in gs])
    for y, y2, v in zip(ys, ys2, values, strict=True):
        assert torch.equal(y2.detach().reshape(y.shape), v)
        assert torch.equal(y.detach(), v + 1.0)
    for i, (a, b) in enumerate(zip(grads, [x2.grad] + [t.grad for t in _leaves(projs)], strict=True)):
        assert torch.equal(a, b), i
