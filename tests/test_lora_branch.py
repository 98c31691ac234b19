"""fastlora.ops.lora_branch (the LoRA term alone) against float64 math with the same Philox mask, odd
shapes, every backend of the mask; gradients of x, A and B; exact recompute under checkpointing; bad input."""

import pytest
import torch
from lora_cases import rel_err
from torch.utils.checkpoint import checkpoint

from fastlora.ops import _dropout_seed, lora_dropout
from fastlora.ops.lora_branch import lora_branch


def _truth(x, A, B, s, p, seed, grad):
    mask_scale = lora_dropout(torch.ones_like(x), p, seed, backend="reference").double() if p else 1.0
    x64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, A, B))
    y = s * ((x64 * mask_scale) @ A64.T) @ B64.T
    y.backward(grad.double())
    return y.detach(), (x64.grad, A64.grad, B64.grad)


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("shape", [(1, 64), (3, 7, 96), (130, 200)])
def test_matches_float64(p, backend, shape):
    torch.manual_seed(sum(shape))
    x = torch.randn(*shape, requires_grad=True)
    A = (torch.randn(5, shape[-1]) / shape[-1] ** 0.5).requires_grad_()
    B = (torch.randn(48, 5) * 0.1).requires_grad_()
    grad = torch.randn(*shape[:-1], 48)
    seed_state = torch.get_rng_state()
    y = lora_branch(x, A, B, 1.5, dropout_p=p, backend=backend)
    y.backward(grad)
    torch.set_rng_state(seed_state)
    seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64).item()) if p else 0
    want, grads = _truth(x, A, B, 1.5, p, seed, grad)
    assert rel_err(y, want) < 1e-6
    for got, ref in zip((x.grad, A.grad, B.grad), grads, strict=True):
        assert rel_err(got, ref) < 1e-6
    assert _dropout_seed.pending_count(A) == 0


def test_checkpoint_recompute_is_exact():
    torch.manual_seed(0)
    x = torch.randn(9, 64, requires_grad=True)
    A = torch.randn(4, 64, requires_grad=True)
    B = torch.randn(32, 4, requires_grad=True)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(3)
        for t in (x, A, B):
            t.grad = None
        f = lambda t: lora_branch(t, A, B, 2.0, dropout_p=0.3).sin()  # noqa: E731
        out = checkpoint(f, x, use_reentrant=False, preserve_rng_state=False) if ckpt else f(x)
        out.sum().backward()
        grads.append([t.grad.clone() for t in (x, A, B)])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


def test_bad_input():
    A, B = torch.randn(4, 16), torch.randn(8, 4)
    with pytest.raises(ValueError, match="in_features=16"):
        lora_branch(torch.randn(3, 15), A, B, 1.0)
    with pytest.raises(TypeError, match="x"):
        lora_branch(torch.randn(3, 16, dtype=torch.bfloat16), A, B, 1.0)
    with pytest.raises(ValueError, match="lora_B"):
        lora_branch(torch.randn(3, 16), A, torch.randn(8, 3), 1.0)
    with pytest.raises(ValueError, match="scaling"):
        lora_branch(torch.randn(3, 16), A, B, float("nan"))
    with pytest.raises(ValueError, match="dropout"):
        lora_branch(torch.randn(3, 16), A, B, 1.0, dropout_p=1.0)
