"""Moving 4-bit weights between fastlora and bitsandbytes: views, Params4bit, Linear4bit state dicts."""

import pytest
import torch

from fastlora import nf4

bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")


def _linear4bit(seed, in_features=128, out_features=80, quant_type="nf4", double_quant=True, dtype=torch.bfloat16):
    torch.manual_seed(seed)
    dense = torch.nn.Linear(in_features, out_features, bias=True, dtype=dtype)
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=True, compute_dtype=dtype,
                              compress_statistics=double_quant, quant_type=quant_type)
    layer.load_state_dict(dense.state_dict())
    layer = layer.to("cpu")  # quantizes
    if layer.weight.quant_state is None:
        layer.weight = bnb.nn.Params4bit(dense.weight.data, requires_grad=False, quant_type=quant_type,
                                         compress_statistics=double_quant)._quantize("cpu")
    return dense, layer


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_from_bnb_is_a_view_and_decodes_identically(seed, quant_type, double_quant):
    _, layer = _linear4bit(seed, quant_type=quant_type, double_quant=double_quant)
    q = nf4.from_bnb(layer.weight)
    assert q.packed.data_ptr() == layer.weight.data.data_ptr()
    assert q.absmax.data_ptr() == layer.weight.quant_state.absmax.data_ptr()
    assert q.shape == (80, 128) and q.quant_type == quant_type and q.double_quant == double_quant
    want = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert torch.equal(nf4.dequantize(q), want)  # rows of 128: bnb's native kernel is right here


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_to_bnb_round_trip(seed, quant_type, double_quant):
    w = torch.randn(128, 64, dtype=torch.bfloat16)
    q = nf4.quantize(w, 64, quant_type, double_quant)
    param = nf4.to_bnb(q)
    assert isinstance(param, bnb.nn.Params4bit)
    assert torch.equal(F.dequantize_4bit(param.data, param.quant_state), nf4.dequantize(q))
    back = nf4.from_bnb(param)
    assert torch.equal(back.packed, q.packed) and torch.equal(nf4.dequantize(back), nf4.dequantize(q))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_linear4bit_state_dict_loads(seed, quant_type, double_quant):
    _, layer = _linear4bit(seed, quant_type=quant_type, double_quant=double_quant)
    sd = layer.state_dict()
    expected_keys = {"weight", "bias", "weight.absmax", "weight.quant_map",
                     f"weight.quant_state.bitsandbytes__{quant_type}"}
    if double_quant:
        expected_keys |= {"weight.nested_absmax", "weight.nested_quant_map"}
    assert set(sd) == expected_keys
    q = nf4.from_state_dict(sd, "weight")
    assert torch.equal(nf4.dequantize(q), F.dequantize_4bit(layer.weight.data, layer.weight.quant_state))
    # ... and fastlora's own state dict has the same keys and loads back into bitsandbytes.
    ours = q.state_dict("weight")
    assert set(ours) == expected_keys - {"bias"}
    # (the path transformers takes when it loads a pre-quantized checkpoint)
    stats = {k: v for k, v in ours.items() if k != "weight"}
    param = bnb.nn.Params4bit.from_prequantized(ours["weight"], stats, device="cpu")
    assert torch.equal(F.dequantize_4bit(param.data, param.quant_state), nf4.dequantize(q))


def test_cpu_repacked_weight_is_refused(seed):
    _, layer = _linear4bit(seed)
    layer.weight.quant_state.packing_format_for_cpu = True
    with pytest.raises(ValueError, match="packing_format_for_cpu"):
        nf4.from_bnb(layer.weight)


def test_mismatched_statistics_are_refused(seed):
    _, layer = _linear4bit(seed, double_quant=False)
    sd = layer.state_dict()
    sd["weight.absmax"] = sd["weight.absmax"][:-1]
    with pytest.raises(ValueError, match="absmax"):
        nf4.from_state_dict(sd, "weight")
    with pytest.raises(ValueError, match="missing"):
        nf4.from_state_dict({k: v for k, v in layer.state_dict().items() if k != "weight.absmax"}, "weight")
    with pytest.raises(ValueError, match="quant_state"):
        nf4.from_bnb(torch.nn.Parameter(torch.zeros(3), requires_grad=False))


def test_from_bnb_does_not_modify_the_weight(seed):
    _, layer = _linear4bit(seed)
    before = layer.weight.data.clone()
    nf4.dequantize(nf4.from_bnb(layer.weight))
    assert torch.equal(layer.weight.data, before)
