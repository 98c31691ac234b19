"""Bad input to the 4-bit weight API gets a ValueError / TypeError that names the argument at fault:
workspace sizes, bitsandbytes interop, Linear4bit state dicts with broken quant-state metadata, nested
blocksizes, and the roundtrip command line."""

import dataclasses
import json

import pytest
import torch

import fastlora.__main__
from fastlora import backends, nf4, ops

CPU_BACKENDS = [b for b in ("cpp", "reference") if backends.available("cpu")[b]]
BLOB = "weight.quant_state.bitsandbytes__nf4"


def _quantized(double_quant=True):
    return nf4.quantize(torch.randn(8, 96), 32, "nf4", double_quant)


def _state_dict(double_quant=True, drop=(), **changes):
    """fastlora's own Linear4bit-style state dict, with quant-state keys dropped or changed."""
    sd = _quantized(double_quant).state_dict("weight")
    meta = json.loads(bytes(sd[BLOB].tolist()).decode("utf-8"))
    for key in drop:
        del meta[key]
    meta.update(changes)
    sd[BLOB] = torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
    return sd


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("out_numel", [0, 5, 8 * 96 - 2, 8 * 96 + 1])
def test_dequantize_into_blames_a_wrong_sized_out(backend, out_numel):
    q = _quantized(double_quant=False)
    with pytest.raises(ValueError, match=rf"^out must have {8 * 96 - 1} or {8 * 96} elements.*got {out_numel}$"):
        ops.dequantize_4bit_into(q.packed_bytes(), q.absmax, 32, "nf4", torch.empty(out_numel), backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dequantize_into_blames_packed_when_out_and_absmax_agree(backend):
    q = _quantized(double_quant=False)
    with pytest.raises(ValueError, match=r"^packed must hold"):
        ops.dequantize_4bit_into(q.packed_bytes()[:-20], q.absmax, 32, "nf4", torch.empty(8 * 96), backend=backend)


@pytest.mark.parametrize("bad", [torch.zeros(4, 64), None, {"packed": torch.zeros(4)}])
def test_to_bnb_refuses_what_is_not_a_quantized_weight(bad):
    with pytest.raises(TypeError, match=r"^qweight must be a fastlora\.nf4\.QuantizedWeight.*got "):
        nf4.to_bnb(bad)


def test_to_bnb_refuses_a_non_bool_requires_grad():
    with pytest.raises(TypeError, match=r"^requires_grad must be a bool"):
        nf4.to_bnb(_quantized(), requires_grad="yes")


@pytest.mark.parametrize("double_quant, key", [
    (False, "shape"), (False, "dtype"), (False, "blocksize"), (False, "quant_type"),
    (True, "shape"), (True, "nested_offset"), (True, "nested_blocksize"),
])
def test_from_state_dict_names_a_missing_metadata_key(double_quant, key):
    with pytest.raises(ValueError, match=rf"^state_dict\['{BLOB}'\] \(the quant state\) is missing '{key}'"):
        nf4.from_state_dict(_state_dict(double_quant, drop=(key,)), "weight")


@pytest.mark.parametrize("blob", [
    bytes([0xFF, 0xFE, 0x00, 0x80]),  # not UTF-8
    b'{"quant_type": "nf4", "blocksize": ',  # truncated JSON
    b"",
])
def test_from_state_dict_names_a_garbled_quant_state(blob):
    sd = _state_dict()
    sd[BLOB] = torch.tensor(list(blob), dtype=torch.uint8)
    with pytest.raises(ValueError, match=rf"^state_dict\['{BLOB}'\] must hold bitsandbytes' quant state"):
        nf4.from_state_dict(sd, "weight")


def test_from_state_dict_refuses_quant_state_that_is_not_an_object():
    sd = _state_dict()
    sd[BLOB] = torch.tensor(list(b"[1, 2]"), dtype=torch.uint8)
    with pytest.raises(ValueError, match=rf"^state_dict\['{BLOB}'\] must hold a JSON object, got a JSON list"):
        nf4.from_state_dict(sd, "weight")


@pytest.mark.parametrize("changes, exc, name", [
    (dict(dtype="int8"), ValueError, "'dtype' in"),
    (dict(shape="8x96"), ValueError, "'shape' in"),
    (dict(shape=[8, -96]), ValueError, "'shape' in"),
    (dict(blocksize=100), ValueError, "'blocksize' in"),
    (dict(blocksize="32"), TypeError, "'blocksize' in"),
    (dict(nested_blocksize=100), ValueError, "'nested_blocksize' in"),
    (dict(nested_blocksize=8192), ValueError, "'nested_blocksize' in"),
    (dict(nested_offset="0.5"), ValueError, "'nested_offset' in"),
    (dict(quant_type="int4"), ValueError, "quant_type"),
])
def test_from_state_dict_names_a_bad_metadata_value(changes, exc, name):
    with pytest.raises(exc, match="^" + name):
        nf4.from_state_dict(_state_dict(**changes), "weight")


@pytest.mark.parametrize("key", ["weight", "weight.absmax", "weight.nested_absmax", "weight.quant_map", BLOB])
def test_from_state_dict_names_an_entry_that_is_not_a_tensor(key):
    sd = _state_dict()
    sd[key] = sd[key].tolist()
    with pytest.raises(TypeError, match=rf"^state_dict\['{key}'\] must be a torch\.Tensor, got list"):
        nf4.from_state_dict(sd, "weight")


@pytest.mark.parametrize("state_dict, prefix, name", [
    ([("weight", torch.zeros(4))], "weight", "state_dict"),
    (None, "weight", "state_dict"),
    ({}, 0, "prefix"),
])
def test_from_state_dict_checks_its_argument_types(state_dict, prefix, name):
    with pytest.raises(TypeError, match=f"^{name} must be"):
        nf4.from_state_dict(state_dict, prefix)


@pytest.mark.parametrize("blocksize, exc", [(100, ValueError), (16, ValueError), (8192, ValueError),
                                            (256.0, TypeError)])
def test_nested_blocksize_must_be_a_power_of_two_in_range(blocksize, exc):
    q = _quantized()
    with pytest.raises(exc, match=r"^nested blocksize must be"):
        dataclasses.replace(q.nested, blocksize=blocksize)
    with pytest.raises(exc, match=r"^nested blocksize must be"):
        nf4.NestedStats(absmax2=q.nested.absmax2, code=q.nested.code, offset=q.nested.offset, blocksize=blocksize)


def test_from_bnb_names_a_bad_nested_blocksize():
    pytest.importorskip("bitsandbytes")
    param = nf4.to_bnb(_quantized())
    param.quant_state.state2.blocksize = 100
    with pytest.raises(ValueError, match=r"^quant_state\.state2\.blocksize must be a power of two"):
        nf4.from_bnb(param)


@pytest.mark.parametrize("blocksize", ["100", "16", "8192", "0"])
def test_roundtrip_cli_refuses_a_bad_blocksize(capsys, blocksize):
    with pytest.raises(SystemExit) as exit_info:
        fastlora.__main__.main(["roundtrip", "--blocksize", blocksize])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --blocksize: invalid choice: {blocksize}" in err
    assert "32, 64, 128, 256, 512, 1024, 2048, 4096" in err


def test_roundtrip_cli_accepts_the_largest_blocksize(capsys):
    assert fastlora.__main__.main(["roundtrip", "--blocksize", "4096", "--shape", "2x4096", "--repeats", "1"]) == 0
    assert "blocksize 4096" in capsys.readouterr().out
