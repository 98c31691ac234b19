"""The Triton NEFTune embedding kernel (fastlora/kernels/neftune_embedding.py) against the contract, bit for bit.

Runs on CPU tensors under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 when CUDA is absent)
or compiled on a GPU. The contract is written out in torch in tests/neftune_contract.py, independent of the op
layer:

    out[t, j] = round_to(weight.dtype, float(weight[ids[t], j]) + fp32(u(i) * mag[t])),  i = t * d + j
    u(i) = float((int32)bits(i) - 2^15) * 2^-15,  bits(i): half i & 1 (low first) of word (i >> 1) & 3 of the
           Philox4x32-10 block i >> 3, stream 1
    rows with mag[t] == 0 are exactly weight[ids[t]]

Where the other backends exist (after the merge with the op layer: torch.ops.fastlora.neftune_embedding_reference
and the C++ CPU kernel of torch.ops.fastlora.neftune_embedding) the kernel is compared with them as well; those
cases skip with the reason otherwise.
"""

from __future__ import annotations

import pytest
import torch
from neftune_contract import assert_bitwise, contract
from neftune_contract import make_inputs as _make_inputs

import fastlora.ops  # noqa: F401  (registers the fastlora::*_reference ops where they exist)

kernels = pytest.importorskip("fastlora.kernels.neftune_embedding")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SEEDS = [0, 1, 0x1234_5678_9ABC_DEF0, 0xFEDC_BA98_7654_3210 >> 1, 2**63 - 1]  # lo32 / hi32 with the top bit set


def _st(value: int, device=DEVICE) -> torch.Tensor:
    """The seed as the kernel takes it: an int64 0-dim tensor (on the inputs' device)."""
    return torch.tensor(value, dtype=torch.int64, device=device)


def make_inputs(T, V, d, dtype, **kw):
    return _make_inputs(T, V, d, dtype, device=DEVICE, **kw)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize(
    "T,V,d",
    [(1, 7, 64), (5, 11, 37), (9, 13, 48), (4, 9, 516), (3, 6, 1024), (2, 5, 4099), (33, 40, 20), (7, 5, 3)],
)
def test_matches_contract(dtype, T, V, d):
    ids, weight, mag = make_inputs(T, V, d, dtype, gen_seed=T * 1000 + d, zero_rows=(0,) if T > 1 else ())
    for seed in SEEDS[:2] if d > 1000 else SEEDS:
        out = kernels.neftune_embedding(ids, weight, mag, _st(seed))
        assert_bitwise(out, contract(ids, weight, mag, seed))


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_zero_mag_rows_are_the_lookup(dtype):
    ids, weight, mag = make_inputs(12, 10, 40, dtype, gen_seed=3, zero_rows=(0, 3, 4, 11))
    out = kernels.neftune_embedding(ids, weight, mag, _st(2**63 - 1))
    lookup = torch.nn.functional.embedding(ids, weight)
    zero = mag == 0
    assert_bitwise(out[zero], lookup[zero].contiguous())
    assert not torch.equal(out[~zero], lookup[~zero])  # the others got noise
    assert_bitwise(kernels.neftune_embedding(ids, weight, torch.zeros_like(mag), _st(5)), lookup)


def test_noise_bounds_and_seeds():
    ids, weight, mag = make_inputs(16, 16, 64, torch.float32, gen_seed=4, scale=1.0)
    a = kernels.neftune_embedding(ids, weight, mag, _st(123))
    b = kernels.neftune_embedding(ids, weight, mag, _st(123))
    c = kernels.neftune_embedding(ids, weight, mag, _st(124))
    assert torch.equal(a, b) and not torch.equal(a, c)
    noise = (a - weight[ids]).cpu()  # the noise up to the rounding of the sum (|weight| < 8: ulp/2 < 2^-21)
    assert (noise.abs() <= mag.cpu()[:, None] + 2**-21).all()
    assert (noise.abs() > 0).float().mean() > 0.99


def test_empty_and_noncontiguous():
    ids, weight, mag = make_inputs(6, 8, 32, torch.bfloat16, gen_seed=5)
    out = kernels.neftune_embedding(ids[:0], weight, mag[:0], _st(1))
    assert out.shape == (0, 32) and out.dtype == torch.bfloat16
    ids2 = torch.stack([ids, ids]).t()[:, 0]  # strided view
    w2 = weight.t().contiguous().t()  # column-major copy
    assert_bitwise(kernels.neftune_embedding(ids2, w2, mag, _st(9)), contract(ids, weight, mag, 9))


def _bad(**kw):
    ids, weight, mag = make_inputs(4, 8, 16, torch.float32)
    args = {"ids": ids, "weight": weight, "mag": mag, "seed": _st(1)} | kw
    return args


@pytest.mark.parametrize(
    "kw,exc,word",
    [
        (lambda a: {"ids": a["ids"].to(torch.int32)}, TypeError, "ids"),
        (lambda a: {"ids": a["ids"].float()}, TypeError, "ids"),
        (lambda a: {"weight": a["weight"].double()}, TypeError, "weight"),
        (lambda a: {"weight": a["weight"].to(torch.int64)}, TypeError, "weight"),
        (lambda a: {"mag": a["mag"].half()}, TypeError, "mag"),
        (lambda a: {"seed": 1}, TypeError, r"seed must be a torch\.Tensor"),
        (lambda a: {"seed": 1.5}, TypeError, r"seed must be a torch\.Tensor"),
        (lambda a: {"seed": torch.tensor(1.5)}, TypeError, "seed must be an int64 tensor"),
        (lambda a: {"seed": torch.tensor(1, dtype=torch.int32)}, TypeError, "seed must be an int64 tensor"),
        (lambda a: {"seed": torch.tensor([1, 2])}, ValueError, "seed must have exactly one element"),
        (lambda a: {"seed": torch.tensor(-1)}, ValueError, r"seed must be in \[0, 2\^63\), got -1"),
        (lambda a: {"seed": torch.tensor(1, device="meta")}, ValueError, "seed is on meta"),
        (lambda a: {"ids": a["ids"].view(2, 2)}, ValueError, "ids"),
        (lambda a: {"weight": a["weight"].flatten()}, ValueError, "weight"),
        (lambda a: {"mag": a["mag"][:3]}, ValueError, "mag"),
        (lambda a: {"ids": torch.tensor([0, 1, 8, 2], device=DEVICE)}, ValueError, "ids"),
        (lambda a: {"ids": torch.tensor([0, -1, 3, 2], device=DEVICE)}, ValueError, "ids"),
    ],
    ids=["ids-int32", "ids-float", "weight-f64", "weight-int", "mag-f16", "seed-int", "seed-float",
         "seed-float-tensor", "seed-int32", "seed-2-elements", "seed-neg-cpu", "seed-other-device", "ids-2d",
         "weight-1d", "mag-shape", "ids-too-big", "ids-negative"],
)
def test_bad_input(kw, exc, word):
    args = _bad()
    args |= kw(args)
    with pytest.raises(exc, match=word):
        kernels.neftune_embedding(**args)


def test_bad_device():
    if DEVICE != "cpu":
        pytest.skip("the interpreter-only device check is for CPU runs")
    ids, weight, mag = make_inputs(4, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="mag"):
        kernels.neftune_embedding(ids, weight, mag.to("meta"), _st(1))


# --------------------------------------------------------------------------------------------------
# the other backends of fastlora::neftune_embedding (present after the merge with the op layer)
# --------------------------------------------------------------------------------------------------


def _op(name: str):
    try:
        return getattr(torch.ops.fastlora, name)
    except (AttributeError, RuntimeError):
        return None


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("which", ["neftune_embedding_reference", "neftune_embedding"])
def test_matches_other_backends(dtype, which):
    op = _op(which)
    if op is None:
        pytest.skip(f"torch.ops.fastlora.{which} is not defined in this tree (the op layer comes with the merge)")
    for T, V, d in [(1, 5, 64), (7, 9, 37), (3, 4, 4099)]:
        ids, weight, mag = make_inputs(T, V, d, dtype, gen_seed=d, zero_rows=(0,))
        for seed in (0, 2**63 - 1):
            # the torch reference / the C++ CPU kernel (a CPU seed)
            expected = op(ids.cpu(), weight.cpu(), mag.cpu(), _st(seed, "cpu"))
            assert_bitwise(expected, contract(ids, weight, mag, seed))
            assert_bitwise(kernels.neftune_embedding(ids, weight, mag, _st(seed)), expected)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("d", [36, 37, 64])
def test_unchecked_bad_ids_give_nan_rows(dtype, d):
    # check_ids=False skips the host check; the kernel masks the bad ids (no out-of-bounds read), NaN rows.
    ids, weight, mag = make_inputs(4, 8, d, dtype, gen_seed=6)
    ids[1], ids[3] = 8, -5
    out = kernels.neftune_embedding(ids, weight, mag, _st(3), check_ids=False)
    assert out[[1, 3]].isnan().all()
    fixed = ids.clone()
    fixed[[1, 3]] = 0
    good = torch.tensor([0, 2], device=DEVICE)
    assert_bitwise(out[good], contract(fixed, weight, mag, 3)[good.cpu()])


def test_capture_skips_the_host_check(monkeypatch):
    """While a CUDA graph is being captured the launcher reads nothing on the host (here the capture is
    simulated: stream_capturing says yes and torch.aminmax, the host check's first step, must not run); the
    kernel's masking is what remains: NaN rows for bad ids, the others exact."""
    ids, weight, mag = make_inputs(5, 8, 40, torch.float32, gen_seed=8)
    ids[2] = 8
    with pytest.raises(ValueError, match="input_ids must be in"):
        kernels.neftune_embedding(ids, weight, mag, _st(4))
    monkeypatch.setattr(kernels, "stream_capturing", lambda device: True)

    def no_host_check(*args, **kwargs):
        raise AssertionError("aminmax (a host read) called while capturing")

    monkeypatch.setattr(torch, "aminmax", no_host_check)
    out = kernels.neftune_embedding(ids, weight, mag, _st(4))
    assert out[2].isnan().all()
    good = torch.tensor([0, 1, 3, 4], device=DEVICE)
    fixed = ids.clone()
    fixed[2] = 0
    assert_bitwise(out[good], contract(fixed, weight, mag, 4)[good.cpu()])


@pytest.mark.parametrize("shape", [(), (1,)], ids=["0-dim", "(1,)"])
def test_seed_is_read_at_run_time(shape):
    """The kernel loads the seed from memory at each launch (what a CUDA graph replay relies on): the same
    tensor object, refilled in place, gives the noise of its new value; a CPU seed is accepted as well."""
    for d in (37, 64):  # per-element and grouped Philox
        ids, weight, mag = make_inputs(7, 9, d, torch.bfloat16, gen_seed=d)
        st = torch.zeros(shape, dtype=torch.int64, device=DEVICE)
        outs = []
        for value in SEEDS:
            st.fill_(value)
            out = kernels.neftune_embedding(ids, weight, mag, st)
            expected = contract(ids, weight, mag, value)
            assert_bitwise(out, expected)
            assert_bitwise(kernels.neftune_embedding(ids, weight, mag, st.cpu()), expected)
            outs.append(out)
        assert all(not torch.equal(outs[i], outs[i + 1]) for i in range(len(outs) - 1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_replay_reads_the_current_seed():
    ids, weight, mag = make_inputs(7, 9, 64, torch.bfloat16, gen_seed=2)
    st = _st(SEEDS[0])
    kernels.neftune_embedding(ids, weight, mag, st, check_ids=False)  # compile before the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kernels.neftune_embedding(ids, weight, mag, st)  # the host id check is skipped while capturing
    for value in SEEDS[1:]:
        st.fill_(value)
        graph.replay()
        assert_bitwise(out, contract(ids, weight, mag, value))


def test_compile_specs_cover_the_launches():
    # Every (dtype, config, GROUPS) the launcher can pick is compiled by `python -m fastlora compile-check`.
    specs = kernels.compile_specs()
    seen = {(s.signature["w_ptr"], s.constexprs["BLOCK_T"], s.constexprs["BLOCK_D"], s.constexprs["GROUPS"])
            for s in specs}  # fmt: skip
    for name in ("*fp32", "*bf16", "*fp16"):
        for d in (20, 37, 512, 4096, 4099):
            cfg = kernels.neftune_config(d)
            assert (name, cfg.block_t, cfg.block_d, d % 4 == 0) in seen
    assert all(s.options.get("enable_fp_fusion") is False and s.forbid_ptx for s in specs)
