"""Leading dimensions of x, flattened and restored inside an op's ``autograd.Function``.

The ops compute on 2-D (tokens, features) tensors. Flattening x and restoring the outputs' shapes in the
caller would put a reshape node per tensor on the autograd graph of every call, host time that an
unpatched PEFT layer does not spend; inside ``forward`` / ``backward`` they are plain tensor metadata.
"""

from __future__ import annotations

import torch


def flatten_2d(x: torch.Tensor) -> torch.Tensor:
    """x as a contiguous (tokens, features) tensor: x itself when it is one, else a view or a copy."""
    x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    return x2d if x2d.is_contiguous() else x2d.contiguous()


def as_output(y2d: torch.Tensor, lead: torch.Size | tuple) -> torch.Tensor:
    """``y2d`` (tokens, N), made inside a Function's forward, as the (*lead, N) output it returns. detach():
    autograd refuses in-place ops on an output that is a view made inside a custom Function (``hidden +=
    ...`` on a layer's output is common); the detached tensor is the same memory and not such a view."""
    if len(lead) == 1:
        return y2d
    return y2d.view(*lead, y2d.shape[-1]).detach()


def flatten_grad(grad: torch.Tensor | None) -> torch.Tensor | None:
    """An output's gradient (*lead, N) as (tokens, N); None passes through."""
    if grad is None or grad.dim() == 2:
        return grad
    return grad.reshape(-1, grad.shape[-1])


def as_input_grad(dx2d: torch.Tensor | None, shape: torch.Size) -> torch.Tensor | None:
    """The (tokens, features) gradient of x in x's ``shape``; None passes through."""
    if dx2d is None or dx2d.dim() == len(shape):
        return dx2d
    return dx2d.view(shape)
