"""fastlora.ops.frozen_linear: a frozen bf16 linear computed with fp32 GEMMs over blocks of the weight's rows,
against float64 and against torch's own bf16 linear, forward and backward, blocks of every size, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastlora import backends
from fastlora.ops import frozen_linear

# bf16 has 8 significant bits: one rounding of an fp32-accurate value is within 2^-8 relative of it. Outputs are
# compared with float64 relative to the largest value (a sum's cancellation makes small entries relatively off).
BF16_TOL = 2.0**-8


def _inputs(seed, lead, k, n, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=g).bfloat16()
    w = (torch.randn(n, k, generator=g) / k**0.5).bfloat16()
    b = torch.randn(n, generator=g).bfloat16() if bias else None
    return x, w, b


def _max_rel(got, want):
    return ((got.double() - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("tile", [None, 4 * 70 * 7, 4 * 70 * 300, 4 * 70])  # default; 7 rows; one block; 1 row
@pytest.mark.parametrize("lead,k,n,bias", [((5,), 70, 300, True), ((2, 3), 64, 33, False), ((1,), 70, 1, True)])
def test_forward_and_backward_against_float64(seed, tile, lead, k, n, bias, monkeypatch):
    if tile is not None:
        monkeypatch.setenv("FASTLORA_CPU_TILE_BYTES", str(tile))
    x, w, b = _inputs(seed, lead, k, n, bias)
    x.requires_grad_(True)
    if b is not None:
        b.requires_grad_(True)
    y = frozen_linear(x, w, b)
    assert y.dtype == torch.bfloat16 and y.shape == (*lead, n)
    y64 = x.double() @ w.double().T + (b.double() if b is not None else 0)
    assert _max_rel(y, y64) <= BF16_TOL
    g = torch.randn(*lead, n, generator=torch.Generator().manual_seed(seed + 1)).bfloat16()
    y.backward(g)
    assert _max_rel(x.grad, g.double() @ w.double()) <= BF16_TOL
    if b is not None:
        assert _max_rel(b.grad, g.double().reshape(-1, n).sum(0)) <= BF16_TOL


def test_blocks_change_nothing_but_fp32_summation_order(seed, monkeypatch):
    """Integer-valued inputs make every fp32 sum exact: then any block size gives torch's bf16 linear bit for bit."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-4, 5, (6, 96), generator=g).bfloat16().requires_grad_(True)
    w = torch.randint(-3, 4, (130, 96), generator=g).bfloat16()
    b = torch.randint(-8, 9, (130,), generator=g).bfloat16()
    gy = torch.randint(-2, 3, (6, 130), generator=g).bfloat16()
    want_y = F.linear(x.detach().float(), w.float(), b.float()).bfloat16()
    want_dx = (gy.float() @ w.float()).bfloat16()
    for tile in (4 * 96, 4 * 96 * 17, 4 * 96 * 130):
        monkeypatch.setenv("FASTLORA_CPU_TILE_BYTES", str(tile))
        x.grad = None
        y = frozen_linear(x, w, b)
        y.backward(gy)
        assert torch.equal(y, want_y) and torch.equal(x.grad, want_dx), tile


def test_matches_torch_bf16_linear(seed):
    x, w, b = _inputs(seed, (17,), 128, 96)
    ours, theirs = frozen_linear(x, w, b), F.linear(x, w, b)
    # both are one rounding of an fp32-accumulated value: at most one bf16 step apart
    assert ((ours.float() - theirs.float()).abs() <= theirs.float().abs() * 2.0**-7 + 1e-6).all()


def test_compiles_without_graph_breaks(seed):
    x, w, b = _inputs(seed, (4,), 64, 48)
    compiled = torch.compile(lambda t: frozen_linear(t, w, b), fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), frozen_linear(x, w, b))


def test_tile_bytes_setting(monkeypatch):
    monkeypatch.delenv("FASTLORA_CPU_TILE_BYTES", raising=False)
    assert backends.cpu_tile_bytes() == 8 << 20
    for bad in ("", "abc", "0", "-5"):
        monkeypatch.setenv("FASTLORA_CPU_TILE_BYTES", bad)
        assert backends.cpu_tile_bytes() == 8 << 20
    monkeypatch.setenv("FASTLORA_CPU_TILE_BYTES", "4096")
    assert backends.cpu_tile_bytes() == 4096


def test_bad_input():
    x, w, b = _inputs(0, (3,), 32, 8)
    with pytest.raises(TypeError, match="x must have dtype bfloat16"):
        frozen_linear(x.float(), w, b)
    with pytest.raises(TypeError, match="weight must have dtype bfloat16"):
        frozen_linear(x, w.half(), b)
    with pytest.raises(ValueError, match="in_features=32"):
        frozen_linear(x[:, :31], w, b)
    with pytest.raises(ValueError, match="bias must be"):
        frozen_linear(x, w, b[:7])
    with pytest.raises(ValueError, match="weight requires grad"):
        frozen_linear(x, w.clone().requires_grad_(True), b)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        frozen_linear([1.0], w, b)
    assert torch.equal(frozen_linear(x, w, None), F.linear(x.float(), w.float()).bfloat16())
