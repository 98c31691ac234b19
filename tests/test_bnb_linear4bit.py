"""fastlora.modules.bnb_linear4bit: an existing bitsandbytes Linear4bit accelerated without LoRA gives
bitsandbytes' outputs and gradients (x and a trainable bias), hands non-plain calls to bitsandbytes
(counted), refuses layers it cannot take with the reason, and restores exactly."""

import copy
import math

import pytest
import torch

from fastlora import nf4
from fastlora.modules import bnb_linear4bit as accel

bnb = pytest.importorskip("bitsandbytes")


def _layer(quant_type="nf4", double_quant=True, dtype=torch.float32, compute_dtype=torch.float32, n=128, k=192,
           bias=True):
    w = torch.randn(n, k) / math.sqrt(k)
    q = nf4.quantize(w, 64, quant_type, double_quant)
    layer = bnb.nn.Linear4bit(k, n, bias=bias, compute_dtype=compute_dtype, quant_type=quant_type,
                              compress_statistics=double_quant)
    layer.weight = nf4.to_bnb(q)
    if bias:
        layer.bias = torch.nn.Parameter(torch.randn(n).to(dtype))  # trainable: BitFit
    return layer.train()  # bitsandbytes' AVX512-BF16 CPU repacking happens only in eval without grad


def _step(layer, x, grad_y):
    x = x.detach().requires_grad_()
    y = layer(x)
    y.backward(grad_y)
    out = (y.detach(), x.grad, None if layer.bias is None else layer.bias.grad.clone())
    layer.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("compute_dtype", ["same", None], ids=["compute=x", "compute=None"])
def test_matches_bitsandbytes(seed, quant_type, double_quant, dtype, compute_dtype):
    layer = _layer(quant_type, double_quant, dtype, dtype if compute_dtype == "same" else None)
    x = torch.randn(2, 7, 192).to(dtype)
    grad_y = torch.randn(2, 7, 128).to(dtype)
    want = _step(copy.deepcopy(layer), x, grad_y)
    accel.accelerate(layer)
    got = _step(layer, x, grad_y)
    assert accel.fallback_calls(layer) == 0
    assert layer.compute_dtype == dtype  # set from x on the first call, as bitsandbytes does
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # dbias: fastlora sums in fp32, bitsandbytes in the bias dtype in two stages (3-D x): a unit
    # roundoff of the bias dtype per stage, relative to the sum of |grad_y|.
    u = 2 ** -24 if dtype == torch.float32 else 2 ** -8
    bound = 2 * u * (want[2].double().abs() + grad_y.double().abs().sum((0, 1))) + 1e-6
    assert ((got[2].double() - want[2].double()).abs() <= bound).all()


def test_non_plain_calls_fall_back(seed):
    layer = _layer(compute_dtype=torch.float32)
    reference = copy.deepcopy(layer)
    accel.accelerate(layer)
    x16 = torch.randn(3, 192, dtype=torch.bfloat16)
    # compute_dtype fp32 with bf16 x: bitsandbytes casts x and the output; its own forward runs
    assert torch.equal(layer(x16), reference(x16))
    assert accel.fallback_calls(layer) == 1
    x = torch.randn(3, 192)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(layer(x), reference(x))
    assert accel.fallback_calls(layer) == 2
    layer.bias.data = layer.bias.data.double()  # bias dtype differs: bitsandbytes overwrites bias.data
    layer(torch.randn(3, 192))
    assert accel.fallback_calls(layer) == 3 and layer.bias.dtype == torch.float32
    x = torch.randn(3, 192)
    assert torch.equal(layer(x), reference(x)) and accel.fallback_calls(layer) == 3


def test_eval_without_grad_does_not_repack(seed):
    """bitsandbytes repacks the weight in place on AVX512-BF16 CPUs in eval mode; the accelerated
    forward never touches the weight and computes in x's dtype."""
    layer = _layer()
    data = layer.weight.data.clone()
    accel.accelerate(layer)
    layer.eval()
    x = torch.randn(4, 192)
    with torch.no_grad():
        y = layer(x)
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    assert torch.equal(layer.weight.data, data)
    with torch.no_grad():
        ref = copy.deepcopy(layer)
        accel.restore(ref)
        ref.support_avx512bf16_for_cpu = False  # bitsandbytes' plain path
        assert torch.equal(y, ref(x))


def test_can_accelerate_reasons(seed):
    assert "not a bitsandbytes Linear4bit" in accel.can_accelerate(torch.nn.Linear(4, 4))
    layer = _layer()
    assert accel.can_accelerate(layer) is None
    hooked = copy.deepcopy(layer)
    hooked.forward = lambda x: x
    assert "forward already overridden" in accel.can_accelerate(hooked)
    repacked = copy.deepcopy(layer)
    repacked.weight.quant_state.packing_format_for_cpu = True
    assert "packing_format_for_cpu" in accel.can_accelerate(repacked)
    unquantized = bnb.nn.Linear4bit(64, 64)
    assert "no quant_state" in accel.can_accelerate(unquantized)
    accel.accelerate(layer)
    assert "already patched" in accel.can_accelerate(layer)
    with pytest.raises(ValueError, match="already patched"):
        accel.accelerate(layer)
    with pytest.raises(ValueError, match="backend must be"):
        accel.accelerate(_layer(), backend="fast")
    with pytest.raises(ValueError, match="not accelerated"):
        accel.fallback_calls(_layer())


def test_trainable_weight_is_refused(seed):
    # a uint8 Params4bit cannot require grad; one with a float quant_storage can
    w = torch.randn(64, 128)
    q = nf4.quantize(w, 64, "nf4", False, quant_storage=torch.float32)
    float_layer = bnb.nn.Linear4bit(128, 64, compute_dtype=torch.float32, quant_type="nf4",
                                    compress_statistics=False, quant_storage=torch.float32)
    float_layer.weight = nf4.to_bnb(q, requires_grad=True)
    assert "trainable" in accel.can_accelerate(float_layer)


def test_restore_and_deepcopy(seed):
    layer = _layer(bias=False)
    keys = set(layer.__dict__)
    accel.accelerate(layer, backend="reference")
    assert "fastlora(backend='reference')" in repr(layer)
    twin = copy.deepcopy(layer)
    assert twin.forward.__self__ is twin and accel.is_accelerated(twin)
    x = torch.randn(5, 192)
    assert torch.equal(twin(x), layer(x))
    assert accel.restore(layer) and not accel.restore(layer)
    assert set(layer.__dict__) == keys and "fastlora" not in repr(layer)
    assert accel.fallback_calls(twin) == 0


def test_weights_replaced_after_accelerating_are_followed(seed):
    """The accelerated layer keeps a view of its weight between calls; a new Params4bit, or new packed data and
    quant state on the same one, is what the next call computes with, as bitsandbytes' own forward does."""
    layer = _layer()
    accel.accelerate(layer)
    x, grad_y = torch.randn(3, 192), torch.randn(3, 128)
    _step(layer, x, grad_y)  # the view is built
    for replace_object in (True, False):
        new = nf4.to_bnb(nf4.quantize(torch.randn(128, 192) / math.sqrt(192), 64, "nf4", True))
        if replace_object:
            layer.weight = new
        else:
            layer.weight.data, layer.weight.quant_state = new.data, new.quant_state
        twin = copy.deepcopy(layer)
        assert accel.restore(twin)
        want = _step(twin, x, grad_y)  # bitsandbytes' own forward on the new weight
        got = _step(layer, x, grad_y)  # the accelerated layer, its view built before the replacement
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert accel.fallback_calls(layer) == 0
