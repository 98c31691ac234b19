"""fastlora.nf4 against bitsandbytes: bytes and statistics of quantize, bits of dequantize.

Parity targets (bitsandbytes 0.50 on the CPU):
* quantize: packed bytes, absmax (fp32, or uint8 codes + absmax2 + offset + code when nested)
  identical to ``bitsandbytes.functional.quantize_4bit``, on every backend. The nested uint8 codes
  too: bitsandbytes' CPU 8-bit quantizer rounds to a 65536-point grid before it picks a code entry,
  so near a midpoint between two entries its code is not always the nearest one; fastlora stores
  the same code (tests below place values there on purpose).
* dequantize: identical to bitsandbytes' reference kernel (``_dequantize_4bit_compute``, the
  "default" backend) for every case, and to ``bitsandbytes.functional.dequantize_4bit`` (its
  native CPU kernel) where that kernel is correct: its blocks go wrong when a row's length is not
  a multiple of the blocksize (blocksize < 2048), where it disagrees with its own reference.
  Values are compared with torch.equal (exact; +0 and -0 compare equal: FP4 code 8 decodes to -0
  in bitsandbytes' native kernels and to +0 in its torch reference).
"""

import pytest
import torch
from nf4_cases import boundary_weight

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


QUANTIZE_BACKENDS = ["cpp", "reference"]  # every fastlora backend that quantizes and runs on the CPU


def _assert_same_quantization(q, ref_packed, ref_state, what=""):
    """Every byte and statistic of a fastlora QuantizedWeight equals bitsandbytes' (torch.equal)."""
    assert q.shape == ref_state.shape, what
    assert torch.equal(q.packed, ref_packed), what
    assert torch.equal(q.code, ref_state.code), what
    assert q.absmax.dtype == ref_state.absmax.dtype and torch.equal(q.absmax, ref_state.absmax), what
    if ref_state.nested:
        assert q.nested is not None, what
        assert torch.equal(q.nested.absmax2, ref_state.state2.absmax), what
        assert torch.equal(q.nested.code, ref_state.state2.code), what
        assert q.nested.offset.dtype == torch.float32
        assert torch.equal(q.nested.offset, ref_state.offset), what
        assert q.nested.blocksize == ref_state.state2.blocksize, what
    else:
        assert q.nested is None, what


@pytest.mark.parametrize("backend", QUANTIZE_BACKENDS)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_quantize_matches_bitsandbytes(seed, backend, quant_type, blocksize, double_quant):
    F = pytest.importorskip("bitsandbytes.functional")
    for shape in SHAPES:
        for dtype in DTYPES:
            w = (torch.randn(shape) * torch.rand(()) * 0.2).to(dtype)
            ref_packed, ref_state = _bnb_quantize(F, w, blocksize, quant_type, double_quant)
            q = nf4.quantize(w, blocksize, quant_type, double_quant, backend=backend)
            assert q.dtype == dtype
            _assert_same_quantization(q, ref_packed, ref_state, (shape, dtype))


@pytest.mark.parametrize("backend", QUANTIZE_BACKENDS)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64])
def test_quantize_matches_bitsandbytes_on_decision_boundaries(backend, quant_type, blocksize):
    """Values exactly on every code boundary of either device's rule and one fp32 step either side (where random
    weights land about once in ten million values): the same bytes as bitsandbytes' CPU quantizer."""
    F = pytest.importorskip("bitsandbytes.functional")
    w = boundary_weight(blocksize)
    ref_packed, ref_state = _bnb_quantize(F, w, blocksize, quant_type, False)
    _assert_same_quantization(nf4.quantize(w, blocksize, quant_type, False, backend=backend), ref_packed, ref_state,
                              quant_type)


@pytest.mark.parametrize("backend", QUANTIZE_BACKENDS)
@pytest.mark.parametrize("shape, blocksize", [((512, 1024), 32), ((1000, 4096 + 96), 64), ((4096, 1536), 128),
                                              ((3, 100_003), 64), ((2048, 777), 256)])
def test_nested_statistics_identical_on_larger_weights(seed, backend, shape, blocksize):
    """Thousands of nested codes per weight (hundreds of second-level blocks), every one equal."""
    F = pytest.importorskip("bitsandbytes.functional")
    for quant_type, dtype in [("nf4", torch.bfloat16), ("fp4", torch.float32), ("nf4", torch.float16)]:
        w = (torch.randn(shape) * 10 ** torch.empty(()).uniform_(-3, 0)).to(dtype)
        ref_packed, ref_state = _bnb_quantize(F, w, blocksize, quant_type, True)
        q = nf4.quantize(w, blocksize, quant_type, True, backend=backend)
        _assert_same_quantization(q, ref_packed, ref_state, (quant_type, dtype))


def _near_midpoints(code, n, spread):
    """n values in [-1, 1], each within `spread` of a midpoint between two neighbouring code entries
    (some exactly on it), in blocks of 256 whose absmax is 1 (the first value of each block)."""
    j = torch.randint(0, 255, (n,))
    mid = (code[j] + code[j + 1]) * 0.5
    off = (torch.rand(n) * 2 - 1) * spread
    off[torch.rand(n) < 0.1] = 0.0
    x = (mid + off).clamp(-1, 1)
    x[::256] = 1.0
    return x


def _nearest_codes(x, absmax, code, blocksize):
    normed = x / absmax.repeat_interleave(blocksize)[: x.numel()]
    return (normed[:, None] - code[None, :]).abs().argmin(dim=1)


@pytest.mark.parametrize("backend", QUANTIZE_BACKENDS)
def test_absmax_codes_near_midpoints_match_bitsandbytes(seed, backend):
    """The case that used to differ: values within 1e-5 of a midpoint between two code entries,
    where bitsandbytes' CPU quantizer does not always pick the nearest entry. Same op, same input,
    same codes as ``bitsandbytes.functional.quantize_blockwise`` (what quantize_4bit nests with)."""
    F = pytest.importorskip("bitsandbytes.functional")
    from fastlora import ops, reference

    code = reference.dynamic_map()
    assert torch.equal(code, F.create_dynamic_map())
    n = 256 * 400 + 77
    for scale in (1.0, 3.7e-3, 250.0):
        x = _near_midpoints(code, n, 1e-5) * scale
        ref_q, ref_state = F.quantize_blockwise(x, code=code.clone(), blocksize=256)
        q, absmax2 = ops.quantize_absmax(x, code, 256, backend=backend)
        assert torch.equal(absmax2, ref_state.absmax)
        assert torch.equal(q, ref_q), f"{int((q != ref_q).sum())} of {n} codes differ (scale {scale})"
        # The input does reach the disputed region: there the stored code is not the nearest entry.
        assert int((_nearest_codes(x, absmax2, code, 256) != q.long()).sum()) > 0


@pytest.mark.parametrize("backend", QUANTIZE_BACKENDS)
@pytest.mark.parametrize("blocksize", [32, 64])
def test_nested_codes_near_midpoints_through_quantize(seed, backend, blocksize):
    """The same through nf4.quantize: a weight whose per-block absmax, once centred and scaled by
    the second-level absmax, lands within ~1e-5 of code midpoints."""
    F = pytest.importorskip("bitsandbytes.functional")
    from fastlora import reference

    code = reference.dynamic_map()
    half = _near_midpoints(code, 256 * 12, 1e-5) * 0.01
    # Mirrored halves: the mean of the absmax is 0.02 (up to rounding, ~1e-7 of the spread), and
    # every 256-block of centred values has absmax 0.01 (its first value), so centred / absmax2
    # is the designed value near a midpoint.
    centred = torch.cat([half, -half])
    blocks = centred.numel()
    w = torch.zeros(blocks, blocksize)
    w[:, 0] = centred + 0.02  # the block's absmax (all positive); the rest of the block is smaller
    w[:, 1:] = (torch.rand(blocks, blocksize - 1) * 2 - 1) * w[:, :1] * 0.99
    w = w.reshape(-1, 4 * blocksize)
    ref_packed, ref_state = _bnb_quantize(F, w, blocksize, "nf4", True)
    q = nf4.quantize(w, blocksize, "nf4", True, backend=backend)
    _assert_same_quantization(q, ref_packed, ref_state)
    plain = nf4.quantize(w, blocksize, "nf4", False, backend=backend).absmax - q.nested.offset
    assert int((_nearest_codes(plain, q.nested.absmax2, code, 256) != q.absmax.long()).sum()) > 0


# bitsandbytes' CUDA 8-bit quantizer (kQuantizeBlockwise -> dQuantize<0>), which fastlora follows for CUDA
# tensors. It cannot be compared with bitsandbytes here (tests/test_gpu.py does that); instead it is checked
# against a plain per-value port of the kernel's search, written the obvious way.


def _dquantize_scalar(code, x):
    """bitsandbytes' dQuantize<0> for one np.float32 x (a line-by-line port of the CUDA function)."""
    import numpy as np

    pivot, upper_pivot, lower_pivot = 127, 255, 0
    lower, upper = np.float32(-1.0), np.float32(1.0)
    val = code[pivot]
    i = 64
    while i > 0:
        if x > val:
            lower_pivot = pivot
            lower = val
            pivot += i
        else:
            upper_pivot = pivot
            upper = val
            pivot -= i
        val = code[pivot]
        i >>= 1
    if upper_pivot == 255:
        upper = code[upper_pivot]
    if lower_pivot == 0:
        lower = code[lower_pivot]
    if x > val:
        midpoint = (upper + val) * np.float32(0.5)
        return upper_pivot if x > midpoint else pivot
    midpoint = (lower + val) * np.float32(0.5)
    return lower_pivot if x < midpoint else pivot


def _cuda_blockwise_scalar(values, blocksize, code_of):
    """bitsandbytes' kQuantizeBlockwise steps value by value (numpy fp32): zeros loaded past the end, absmax per
    block (NaNs ignored, as fmaxf does: a block of NaNs keeps -FLT_MAX), x * (1 / absmax), then code_of(scaled x).
    Returns (the codes of the padded values, a list; fp32 absmax per block)."""
    import numpy as np

    vals = values.numpy().astype(np.float32)
    vals = np.concatenate([vals, np.zeros(-len(vals) % blocksize, np.float32)])
    codes, absmaxes = [], []
    with np.errstate(divide="ignore", invalid="ignore"):
        for start in range(0, len(vals), blocksize):
            block = vals[start:start + blocksize]
            absmax = np.float32(-np.finfo(np.float32).max)
            for v in block:
                absmax = absmax if np.isnan(v) else max(absmax, np.float32(abs(v)))
            inv = np.float32(1.0) / absmax
            absmaxes.append(absmax)
            codes += [code_of(np.float32(v * inv)) for v in block]
    return codes, torch.tensor(absmaxes, dtype=torch.float32)


def _cuda_quantize_scalar(values, code, blocksize):
    """The nested statistics' 8-bit codes (dQuantize) and absmax, as kQuantizeBlockwise stores them."""
    table = code.numpy().astype("float32")
    codes, absmax = _cuda_blockwise_scalar(values, blocksize, lambda x: _dquantize_scalar(table, x))
    return torch.tensor(codes[: values.numel()], dtype=torch.uint8), absmax


def _midpoint_probe(code, seed_values):
    """Values for the search: normal spread, values within 1e-6 of every midpoint (and on it, and one
    fp32 step either side), +-1, 0 and an all-zero block; blocks of 256 with absmax 1 except the
    zero block and a scaled one."""
    mid = (code[:-1] + code[1:]) * 0.5
    near = [mid, torch.nextafter(mid, torch.full_like(mid, 2.0)), torch.nextafter(mid, torch.full_like(mid, -2.0))]
    near += [(mid + (torch.rand(255) * 2 - 1) * 1e-6) for _ in range(6)]
    x = torch.cat(near + [code, torch.tensor([1.0, -1.0, 0.0, -0.0]), seed_values]).clamp(-1, 1)
    x = x[torch.randperm(x.numel())]
    x = torch.nn.functional.pad(x, (0, -x.numel() % 256)).reshape(-1, 256)
    x[:, 0] = torch.where(torch.arange(x.shape[0]) % 2 == 0, 1.0, -1.0)  # each block's absmax is exactly 1
    scaled = x[-1:] * 3.0e-3  # one block with a non-trivial reciprocal
    return torch.cat([x.reshape(-1), torch.zeros(256), scaled.reshape(-1), x[0, :77]])  # partial last block


def test_cuda_search_matches_a_scalar_port_of_the_kernel(seed):
    from fastlora import reference

    code = reference.dynamic_map()
    x = _midpoint_probe(code, torch.randn(1500).clamp(-3, 3) / 3)
    assert x.numel() > 4000
    q, absmax = reference.quantize_absmax_search(x, code, 256)
    want_q, want_absmax = _cuda_quantize_scalar(x, code, 256)
    assert torch.equal(absmax, want_absmax)
    assert q.dtype == torch.uint8
    assert torch.equal(q, want_q), f"{int((q != want_q).sum())} of {x.numel()} codes differ"
    zero_block = x.numel() - 256 - 256 - 77  # start of the all-zero block
    assert absmax[zero_block // 256] == 0 and bool((q[zero_block:zero_block + 256] == 0).all())


def test_cuda_search_and_cpu_grid_differ_only_next_to_midpoints(seed):
    """The device rule matters: within ~1.5e-5 of a midpoint the CPU grid lookup and the CUDA search
    store different codes (the search the nearest entry); away from midpoints both store the nearest."""
    from fastlora import reference

    code = reference.dynamic_map()
    x = torch.cat([_near_midpoints(code, 256 * 200, 1e-5), (torch.rand(256 * 200) * 2 - 1) ** 3])
    x[::256] = 1.0  # absmax 1 in every block: the scaled value is x itself
    grid, _ = reference.quantize_absmax_grid(x, code, 256)
    search, _ = reference.quantize_absmax_search(x, code, 256)
    cpu, _ = reference.quantize_absmax(x, code, 256)
    assert torch.equal(cpu, grid)  # CPU tensors: the CPU quantizer
    nearest = _nearest_codes(x, torch.ones(x.numel() // 256), code, 256)
    mid = (code[:-1] + code[1:]) * 0.5
    dist = (x[:, None] - mid[None, :]).abs().min(dim=1).values
    far, near = dist > 2e-5, (dist > 1e-6) & (dist < 1.5e-5)
    assert int(far.sum()) > 10_000 and int(near.sum()) > 10_000
    assert torch.equal(grid[far].long(), nearest[far]) and torch.equal(search[far].long(), nearest[far])
    assert torch.equal(search[near].long(), nearest[near])
    assert int((grid[near] != search[near]).sum()) > 100


# The fp32 constants bitsandbytes' compiled CUDA kernels compare with (FSETP.GT immediates in the SASS of
# kQuantizeBlockwise<float, 64, 2, 0, NF4 / FP4> in libbitsandbytes_cuda130.so 0.50.2, `cuobjdump -sass`, the
# same for sm_80, sm_90 and sm_100), as bit patterns: written here, not read from fastlora, so that a changed
# one fails. Four NF4 ones are one fp32 step from the fp32 midpoints of the code book.
_BNB_CUDA_NF4_THRESHOLD_BITS = (
    0xBF591CD9, 0xBF1C5270, 0xBEEB8480, 0xBEADEA76, 0xBE703CEC, 0xBE0D38BC, 0xBD3A7871, 0x3D22FAFF,
    0x3DF64863, 0x3E5067E0, 0x3E9582D4, 0x3EC753F9, 0x3F006D03, 0x3F248DAF, 0x3F5C89D9,
)  # fmt: skip
_BNB_CUDA_FP4_THRESHOLD_BITS = (0x3B2AAAB9, 0x3DB00000, 0x3E555555, 0x3E955555, 0x3ED55556, 0x3F155550, 0x3F555555)


def _fp32_of_bits(bits):
    import numpy as np

    return np.array(bits, dtype=np.uint32).view(np.float32)


def _gpu_4bit_code_scalar(x, quant_type):
    """One value's 4-bit code by bitsandbytes' CUDA decision trees (dQuantizeNF4 / dQuantizeFP4): strict
    comparisons, so a NaN takes every 'not above' branch."""
    if quant_type == "nf4":
        thresholds = _fp32_of_bits(_BNB_CUDA_NF4_THRESHOLD_BITS)
        lo, hi = 0, 15  # binary descent over the sorted thresholds, as the kernel's nested ifs
        while lo < hi:
            middle = (lo + hi) // 2
            if x > thresholds[middle]:
                lo = middle + 1
            else:
                hi = middle
        return lo
    t = _fp32_of_bits(_BNB_CUDA_FP4_THRESHOLD_BITS)  # 0.00260417, 0.0859375, ..., 0.8333333
    sign = 8 if x < 0 else 0
    a = abs(x)
    if a > t[3]:
        magnitude = (3 if a > t[6] else 2) if a > t[5] else (5 if a > t[4] else 4)
    else:
        magnitude = (7 if a > t[2] else 6) if a > t[1] else (1 if a > t[0] else 0)
    return sign + magnitude


def _gpu_4bit_quantize_scalar(values, blocksize, quant_type):
    """The packed 4-bit codes and absmax, as kQuantizeBlockwise stores them (an odd count's last byte holds the
    code of a padding zero)."""
    codes, absmax = _cuda_blockwise_scalar(values, blocksize, lambda x: _gpu_4bit_code_scalar(x, quant_type))
    codes = codes[: values.numel() + values.numel() % 2]
    packed = [(codes[i] << 4) | codes[i + 1] for i in range(0, len(codes), 2)]
    return torch.tensor(packed, dtype=torch.uint8), absmax


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 256])
def test_gpu_rule_4bit_matches_a_scalar_port_of_the_kernel(seed, quant_type, blocksize):
    """reference.quantize_4bit_gpu_rule (what CUDA weights get) against bitsandbytes' CUDA decision trees
    applied value by value: values on, and one fp32 step either side of, every threshold (in blocks whose
    absmax is 1), small negative values, -0, a NaN, an all-zero block, a scaled block and a partial,
    odd-length last block."""
    from fastlora import reference

    if quant_type == "nf4":  # the kernel's thresholds and the code book's midpoints (which the CPU uses)
        table = reference.code_table(quant_type)
        edges = torch.cat([torch.from_numpy(_fp32_of_bits(_BNB_CUDA_NF4_THRESHOLD_BITS)), (table[:-1] + table[1:]) / 2])
    else:
        edges = torch.from_numpy(_fp32_of_bits(_BNB_CUDA_FP4_THRESHOLD_BITS))
        edges = torch.cat([edges, -edges])
    near = torch.cat([edges, torch.nextafter(edges, edges + 1), torch.nextafter(edges, edges - 1)])
    special = torch.tensor([-1e-4, -1e-7, -0.0, 0.0, 1e-7, float("nan"), 1.0, -1.0])
    x = torch.cat([near, special, torch.randn(3 * blocksize).clamp(-3, 3) / 3])
    x = torch.nn.functional.pad(x, (0, -x.numel() % blocksize)).reshape(-1, blocksize)
    x[:, -1] = 1.0  # absmax 1: the scaled value is the value itself
    x = torch.cat([x.reshape(-1), torch.zeros(blocksize), x[-1] * 3.0e-3, torch.randn(blocksize // 2 + 1)])
    packed, absmax = reference.quantize_4bit_gpu_rule(x, blocksize, quant_type)
    want_packed, want_absmax = _gpu_4bit_quantize_scalar(x, blocksize, quant_type)
    assert torch.equal(absmax, want_absmax)
    assert torch.equal(packed, want_packed), f"{int((packed != want_packed).sum())} of {packed.numel()} bytes differ"
    codes = reference.unpack_codes(packed, x.numel())
    if quant_type == "fp4":  # the CUDA rule's sign bit: small negative values are "-0", not 0
        assert int(codes[(x < 0) & (x > -2e-3)].min()) == 8
    assert bool((codes[x.isnan()] == 0).all())
    if quant_type == "fp4":  # and so the CPU rule, for the same full blocks, stores other bytes
        full = x[: x.numel() - x.numel() % blocksize].nan_to_num()
        assert not torch.equal(reference.quantize_4bit(full, blocksize, "fp4")[0],
                               reference.quantize_4bit_gpu_rule(full, blocksize, "fp4")[0])


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
    assert torch.equal(q_cpp.nested.offset, q_ref.nested.offset)
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


def test_decimal_literals_round_once_to_fp32():
    """reference._fp32_literals reads a decimal as a C compiler reads ``0.5f``: one rounding, ties to even. Through a
    Python float the kernel's threshold below NF4 code 13 lands one fp32 step higher (double rounding)."""
    from fastlora import reference

    def bits(value):
        return int(torch.tensor(value, dtype=torch.float32).view(torch.int32))

    assert bits(reference._fp32_literals("0.5016634166240692")[0]) == 0x3F006D03
    assert bits(0.5016634166240692) == 0x3F006D04
    one_ulp = 2.0**-23
    halfway_even, halfway_odd = "1.000000059604644775390625", "1.000000178813934326171875"  # 1 + 2^-24, 1 + 3*2^-24
    assert reference._fp32_literals(halfway_even, halfway_odd) == (1.0, 1.0 + 2 * one_ulp)
    assert reference._fp32_literals("-0.8480964004993439")[0] == -reference._fp32_literals("0.8480964004993439")[0]
