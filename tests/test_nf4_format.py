"""fastlora.nf4 against bitsandbytes: bytes and statistics of quantize, bits of dequantize.

Parity targets (bitsandbytes 0.50 on the CPU):
* quantize: packed bytes, absmax (fp32, or uint8 codes + absmax2 + offset + code when nested)
  identical to ``bitsandbytes.functional.quantize_4bit``.
* dequantize: identical to bitsandbytes' reference kernel (``_dequantize_4bit_compute``, the
  "default" backend) for every case, and to ``bitsandbytes.functional.dequantize_4bit`` (its
  native CPU kernel) where that kernel is correct: its blocks go wrong when a row's length is not
  a multiple of the blocksize (blocksize < 2048), where it disagrees with its own reference.
  Values are compared with torch.equal (exact; +0 and -0 compare equal: FP4 code 8 decodes to -0
  in bitsandbytes' native kernels and to +0 in its torch reference).
"""

import pytest
import torch

from fastlora import nf4

BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
SHAPES = [(37, 72), (3, 4096 + 64), (1, 1), (5, 33), (129, 130)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _bnb_quantize(F, w, blocksize, quant_type, double_quant, quant_storage=torch.uint8):
    return F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant,
                           quant_storage=quant_storage)


def _params4bit(packed, state):
    import bitsandbytes as bnb

    return bnb.nn.Params4bit(data=packed, requires_grad=False, quant_state=state, blocksize=state.blocksize,
                             compress_statistics=state.nested, quant_type=state.quant_type,
                             quant_storage=packed.dtype, bnb_quantized=True)


def _bnb_reference_dequant(F, packed, state, dtype):
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    absmax = state.absmax
    if state.nested:
        absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    code = F.get_4bit_type(state.quant_type, device="cpu")
    return _dequantize_4bit_compute(packed.view(torch.uint8).reshape(-1), absmax, code, state.blocksize,
                                    state.shape, dtype)


def _assert_nested_codes_match(q, ref_state, w):
    """The uint8 codes of the nested statistics equal bitsandbytes' except where bitsandbytes' CPU
    8-bit quantizer misses the nearest code: its decision points sit up to ~2e-5 away from the true
    midpoints between code entries (measured on 0.50.2). fastlora always takes the nearest entry
    (ties to the lower one); where the two differ, the value lies within 3e-5 of a midpoint, they
    differ by one step, and fastlora's entry is the nearer one."""
    ours, theirs = q.absmax.long(), ref_state.absmax.long()
    diff = (ours != theirs).nonzero().flatten()
    assert diff.numel() <= max(2, ours.numel() // 20)
    if diff.numel() == 0:
        return
    n = q.nested
    centred = nf4.quantize(w, q.blocksize, q.quant_type, False).absmax - n.offset
    normed = centred / n.absmax2.repeat_interleave(n.blocksize)[: centred.numel()]
    code = n.code
    x = normed[diff]
    assert bool(((ours[diff] - theirs[diff]).abs() == 1).all())
    assert bool(((x - code[ours[diff]]).abs() <= (x - code[theirs[diff]]).abs()).all())
    mid = (code[ours[diff]] + code[theirs[diff]]) / 2
    assert bool(((x - mid).abs() < 3e-5).all())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_quantize_matches_bitsandbytes(seed, quant_type, blocksize, double_quant):
    F = pytest.importorskip("bitsandbytes.functional")
    for shape in SHAPES:
        for dtype in DTYPES:
            w = (torch.randn(shape) * torch.rand(()) * 0.2).to(dtype)
            ref_packed, ref_state = _bnb_quantize(F, w, blocksize, quant_type, double_quant)
            q = nf4.quantize(w, blocksize, quant_type, double_quant)
            assert q.shape == ref_state.shape and q.dtype == dtype
            assert torch.equal(q.packed, ref_packed), (shape, dtype)
            assert torch.equal(q.code, ref_state.code)
            if double_quant:
                _assert_nested_codes_match(q, ref_state, w)
                assert torch.equal(q.nested.absmax2, ref_state.state2.absmax)
                assert torch.equal(q.nested.code, ref_state.state2.code)
                assert q.nested.offset.dtype == torch.float32
                assert torch.equal(q.nested.offset, ref_state.offset)
                assert q.nested.blocksize == ref_state.state2.blocksize
            else:
                assert torch.equal(q.absmax, ref_state.absmax), (shape, dtype)
                assert q.nested is None


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_bit_exact(seed, backend, quant_type, blocksize, double_quant):
    F = pytest.importorskip("bitsandbytes.functional")
    for shape in SHAPES:
        w = torch.randn(shape) * 0.05
        ref_packed, ref_state = _bnb_quantize(F, w, blocksize, quant_type, double_quant)
        q = nf4.from_bnb(_params4bit(ref_packed, ref_state))
        for dtype in DTYPES:
            ours = nf4.dequantize(q, dtype, backend=backend)
            assert ours.shape == w.shape and ours.dtype == dtype
            assert torch.equal(ours, _bnb_reference_dequant(F, ref_packed, ref_state, dtype)), (shape, dtype)
            if shape[-1] % blocksize == 0 or blocksize >= 2048:
                ref_state.dtype = dtype
                assert torch.equal(ours, F.dequantize_4bit(ref_packed, ref_state)), (shape, dtype)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quant_storage_bf16(seed, quant_type):
    F = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(96, 80, dtype=torch.bfloat16)
    ref_packed, ref_state = _bnb_quantize(F, w, 64, quant_type, True, quant_storage=torch.bfloat16)
    q = nf4.quantize(w, 64, quant_type, True, quant_storage=torch.bfloat16)
    assert q.packed.dtype == torch.bfloat16 and q.packed.shape == ref_packed.shape
    assert torch.equal(q.packed.view(torch.uint8), ref_packed.view(torch.uint8))
    viewed = nf4.from_bnb(_params4bit(ref_packed, ref_state))
    assert viewed.packed.data_ptr() == ref_packed.data_ptr()  # a view, not a copy
    assert torch.equal(nf4.dequantize(viewed), _bnb_reference_dequant(F, ref_packed, ref_state, torch.bfloat16))



def test_cpp_and_reference_agree_on_large_weight(seed):
    w = torch.randn(1024, 4096 + 96) * 0.02
    q_cpp = nf4.quantize(w, backend="cpp")
    q_ref = nf4.quantize(w, backend="reference")
    assert torch.equal(q_cpp.packed, q_ref.packed) and torch.equal(q_cpp.absmax, q_ref.absmax)
    assert torch.equal(q_cpp.nested.absmax2, q_ref.nested.absmax2)
    for dtype in DTYPES:
        want = nf4.dequantize(q_ref, dtype, backend="reference")
        assert torch.equal(nf4.dequantize(q_cpp, dtype, backend="cpp"), want)


def test_roundtrip_error_is_within_the_code_spacing(seed):
    w = torch.randn(256, 512)
    q = nf4.quantize(w, 64, "nf4", double_quant=False)
    err = (nf4.dequantize(q) - w).abs().reshape(-1, 64)
    absmax = w.abs().reshape(-1, 64).amax(dim=1, keepdim=True)
    # No element is further from its value than half the widest gap of the code book (times absmax).
    widest_gap = q.code.sort().values.diff().max()
    assert bool((err <= absmax * widest_gap / 2 * (1 + 1e-6)).all())


def test_empty_weight():
    q = nf4.quantize(torch.empty(0, 64))
    assert q.packed.numel() == 0 and q.absmax.numel() == 0
    assert nf4.dequantize(q).shape == (0, 64)


def test_input_not_modified(seed):
    w = torch.randn(64, 64)
    before = w.clone()
    nf4.quantize(w)
    assert torch.equal(w, before)
