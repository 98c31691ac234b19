"""The kernels suite's roofline columns (fastlora/bench/roofline.py): the work models against counts taken from
the real computation, the ceilings and achieved rates as the suite reports them."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from fastlora import nf4, reference_lora
from fastlora.bench import roofline
from fastlora.bench.lora_setup import BLOCKSIZE, RANK, qkv_out_features
from fastlora.ops import frozen_linear
from fastlora.ops.dora_linear import dora_weight_norm


@pytest.mark.parametrize("m,k,n", [(1, 64, 64), (7, 192, 320), (33, 128, 576)])
def test_lora_linear_flops_are_the_reference_products(m, k, n, seed):
    """FlopCounterMode counts the matrix products of the torch reference (fastlora/reference_lora.py) of one
    QLoRA projection: the model's flops are exactly those, forward and backward."""
    g = torch.Generator().manual_seed(seed)
    q = nf4.quantize(torch.randn(n, k, generator=g) * 0.02, BLOCKSIZE, "nf4", False)
    x, dy = torch.randn(m, k, generator=g), torch.randn(m, n, generator=g)
    a, b = torch.randn(RANK, k, generator=g), torch.randn(n, RANK, generator=g)
    args = (q.packed, q.absmax, BLOCKSIZE, "nf4", n)
    with FlopCounterMode(display=False) as fwd:
        _, S = reference_lora.lora_linear_fwd(x, *args, a, b, 2.0, None, 0.0, 0, "linear")
    with FlopCounterMode(display=False) as bwd:
        reference_lora.lora_linear_bwd(dy, x, S, *args, a, b, 2.0, 0.0, 0, True, True, True)
    assert roofline.work("lora_linear", "fwd", m, k, n, torch.float32).flops == fwd.get_total_flops()
    assert roofline.work("lora_linear", "bwd", m, k, n, torch.float32).flops == bwd.get_total_flops()
    full = roofline.work("lora_linear", "full", m, k, n, torch.float32).flops
    assert full == fwd.get_total_flops() + bwd.get_total_flops()
    mlp = roofline.work("gated_mlp", "fwd", m, k, n, torch.float32).flops
    assert mlp == 2 * fwd.get_total_flops() + roofline.work("lora_linear", "fwd", m, n, k, torch.float32).flops
    # DoRA: the same LoRA linear ("linear" rounding) plus the B·A of the row norms ‖W + s·BA‖, forward only
    with FlopCounterMode(display=False) as norm:
        dora_weight_norm(q, a, b, 2.0, torch.float32)
    assert roofline.work("dora_linear", "fwd", m, k, n, torch.float32).flops == (fwd.get_total_flops()
                                                                                 + norm.get_total_flops())
    assert roofline.work("dora_linear", "bwd", m, k, n, torch.float32).flops == bwd.get_total_flops()
    assert roofline.work("dora_linear", "full", m, k, n, torch.float32).flops == (full + norm.get_total_flops())


def _counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("m,k,n", [(1, 64, 64), (7, 192, 320), (33, 128, 576)])
def test_frozen_linear_flops_are_the_computed_products(m, k, n, seed):
    """linear_4bit: the products of its reference kernels (decode, then torch's GEMM) forward and dx; frozen_linear:
    its own forward, and the dx of torch's bf16 linear it replaces (its blocked backward accumulates with addmm_,
    which FlopCounterMode does not count)."""
    g = torch.Generator().manual_seed(seed)
    q = nf4.quantize(torch.randn(n, k, generator=g) * 0.02, BLOCKSIZE, "nf4", False)
    x, dy = torch.randn(m, k, generator=g), torch.randn(m, n, generator=g)
    impls = importlib.import_module("fastlora.ops.linear_4bit")._impls("_reference")
    args = (q.packed_bytes(), q.absmax, BLOCKSIZE, "nf4")
    fwd = _counted(lambda: impls["linear_4bit_fwd"](x, *args, n, None))
    bwd = _counted(lambda: impls["linear_4bit_bwd"](dy, *args, k))
    assert fwd == bwd == 2 * m * k * n  # not vacuous: both products were counted
    for pass_, want in (("fwd", fwd), ("bwd", bwd), ("full", fwd + bwd)):
        assert roofline.work("linear_4bit", pass_, m, k, n, torch.float32).flops == want

    w = torch.randn(n, k, generator=g).bfloat16()
    xb = x.bfloat16().requires_grad_(True)
    fwd = _counted(lambda: frozen_linear(xb, w))
    y = F.linear(xb, w)
    bwd = _counted(lambda: y.backward(dy.bfloat16()))
    assert fwd == bwd == 2 * m * k * n
    for pass_, want in (("fwd", fwd), ("bwd", bwd), ("full", fwd + bwd)):
        assert roofline.work("frozen_linear", pass_, m, k, n, torch.bfloat16).flops == want


@pytest.mark.parametrize("m,k", [(1, 64), (7, 192), (33, 256)])
def test_lora_qkv_flops_are_the_reference_products_of_its_projections(m, k, seed):
    """lora_qkv is the math of three lora_linear projections on one x (q K -> K, k and v K -> K/4): the model's
    flops are those FlopCounterMode counts in the torch reference of each, forward and backward."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    fwd = bwd = 0
    for n in qkv_out_features(k):
        q = nf4.quantize(torch.randn(n, k, generator=g) * 0.02, BLOCKSIZE, "nf4", False)
        a, b, dy = torch.randn(RANK, k, generator=g), torch.randn(n, RANK, generator=g), torch.randn(m, n, generator=g)
        args = (q.packed, q.absmax, BLOCKSIZE, "nf4", n)
        with FlopCounterMode(display=False) as f:
            _, S = reference_lora.lora_linear_fwd(x, *args, a, b, 2.0, None, 0.0, 0, "linear4bit")
        fwd += f.get_total_flops()
        with FlopCounterMode(display=False) as f:
            reference_lora.lora_linear_bwd(dy, x, S, *args, a, b, 2.0, 0.0, 0, True, True, True)
        bwd += f.get_total_flops()
    assert roofline.work("lora_qkv", "fwd", m, k, 999, torch.float32).flops == fwd  # N is not used
    assert roofline.work("lora_qkv", "bwd", m, k, 64, torch.float32).flops == bwd
    assert roofline.work("lora_qkv", "full", m, k, 64, torch.float32).flops == fwd + bwd


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,n", [(64, 64), (256, 192), (4096, 1024)])
def test_dequantize_bytes_are_the_tensors_it_reads_and_writes(dtype, k, n):
    """The 4-bit weight's bytes are those of a real double-quantized weight (codes, uint8 absmax, the second level
    fp32 absmax; the 256-entry code book and offset are constant and left out), plus the decoded output."""
    q = nf4.quantize(torch.randn(n, k) * 0.02, BLOCKSIZE, "nf4", True)
    tensors = q.packed.nbytes + q.absmax.nbytes + q.nested.absmax2.nbytes
    out = torch.empty(n, k, dtype=dtype).nbytes
    model = roofline.work("dequantize_4bit", "fwd", 5, k, n, dtype)
    assert model.flops == 0
    assert model.bytes == pytest.approx(tensors + out, rel=0, abs=4)  # absmax2: a partial last block


def test_neftune_lora_and_linear_bytes():
    e = 2  # bf16
    m, k, n = 9, 128, 1000
    assert roofline.work("neftune_embedding", "fwd", m, k, n, torch.bfloat16).bytes == m * 8 + 2 * m * k * e
    w4 = roofline.weight_4bit_bytes(k, n)
    adapters = (RANK * k + n * RANK) * 4
    fwd = roofline.work("lora_linear", "fwd", m, k, n, torch.bfloat16).bytes
    assert fwd == w4 + adapters + m * k * e + m * n * e + m * RANK * 4
    # frozen linears: the weight, x and y (fwd); the weight, G and dx (bwd); frozen_linear's weight is bf16
    for op, weight in (("linear_4bit", w4), ("frozen_linear", k * n * 2)):
        assert roofline.work(op, "fwd", m, k, n, torch.bfloat16).bytes == weight + m * k * e + m * n * e
        assert roofline.work(op, "bwd", m, k, n, torch.bfloat16).bytes == weight + m * n * e + m * k * e
    dora = roofline.work("dora_linear", "fwd", m, k, n, torch.bfloat16).bytes
    assert dora == fwd + n * 4  # + the fp32 magnitude
    lora_bwd = roofline.work("lora_linear", "bwd", m, k, n, torch.bfloat16).bytes
    assert roofline.work("dora_linear", "bwd", m, k, n, torch.bfloat16).bytes == lora_bwd + 2 * n * 4
    # q, k, v: three projections' bytes, but x read once (and dx written once)
    parts = [(roofline.work("lora_linear", "fwd", m, k, out, torch.bfloat16).bytes,
              roofline.work("lora_linear", "bwd", m, k, out, torch.bfloat16).bytes) for out in qkv_out_features(k)]
    assert roofline.work("lora_qkv", "fwd", m, k, n, torch.bfloat16).bytes == sum(f for f, _ in parts) - 2 * m * k * e
    assert roofline.work("lora_qkv", "bwd", m, k, n, torch.bfloat16).bytes == sum(b for _, b in parts) - 4 * m * k * e
    with pytest.raises(ValueError, match="op"):
        roofline.work("softmax", "fwd", m, k, n, torch.float32)
    with pytest.raises(ValueError, match="pass"):
        roofline.work("lora_linear", "sideways", m, k, n, torch.float32)


@pytest.mark.parametrize("dtype,n", [(torch.float32, 1024), (torch.bfloat16, 512)])
def test_ceiling_operations(dtype, n):
    """The timed calls are what the ceilings count: an n x n x n matmul, a copy of the buffer."""
    assert roofline.ceiling_sizes("cpu", dtype) == (n, 64 << 20)
    assert roofline.ceiling_sizes("cuda", dtype) == (8192, 256 << 20)
    product = roofline.ceiling_operation("gemm", "cpu", dtype)()
    assert product.shape == (n, n) and product.dtype == dtype
    copied = roofline.ceiling_operation("copy", "cpu", dtype)()
    assert copied.nbytes == 64 << 20 and bool((copied == 1).all())
    with pytest.raises(ValueError, match="kind"):
        roofline.ceiling_operation("fma", "cpu", dtype)


def test_ceilings_and_achieved_rates():
    c = roofline.ceilings_from("cpu", torch.float32, "fp32", gemm_ms=20.0, copy_ms=4.0)
    assert c.gemm_n == 1024 and c.copy_bytes == 64 << 20
    assert c.gemm_tflops == pytest.approx(2 * 1024**3 / 0.02 / 1e12)
    assert c.copy_gbs == pytest.approx(2 * (64 << 20) / 0.004 / 1e9)
    w = roofline.Work(flops=4e12, bytes=3e9)
    rates = roofline.achieved(w, 2000.0, c)  # 2 s
    assert rates["tflops"] == pytest.approx(2.0) and rates["gbs"] == pytest.approx(1.5)
    assert rates["gemm_fraction"] == pytest.approx(2.0 / c.gemm_tflops)
    assert rates["copy_fraction"] == pytest.approx(1.5 / c.copy_gbs)
    none = roofline.achieved(roofline.Work(0.0, 3e9), 1.0, c)
    assert none["tflops"] is None and none["gemm_fraction"] is None
