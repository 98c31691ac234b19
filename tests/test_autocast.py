"""Patched LoRA layers under ``torch.autocast`` (what the Trainer's bf16=True / fp16=True turn on) compute in the
autocast dtype, fused (no fallback calls), as the PEFT layers they replace do (fastlora/modules/_autocast.py); so do
fastlora's own LoRA layers (``fastlora.patch(model, lora=...)``, fastlora/modules/lora.py); and fp16 training
with ``torch.amp.GradScaler`` on CPU sees inf gradients and skips that step.

Tolerances: the patched model and PEFT both round to the autocast dtype at different points (PEFT: after each
F.linear; fastlora: x·Aᵀ kept in the op's precision), so they are compared with each other at a few units of the
dtype's rounding (bf16 eps 2^-8, fp16 eps 2^-11), and each against the float32 model without autocast: fastlora's
error must not exceed PEFT's by more than half of it plus one eps."""

import copy

import pytest
import torch
import torch.nn.functional as F
from model_zoo import VOCAB, tiny_model, to_4bit

import fastlora
from fastlora.modules import lora as fl_lora

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")

EPS = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _peft_model(base: str, dropout: float = 0.0):
    model = tiny_model("llama")
    if base == "nf4":
        model = to_4bit(model, "nf4")
    if base == "bf16":  # a bf16 model with PEFT's default float32 adapters
        model = model.to(torch.bfloat16)
    torch.manual_seed(1)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=dropout)
    model = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    return model.train()


def _ids():
    return torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))


def _own_lora_model(peft_model, base: str, dropout: float):
    """The model ``_peft_model(base, dropout)`` wraps, with fastlora's own LoRA (``fastlora.patch(lora=...)``,
    no PEFT) holding PEFT's adapter weights; (model, handle)."""
    model = tiny_model("llama")
    if base == "nf4":
        model = to_4bit(model, "nf4")
    config = fastlora.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=dropout)
    handle = fastlora.patch(model, lora=config)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                params[_own_name(name)].copy_(p)
    return model.train(), handle


def _own_name(peft_name: str) -> str:
    return peft_name.removeprefix("base_model.model.").replace(".default.", ".")


def _loss_and_grads(model, ids, dtype):
    torch.manual_seed(77)  # the dropout masks repeat from run to run
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _rel(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


def _worst(got, want):
    return max(_rel(got[n], want[n]) for n in want)


@pytest.mark.parametrize(("base", "dtype"), [("dense", torch.bfloat16), ("dense", torch.float16),
                                             ("nf4", torch.bfloat16), ("nf4", torch.float16),
                                             ("bf16", torch.bfloat16)])
def test_patched_model_under_autocast_matches_peft(base, dtype):
    peft_model = _peft_model(base)
    if base == "bf16":
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.data = p.data.float()
    patched = copy.deepcopy(peft_model)
    handle = fastlora.patch(patched)
    assert "gated MLP" in " ".join(handle.kinds.values()), handle.summary()
    ids = _ids()
    out_dtypes = []
    layer = patched.get_base_model().model.layers[0].self_attn.q_proj
    layer.register_forward_hook(lambda _, __, out: out_dtypes.append(out.dtype))

    exact_loss, exact = _loss_and_grads(_peft_model("dense") if base == "bf16" else peft_model, ids, None)
    want_loss, want = _loss_and_grads(peft_model, ids, dtype)
    got_loss, got = _loss_and_grads(patched, ids, dtype)
    assert handle.report()["fallback_calls"] == {}  # every layer and gated MLP fused under autocast
    assert out_dtypes == [dtype]  # computed in the autocast dtype, as PEFT's layer returns it
    _check_against_peft(got_loss, got, want_loss, want, exact, dtype)


def _check_against_peft(got_loss, got, want_loss, want, exact, dtype):
    """fastlora's autocast loss / grads against PEFT's under autocast and the float32 run without it (see the
    module docstring); every dict is keyed by PEFT's parameter names."""
    assert got.keys() == want.keys() == exact.keys()
    assert all(g.dtype == torch.float32 for g in got.values())  # float32 adapters keep float32 gradients
    eps = EPS[dtype]
    assert abs(got_loss - want_loss).item() < 4 * eps * want_loss.item()
    assert _worst(got, want) < 12 * eps
    peft_err, fast_err = _worst(want, exact), _worst(got, exact)
    assert peft_err > 0.1 * eps  # autocast really took effect
    assert fast_err <= 1.5 * peft_err + eps, (fast_err, peft_err)


@pytest.mark.parametrize(("base", "dtype", "dropout", "checkpointing"), [
    ("dense", torch.bfloat16, 0.0, False), ("dense", torch.bfloat16, 0.1, True), ("dense", torch.float16, 0.0, False),
    ("dense", torch.float16, 0.1, False), ("nf4", torch.bfloat16, 0.0, False), ("nf4", torch.bfloat16, 0.1, False),
    ("nf4", torch.float16, 0.0, False)])
def test_own_lora_model_under_autocast_matches_peft(base, dtype, dropout, checkpointing):
    """``fastlora.patch(model, lora=...)`` (fastlora's own LoRA, no PEFT) under autocast: every layer and gated
    MLP fused; bit-identical to the PEFT model with the same adapters patched by fastlora (the same fused ops on
    the same tensors; with dropout the same Philox masks from the same seed), and at dropout 0 as close to PEFT's
    own layers and to the float32 run as those (test_patched_model_under_autocast_matches_peft)."""
    peft_model = _peft_model(base, dropout)
    own, handle = _own_lora_model(peft_model, base, dropout)
    assert "gated MLP" in " ".join(handle.kinds.values()), handle.summary()
    fused_peft = copy.deepcopy(peft_model)
    fastlora.patch(fused_peft)
    out_dtypes = []
    own.model.layers[0].self_attn.q_proj.register_forward_hook(lambda _, __, out: out_dtypes.append(out.dtype))
    ids = _ids()
    if checkpointing:
        plain_loss, plain = _loss_and_grads(own, ids, dtype)
        own.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    got_loss, got = _loss_and_grads(own, ids, dtype)
    got = {name: got[_own_name(name)] for name, p in fused_peft.named_parameters() if p.requires_grad}
    twin_loss, twin = _loss_and_grads(fused_peft, ids, dtype)
    assert handle.report()["fallback_calls"] == {}  # every layer and gated MLP fused under autocast
    assert out_dtypes[-1] == dtype and got_loss.dtype == torch.float32
    assert torch.equal(got_loss, twin_loss)
    assert all(torch.equal(got[name], twin[name]) for name in twin)
    if checkpointing:  # the recomputed forward runs under the same autocast state and dropout masks
        assert torch.equal(plain_loss, got_loss)
        assert all(torch.equal(plain[_own_name(name)], got[name]) for name in got)
    if dropout > 0.0:  # the masks are active: the gradients differ from the dropout-free eval-mode ones
        _, no_dropout = _loss_and_grads(own.eval(), ids, dtype)
        worst = max(_rel(got[name], no_dropout[_own_name(name)]) for name in got)
        assert worst > 0.2, worst
        return
    exact_loss, exact = _loss_and_grads(peft_model, ids, None)
    want_loss, want = _loss_and_grads(peft_model, ids, dtype)
    _check_against_peft(got_loss, got, want_loss, want, exact, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_own_lora_layer_under_autocast(dtype):
    """fastlora's own LoRA (attach_lora, lora.py) on an nn.Linear: autocast formula F.linear(x, W, b) +
    s·B(A(x)), each F.linear in the autocast dtype; odd shapes; fused (no fallback call)."""
    torch.manual_seed(4)
    layer = torch.nn.Linear(37, 23)
    layer.requires_grad_(False)
    fl_lora.attach_lora(layer, r=5, lora_alpha=10)
    torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
    x = torch.randn(3, 7, 37, requires_grad=True)
    with torch.autocast("cpu", dtype=dtype):
        y = layer(x)
        a, b = layer.lora_A.weight, layer.lora_B.weight
        want = F.linear(x, layer.weight, layer.bias) + F.linear(F.linear(x, a), b) * 2.0
    assert fl_lora.fallback_calls(layer) == 0 and y.dtype == dtype and want.dtype == dtype
    g = torch.randn(3, 7, 23, dtype=dtype)
    got_grads = torch.autograd.grad(y, (x, a, b), g)
    want_grads = torch.autograd.grad(want, (x, a, b), g)
    eps = EPS[dtype]
    assert _rel(y.float(), want.float()) < 4 * eps
    for got_g, want_g in zip(got_grads, want_grads, strict=True):
        assert got_g.dtype == want_g.dtype
        assert _rel(got_g.float(), want_g.float()) < 8 * eps
    # autocast leaves a float64 x alone: PEFT's formula runs (counted) and F.linear raises, as unpatched
    with torch.autocast("cpu", dtype=dtype), pytest.raises(RuntimeError):
        layer(x.double())
    assert fl_lora.fallback_calls(layer) == 1


def test_float64_input_under_autocast_falls_back():
    """Autocast leaves float64 alone; the fused op would need a float64 weight: PEFT's forward runs."""
    model = _peft_model("dense")
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    x = torch.randn(2, 64, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError) as unpatched:
        layer(x)  # F.linear: x stays float64, the weight is cast to bf16
    handle = fastlora.patch(model)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError) as patched:
        layer(x)
    assert str(patched.value) == str(unpatched.value)
    assert sum(handle.report()["fallback_calls"].values()) == 1


def test_fp16_grad_scaler_detects_inf_and_skips_the_step():
    model = _peft_model("nf4")
    fastlora.patch(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    ids = _ids()
    # 2^40 overflows the float16 gradients inside the fused ops' backward: inf must reach the adapters' grads
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    before = [p.detach().clone() for p in params]

    def step():
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(input_ids=ids, labels=ids).loss
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        finite = all(torch.isfinite(p.grad).all() for p in params)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return finite

    assert not step()
    assert all(torch.equal(p, q) for p, q in zip(params, before, strict=True))  # step skipped
    assert scaler.get_scale() == 2.0**39
    scaler.update(2.0**10)
    assert step()
    assert any(not torch.equal(p, q) for p, q in zip(params, before, strict=True))
