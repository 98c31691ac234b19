"""kernels/adapter_gemms.py: fp32 operands split into bf16 pieces so that the adapter GEMMs of the torch (cuBLAS)
path run on bf16 tensor cores. Checked against float64 products on fresh random inputs with odd shapes: the
pieces must reproduce fp32 values exactly, the products must be as accurate as fp32 GEMMs (norm-wise relative
error under 1e-6, elementwise |err| <= 1e-6 * (|ref| + max|ref|)), and the bf16 results must be the float64
value rounded once (a last-bit difference allowed on at most 0.1% of the elements, where the fp32 sum lands
next to a rounding tie). On a GPU the same functions run cuBLAS (``torch.mm(..., out_dtype=torch.float32)``,
``addmm_``); on the CPU their fp32 emulation."""

from __future__ import annotations

import warnings

import pytest
import torch

from fastlora.kernels import adapter_gemms

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BF16 = torch.bfloat16
FP32_TOL = 1e-6
TIE_FRACTION = 1e-3


def _rand(*shape, scale=1.0):
    return (torch.randn(*shape) * scale).to(DEVICE)


def _close_fp32(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert got.dtype == torch.float32 and got.shape == ref.shape, (what, got.dtype, got.shape, ref.shape)
    g, r = got.double().cpu(), ref.cpu()
    assert (g - r).norm() <= FP32_TOL * r.norm(), what
    err, bound = (g - r).abs(), FP32_TOL * (r.abs() + r.abs().max())
    assert bool((err <= bound).all()), f"{what}: max |err| {err.max().item():.3g}"


def _rounded_once(got: torch.Tensor, ref64: torch.Tensor, what: str) -> None:
    """got (bf16) is ref64 rounded to bf16, but for last-bit differences at near-ties."""
    want = ref64.to(BF16)
    got = got.cpu()
    differ = got != want
    assert differ.double().mean().item() <= TIE_FRACTION, f"{what}: {differ.double().mean().item():.2%} differ"
    ulp = (want.float().abs() * 2.0**-7).clamp_min(1e-38)
    assert bool(((got.float() - want.float()).abs() <= ulp).all()), f"{what}: a difference over one bf16 ulp"


def test_pieces_sum_to_the_value():
    t = torch.randn(4099) * torch.logspace(-30, 30, 4099)  # every exponent range an adapter could hold
    t[:3] = torch.tensor([0.0, -0.0, 1.0 + 2.0**-23])
    pieces = adapter_gemms.bf16_pieces(t.to(DEVICE))
    assert len(pieces) == adapter_gemms.PIECES and all(p.dtype == BF16 and p.shape == t.shape for p in pieces)
    total = sum(p.double().cpu() for p in pieces)
    assert torch.equal(total, t.double())  # 3 x 8 significant bits hold fp32's 24


@pytest.mark.parametrize(("m", "c", "r"), [(37, 72, 8), (5, 301, 1), (130, 64, 17)])
def test_product_with_pieces_matches_float64(m, c, r):
    a16 = _rand(m, c).to(BF16)
    t = _rand(c, r, scale=c**-0.5)
    ref = a16.double().cpu() @ t.double().cpu()
    _close_fp32(adapter_gemms.product_with_pieces(a16, t), ref, "a16·t")
    # transposed views, as the launchers pass them (lora_A.t(), dS.t(), G.t())
    _close_fp32(adapter_gemms.product_with_pieces(a16.t().contiguous().t(), t.t().contiguous().t()), ref, "views")
    left = _rand(r, m)
    ref_left = left.double().cpu() @ a16.double().cpu()
    _close_fp32(adapter_gemms.product_with_pieces(a16, left, t_on_left=True), ref_left, "t·a16")


@pytest.mark.parametrize(("m", "n", "r"), [(37, 200, 8), (3, 5, 1), (64, 130, 16)])
def test_fp32_products_match_float64(m, n, r):
    left, right_t = _rand(m, r), _rand(n, r, scale=0.01)
    ref = left.double().cpu() @ right_t.double().cpu().T
    _close_fp32(adapter_gemms.fp32_product(left, right_t), ref, "fp32_product")
    _rounded_once(adapter_gemms.pieces_product(left, right_t), ref, "pieces_product")
    out = _rand(m, n).to(BF16)
    want = out.double().cpu() + ref
    got = adapter_gemms.add_product_(out, left, right_t)
    assert got is out  # in place
    _rounded_once(out, want, "add_product_")


def test_mm_fp32_sums_exact_products_in_fp32():
    a, b = _rand(33, 70).to(BF16), _rand(70, 9).to(BF16)
    got = adapter_gemms.mm_fp32(a, b)
    assert got.dtype == torch.float32
    _close_fp32(got, a.double().cpu() @ b.double().cpu(), "mm_fp32")


def test_split_applies_only_to_bf16_x_with_fp32_adapters():
    assert adapter_gemms.split_applies(BF16, torch.float32)
    for pair in ((torch.float16, torch.float32), (BF16, BF16), (torch.float32, torch.float32)):
        assert not adapter_gemms.split_applies(*pair), pair


def test_summed_groups_adds_the_slices():
    t = _rand(4, 12)
    got = adapter_gemms.summed_groups(t, 3, 1).double().cpu()
    parts = t.double().cpu().chunk(3, 1)
    exact, magnitude = sum(parts), sum(p.abs() for p in parts)
    assert bool(((got - exact).abs() <= 2.0**-23 * magnitude).all())  # two fp32 additions


def test_mm_fp32_falls_back_once_where_the_overload_fails(monkeypatch):
    """Where torch.mm(..., out_dtype=torch.float32) fails (torch < 2.8, or a device without it: the CPU here), one
    warning and the fp32 GEMM of upcasts from then on."""
    monkeypatch.setattr(adapter_gemms, "OUT_DTYPE_DEVICES", ("cpu", "cuda"))
    monkeypatch.setattr(adapter_gemms, "_out_dtype_works", True)
    a, b = torch.randn(9, 40).to(BF16), torch.randn(40, 6).to(BF16)
    if hasattr(torch.ops.aten.mm, "dtype") and torch._C._dispatch_has_kernel_for_dispatch_key("aten::mm.dtype", "CPU"):
        pytest.skip("this torch has the fp32-output overload on the CPU")
    with pytest.warns(RuntimeWarning, match="out_dtype"):
        got = adapter_gemms.mm_fp32(a, b)
    _close_fp32(got, a.double() @ b.double(), "fallback")
    assert adapter_gemms._out_dtype_works is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapter_gemms.mm_fp32(a, b)  # no second attempt, no second warning
