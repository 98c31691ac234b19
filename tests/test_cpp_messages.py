"""The C++ argument checks build their messages with fastlora::message (csrc/include/fastlora/message.h:
numbers as text without iostreams). The text must read exactly as c10::str would print it: integers,
shapes as "[2, 3, 4]", doubles as %g, dtypes and devices by libtorch."""

import pytest
import torch

import fastlora  # noqa: F401  (loads the extension's ops)
from fastlora import backends

pytestmark = pytest.mark.skipif(not backends.available("cpu")["cpp"], reason="needs the compiled extension")
op = torch.ops.fastlora


def _message(fn) -> str:
    with pytest.raises((ValueError, TypeError)) as info:
        fn()
    return str(info.value).splitlines()[0]


def _lora_args(**change):
    args = dict(x=torch.randn(3, 4), weight=torch.randn(5, 4), absmax=None, blocksize=64, quant_type="nf4",
                out_features=5, lora_A=torch.randn(2, 4), lora_B=torch.randn(5, 2), scaling=1.0, bias=None,
                dropout_p=0.0, seed=torch.tensor(1), rounding="linear")
    args.update(change)
    return list(args.values())


def test_integers():
    packed, absmax = torch.zeros(4, dtype=torch.uint8), torch.ones(1)
    assert _message(lambda: op.dequantize_4bit(packed, absmax, 64, "nf4", 9, torch.float32)) == (
        "packed must hold ceil(numel/2) = 5 bytes for numel=9, got 4")
    assert _message(lambda: op.dequantize_4bit(packed, absmax, 48, "nf4", 8, torch.float32)) == (
        "blocksize must be a power of two in [32, 4096], got 48")
    assert _message(lambda: op.lora_linear_fwd(*_lora_args(seed=torch.tensor(-7)))) == (
        "seed must be in [0, 2^63), got -7")


def test_shapes():
    assert _message(lambda: op.lora_linear_fwd(*_lora_args(x=torch.randn(2, 3, 4)))) == (
        "x must be 2-D (M, in_features), got shape [2, 3, 4]")
    assert "got shape [5, 3]" in _message(lambda: op.lora_linear_fwd(*_lora_args(lora_B=torch.randn(5, 3))))


def test_doubles_dtypes_and_strings():
    assert _message(lambda: op.lora_linear_fwd(*_lora_args(dropout_p=1.5))) == "dropout_p must be in [0, 1), got 1.5"
    assert _message(lambda: op.lora_linear_fwd(*_lora_args(dropout_p=-0.000123456789))).endswith("got -0.000123457")
    assert _message(lambda: op.dequantize_4bit(torch.zeros(4, dtype=torch.uint8), torch.ones(1), 64, "nf5", 8,
                                               torch.float32)) == "quant_type must be 'nf4' or 'fp4', got 'nf5'"
    assert _message(lambda: op.dequantize_4bit(torch.zeros(4, dtype=torch.uint8), torch.ones(1, dtype=torch.float64),
                                               64, "nf4", 8, torch.float32)) == "absmax must be float32, got Double"
