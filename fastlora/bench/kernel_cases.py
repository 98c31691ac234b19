"""The kernels suite's per-op builders (:mod:`fastlora.bench.kernels` lists them in its ``CASES`` table).

A builder ``<op>_cases(tokens, k, n, dtype, device, providers)`` makes one (op, dtype)'s inputs once and yields
``(pass, provider, fn, setup)`` per timed case: the fastlora providers and the torch reference (``providers``,
in order) pass by pass, then the peer last. ``fn(setup())`` (or ``fn()`` without setup) is one timed call. The
peer's library is imported where its case is built: an ImportError there leaves the peer out
(:func:`fastlora.bench.kernels.build`). The ops and their peers are in :mod:`fastlora.bench.kernels`'s docstring.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from . import lora_setup as ls

NEFTUNE_ALPHA = 5.0


@dataclasses.dataclass
class Provider:
    name: str
    role: str
    backend: str | None  # fastlora backend; None for the peer and for an op without backends (frozen_linear)


def _passes(forward, dy, leaves):
    """(pass, fn, setup) for a forward with autograd: fwd, bwd (forward untimed in setup), full. ``forward`` may
    return a tuple of outputs, ``dy`` is then the tuple of their gradients."""
    def reset():
        for t in leaves:
            t.grad = None

    def fwd_setup():
        reset()
        return forward()

    yield "fwd", (lambda: forward()), None
    yield "bwd", (lambda y: torch.autograd.backward(y, dy)), fwd_setup
    yield "full", (lambda: (reset(), torch.autograd.backward(forward(), dy))), None


def _of(provider: Provider, passes):
    """``passes`` ((pass, fn, setup)) as the builders yield them, for ``provider``."""
    for name, fn, setup in passes:
        yield name, provider, fn, setup


def dequantize_cases(tokens, k, n, dtype, device, providers):
    from fastlora import nf4

    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g) * 0.02
    q = nf4.quantize(w, 64, "nf4", True).to(device)
    for p in providers:
        yield "fwd", p, (lambda b=p.backend: nf4.dequantize(q, dtype, backend=b)), None
    import bitsandbytes.functional as bnbF

    packed, state = bnbF.quantize_4bit(w.to(dtype).to(device), blocksize=64, quant_type="nf4",
                                       compress_statistics=True)
    yield "fwd", Provider("bitsandbytes", "peer", None), (lambda: bnbF.dequantize_4bit(packed, state)), None


def lora_linear_cases(tokens, k, n, dtype, device, providers):
    from fastlora.ops import lora_linear

    prob = ls.make_problem(tokens, k, n)
    x0, dy = (t.to(device) for t in prob.inputs(dtype))
    q = prob.qweight.to(device)
    for p in providers:
        x, a, b = (t.to(device).detach().requires_grad_(True) for t in (x0, prob.lora_A, prob.lora_B))

        def forward(x=x, a=a, b=b, backend=p.backend):
            return lora_linear(x, q, a, b, ls.SCALING, dropout_p=0.0, training=True, backend=backend)

        yield from _of(p, _passes(forward, dy, [x, a, b]))
    layer = ls.peft_layer(prob, dtype).to(device)
    x = x0.detach().requires_grad_(True)
    leaves = [x, *(t for t in layer.parameters() if t.requires_grad)]
    yield from _of(Provider("peft", "peer", None), _passes(lambda: layer(x), dy, leaves))


def _hf_neftune_hook():
    from transformers.integrations.neftune import neftune_post_forward_hook

    return neftune_post_forward_hook


def neftune_cases(tokens, k, n, dtype, device, providers):
    from fastlora.ops import neftune_embedding

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(n, k, generator=g).to(dtype).to(device)
    ids = torch.randint(0, n, (1, tokens), generator=g).to(device)
    for p in providers:
        yield "fwd", p, (lambda b=p.backend: neftune_embedding(ids, weight, NEFTUNE_ALPHA, backend=b)), None
    hook = _hf_neftune_hook()
    module = torch.nn.Module()  # the hook reads module.training and module.neftune_noise_alpha
    module.neftune_noise_alpha = NEFTUNE_ALPHA
    yield "fwd", Provider("transformers", "peer", None), (lambda: hook(module, (ids,), F.embedding(ids, weight))), None


def gated_mlp_cases(tokens, k, n, dtype, device, providers):
    from fastlora.ops.lora_gated_mlp import lora_gated_mlp
    from fastlora.ops.lora_projection import LoraProjection

    probs = {"gate": ls.make_problem(tokens, k, n, seed=1), "up": ls.make_problem(tokens, k, n, seed=2),
             "down": ls.make_problem(tokens, n, k, seed=3)}
    g = torch.Generator().manual_seed(7)
    x0 = torch.randn(tokens, k, generator=g).to(dtype).to(device)
    dy = (torch.randn(tokens, k, generator=g) * 0.01).to(dtype).to(device)
    for p in providers:
        x = x0.detach().requires_grad_(True)
        adapters = {name: [t.to(device).detach().requires_grad_(True) for t in (pr.lora_A, pr.lora_B)]
                    for name, pr in probs.items()}
        projs = {name: LoraProjection(pr.qweight.to(device), *adapters[name], ls.SCALING) for name, pr in probs.items()}

        def forward(x=x, projs=projs, backend=p.backend):
            return lora_gated_mlp(x, projs["gate"], projs["up"], projs["down"], backend=backend)

        leaves = [x, *(t for pair in adapters.values() for t in pair)]
        yield from _of(p, _passes(forward, dy, leaves))
    layers = {name: ls.peft_layer(pr, dtype).to(device) for name, pr in probs.items()}
    x = x0.detach().requires_grad_(True)
    leaves = [x, *(t for layer in layers.values() for t in layer.parameters() if t.requires_grad)]

    def peft_forward():
        return layers["down"](F.silu(layers["gate"](x)) * layers["up"](x))

    yield from _of(Provider("peft", "peer", None), _passes(peft_forward, dy, leaves))


def lora_qkv_cases(tokens, k, n, dtype, device, providers):
    """Attention's q, k, v of hidden size K (Llama-style GQA, :func:`fastlora.bench.lora_setup.qkv_out_features`:
    q K -> K, k and v K -> K/4; N is not used), QLoRA on all three, gradients of all three outputs."""
    from fastlora.ops import LoraProjection, lora_qkv

    outs = ls.qkv_out_features(k)
    probs = [ls.make_problem(tokens, k, out, seed=i) for i, out in enumerate(outs, 1)]
    g = torch.Generator().manual_seed(7)
    x0 = torch.randn(tokens, k, generator=g).to(dtype).to(device)
    dys = tuple((torch.randn(tokens, out, generator=g) * 0.01).to(dtype).to(device) for out in outs)
    for p in providers:
        x = x0.detach().requires_grad_(True)
        adapters = [[t.to(device).detach().requires_grad_(True) for t in (pr.lora_A, pr.lora_B)] for pr in probs]
        projs = [LoraProjection(pr.qweight.to(device), a, b, ls.SCALING)
                 for pr, (a, b) in zip(probs, adapters, strict=True)]

        def forward(x=x, projs=projs, backend=p.backend):
            return lora_qkv(x, projs, training=True, backend=backend)

        yield from _of(p, _passes(forward, dys, [x, *(t for pair in adapters for t in pair)]))
    layers = [ls.peft_layer(pr, dtype).to(device) for pr in probs]  # q_proj, k_proj, v_proj, called one by one
    x = x0.detach().requires_grad_(True)
    leaves = [x, *(t for layer in layers for t in layer.parameters() if t.requires_grad)]
    yield from _of(Provider("peft", "peer", None), _passes(lambda: tuple(layer(x) for layer in layers), dys, leaves))


def linear_4bit_cases(tokens, k, n, dtype, device, providers):
    """A frozen 4-bit K -> N linear without adapter (no bias): the backward is dx alone."""
    from fastlora.ops import linear_4bit

    prob = ls.make_problem(tokens, k, n)
    x0, dy = (t.to(device) for t in prob.inputs(dtype))
    q = prob.qweight.to(device)
    for p in providers:
        x = x0.detach().requires_grad_(True)
        yield from _of(p, _passes(lambda x=x, backend=p.backend: linear_4bit(x, q, backend=backend), dy, [x]))
    base = ls.bnb_layer(prob, dtype).to(device)
    x = x0.detach().requires_grad_(True)
    yield from _of(Provider("bitsandbytes", "peer", None), _passes(lambda: base(x), dy, [x]))


def dora_linear_cases(tokens, k, n, dtype, device, providers):
    """A QLoRA projection with DoRA's magnitude (the adapters and weight of lora_linear's case); gradients of x,
    lora_A, lora_B and the magnitude."""
    from fastlora.ops import dora_linear

    prob = ls.make_problem(tokens, k, n)
    x0, dy = (t.to(device) for t in prob.inputs(dtype))
    q = prob.qweight.to(device)
    magnitude = ls.dora_magnitude(prob)
    for p in providers:
        x, a, b, m = (t.to(device).detach().requires_grad_(True) for t in (x0, prob.lora_A, prob.lora_B, magnitude))

        def forward(x=x, a=a, b=b, m=m, backend=p.backend):
            return dora_linear(x, q, a, b, ls.SCALING, m, backend=backend)

        yield from _of(p, _passes(forward, dy, [x, a, b, m]))
    layer = ls.peft_layer(prob, dtype, use_dora=True).to(device)
    x = x0.detach().requires_grad_(True)
    leaves = [x, *(t for t in layer.parameters() if t.requires_grad)]
    yield from _of(Provider("peft", "peer", None), _passes(lambda: layer(x), dy, leaves))


def frozen_linear_cases(tokens, k, n, dtype, device, providers):
    """A frozen bf16 K -> N dense linear on the CPU (no bias; the backward is dx alone). fastlora: the op's fp32
    GEMMs over blocks of W's rows (one provider: it has no backends); reference: the same math in plain torch, the
    whole weight widened at once; peer: torch's bf16 ``F.linear``, the call it replaces. fastlora patches it in
    only where torch's bf16 GEMMs are slow (``fastlora.ops.frozen_linear.torch_bf16_gemms_slow``)."""
    from fastlora.ops import frozen_linear

    g = torch.Generator().manual_seed(0)
    w = (torch.randn(n, k, generator=g) * 0.02).to(dtype).to(device)
    x0 = torch.randn(tokens, k, generator=g).to(dtype).to(device)
    dy = (torch.randn(tokens, n, generator=g) * 0.01).to(dtype).to(device)
    calls = {"fastlora": lambda x: frozen_linear(x, w),
             "reference": lambda x: F.linear(x.float(), w.float()).to(dtype)}
    for p in providers:
        x = x0.detach().requires_grad_(True)
        yield from _of(p, _passes(lambda x=x, call=calls[p.role]: call(x), dy, [x]))
    x = x0.detach().requires_grad_(True)
    yield from _of(Provider("torch", "peer", None), _passes(lambda: F.linear(x, w), dy, [x]))
