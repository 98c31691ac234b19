"""Checks that need a CUDA GPU (skipped elsewhere): the Triton and CUDA kernels compiled for the
real device against the references, bitsandbytes' CUDA kernels against fastlora bit for bit, PEFT +
bitsandbytes on the GPU against the fused op, and checkpointing on the GPU.

On a machine without a GPU the same kernels are covered by the interpreter tests and by
``python -m fastlora compile-check``."""

from __future__ import annotations

import sys

import pytest
import torch
from lora_cases import (
    ADAPTER_GRAD_TOL,
    REL_TOL,
    expected64,
    make_adapters,
    make_weight,
    next_seed,
    rel_err,
)  # fmt: skip
from nf4_cases import boundary_weight

from fastlora import backends, nf4, ops
from fastlora.ops import lora_dropout, lora_linear

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU = "cuda"
_INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _gpu_backends() -> list[str]:
    have = backends.available("cuda")
    return [name for name in ("triton", "cuda") if have[name]]


# ---------------------------------------------------------------------------------------------
# 4-bit dequantization


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 1024, 4096])
def test_dequantize_gpu_matches_cpu_bitwise(backend, quant_type, blocksize, seed):
    if not backends.available("cuda")[backend]:
        pytest.skip(f"{backend} backend not available")
    for numel in (1, 63, 65, 4096 * 3 + 5, 1 << 20, 14336 * 4096):
        packed = torch.randint(0, 256, ((numel + 1) // 2,), dtype=torch.uint8)
        absmax = torch.rand(-(-numel // blocksize)) * 3
        for dtype, view in _INT_VIEW.items():
            want = ops.dequantize_4bit(packed, absmax, blocksize, quant_type, numel, dtype, backend="reference")
            got = ops.dequantize_4bit(packed.to(GPU), absmax.to(GPU), blocksize, quant_type, numel, dtype,
                                          backend=backend).cpu()
            assert torch.equal(got.view(view), want.view(view)), (numel, dtype)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bitsandbytes_cuda_dequantize_matches_fastlora(quant_type, double_quant, dtype, seed):
    F = pytest.importorskip("bitsandbytes.functional")
    w = (torch.randn(4096, 1000) * 0.02).to(dtype)
    q = nf4.quantize(w, 64, quant_type, double_quant)
    bnb_param = nf4.to_bnb(q.to(GPU))
    want = F.dequantize_4bit(bnb_param.data, bnb_param.quant_state).view(_INT_VIEW[dtype])
    for backend in _gpu_backends():
        got = nf4.dequantize(q.to(GPU), dtype, backend=backend).view(_INT_VIEW[dtype])
        assert torch.equal(got, want), backend


def _quantization_mismatches(q, ref_packed, ref_state) -> list[str]:
    """Which parts of a fastlora QuantizedWeight differ from bitsandbytes' (compared on the CPU, torch.equal)."""
    pairs = {"packed": (q.packed, ref_packed), "code": (q.code, ref_state.code), "absmax": (q.absmax, ref_state.absmax)}
    n = ref_state.state2 if ref_state.nested else None
    if (q.nested is None) != (n is None):
        return ["double quantization"]
    if n is not None:
        pairs.update({"absmax2": (q.nested.absmax2, n.absmax), "nested code": (q.nested.code, n.code),
                      "offset": (q.nested.offset, ref_state.offset)})
    bad = [name for name, (ours, theirs) in pairs.items()
           if ours.dtype != theirs.dtype or not torch.equal(ours.cpu(), theirs.cpu())]
    if tuple(q.shape) != tuple(ref_state.shape) or (n is not None and q.nested.blocksize != n.blocksize):
        bad.append("shape / blocksize")
    return bad


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_matches_bitsandbytes_on_each_device(quant_type, dtype, seed):
    """nf4.quantize(double_quant=True) against bitsandbytes' quantize_4bit(compress_statistics=True) run on the
    same device: on the GPU its CUDA kernel, whose rule fastlora follows for CUDA tensors (the GPU's approximate
    reciprocal, FP4's sign bit and thresholds), and on the CPU its CPU quantizer. Every byte and statistic
    equal (the nested codes included, which differ between the two devices on ~0.2% of blocks, so the GPU
    case checks fastlora's CUDA rule, not its CPU one)."""
    F = pytest.importorskip("bitsandbytes.functional")
    for shape, blocksize in [((4096, 1024), 64), ((1000, 4096 + 96), 64), ((2048, 777), 128), ((3, 100_003), 32)]:
        w = (torch.randn(shape) * 10 ** torch.empty(()).uniform_(-3, 0)).to(dtype)
        codes = {}
        for device in (GPU, "cpu"):
            wd = w.to(device)
            ref_packed, ref_state = F.quantize_4bit(wd, blocksize=blocksize, quant_type=quant_type,
                                                   compress_statistics=True)
            q = nf4.quantize(wd, blocksize, quant_type, True)
            assert q.absmax.device.type == torch.device(device).type
            bad = _quantization_mismatches(q, ref_packed, ref_state)
            assert not bad, f"{device} {shape} blocksize {blocksize}: {bad} differ from bitsandbytes"
            codes[device] = q.absmax.cpu()
        if shape == (4096, 1024):  # 65536 nested codes: the two devices' quantizers do disagree somewhere
            assert int((codes[GPU] != codes["cpu"]).sum()) > 0


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 128])
def test_quantize_matches_bitsandbytes_cuda_on_decision_boundaries(quant_type, blocksize):
    """Values exactly on every code boundary (bitsandbytes' CUDA thresholds and the code books' midpoints) and one
    fp32 step either side, in blocks whose absmax is 1: the same bytes as bitsandbytes' CUDA kernel. Random
    weights reach these ties about once per ten million values; four of the kernel's NF4 thresholds are one fp32
    step from the midpoints, which made ~1 byte in 5 million of float32 NF4 weights differ before fastlora used
    the kernel's own constants."""
    F = pytest.importorskip("bitsandbytes.functional")
    w = boundary_weight(blocksize).to(GPU)
    ref_packed, ref_state = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=False)
    q = nf4.quantize(w, blocksize, quant_type, False)
    assert not _quantization_mismatches(q, ref_packed, ref_state)


# ---------------------------------------------------------------------------------------------
# LoRA ops


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("numel", [1, 5, 4097, 1 << 20])
def test_triton_dropout_on_gpu_is_the_reference_mask(dtype, numel, seed):
    x = torch.randn(numel).to(dtype)
    want = lora_dropout(x, 0.3, seed, backend="reference")
    got = lora_dropout(x.to(GPU), 0.3, seed, backend="triton").cpu()
    assert torch.equal(got.view(_INT_VIEW[dtype]), want.view(_INT_VIEW[dtype]))


SHAPES = [(1, 72, 200), (16, 4096, 4096), (300, 1000, 2048), (2048, 4096, 1024)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", ["dense", "nf4-dq", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_lora_linear_on_gpu_against_float64(shape, kind, dtype, p, seed):
    m, k, n = shape
    x = torch.randn(m, k).to(dtype).to(GPU)
    gw = make_weight(kind, n, k, dtype).to(GPU)
    a, b = (t.detach().to(GPU) for t in make_adapters(16, n, k))
    bias = torch.randn(n).to(dtype).to(GPU)
    g = torch.randn(m, n).to(dtype).to(GPU)
    used = next_seed(GPU) if p > 0 else 0  # drawn from the GPU's generator
    y64, dx64, da64, db64, dbias64 = expected64(x, gw, a, b, 2.0, bias, p, used, g)
    for backend in ["triton"] + (["cuda"] if kind != "dense" and m <= 16 and "cuda" in _gpu_backends() else []):
        xs = x.clone().requires_grad_()
        ag, bg = (t.clone().requires_grad_() for t in (a, b))
        biasg = bias.clone().requires_grad_()
        with torch.random.fork_rng(devices=[GPU], device_type="cuda"):
            y = lora_linear(xs, gw, ag, bg, 2.0, bias=biasg, dropout_p=p, backend=backend)
        y.backward(g)
        tol = REL_TOL[dtype]
        assert rel_err(y, y64) < tol, backend
        assert rel_err(xs.grad, dx64) < tol, backend
        assert rel_err(ag.grad, da64) < 10 * ADAPTER_GRAD_TOL, backend
        assert rel_err(bg.grad, db64) < 10 * ADAPTER_GRAD_TOL, backend
        assert rel_err(biasg.grad, dbias64) < tol, backend


@pytest.mark.parametrize("quant", ["nf4-dq", "fp4"])
@pytest.mark.parametrize("m", [4, 512])
def test_matches_peft_bnb_linear4bit_on_gpu(quant, m, seed):
    pytest.importorskip("peft")
    bnb = pytest.importorskip("bitsandbytes")
    from peft import LoraConfig
    from peft.tuners.lora import bnb as lora_bnb

    k, n, dtype = 1024, 2048, torch.bfloat16
    qweight = make_weight(quant, n, k, dtype).to(GPU)
    base = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=dtype, quant_type=qweight.quant_type,
                             compress_statistics=qweight.double_quant)
    base.weight = nf4.to_bnb(qweight)
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0)
    module = lora_bnb.Linear4bit(base, "default", config, r=16, lora_alpha=32, lora_dropout=0.0).to(GPU)
    torch.nn.init.normal_(module.lora_B["default"].weight, std=0.05)
    a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
    x = torch.randn(m, k, device=GPU).to(dtype)
    xp = x.clone().requires_grad_()
    yp = module(xp)
    g = torch.randn_like(yp)
    yp.backward(g)
    peft_grads = (xp.grad, a.grad.clone(), b.grad.clone())
    a.grad = b.grad = None
    xo = x.clone().requires_grad_()
    y = lora_linear(xo, base.weight, a, b, module.scaling["default"], backend="triton")
    y.backward(g)
    assert rel_err(y, yp) < REL_TOL[dtype]
    assert rel_err(xo.grad, peft_grads[0]) < REL_TOL[dtype]
    assert rel_err(a.grad, peft_grads[1]) < REL_TOL[dtype]
    assert rel_err(b.grad, peft_grads[2]) < REL_TOL[dtype]


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("preserve", [True, False])
def test_checkpoint_on_gpu(reentrant, preserve, seed):
    from torch.utils.checkpoint import checkpoint

    weight = make_weight("nf4-dq", 512, 256, torch.bfloat16).to(GPU)
    a, b = (t.detach().to(GPU).requires_grad_() for t in make_adapters(16, 512, 256))
    x = torch.randn(4, 100, 256, device=GPU).to(torch.bfloat16)

    def f(h):
        return lora_linear(h, weight, a, b, 2.0, dropout_p=0.2, backend="triton")

    def grads(wrap):
        torch.manual_seed(5)
        xs = x.clone().requires_grad_()
        y = checkpoint(f, xs, use_reentrant=reentrant, preserve_rng_state=preserve) if wrap else f(xs)
        y.float().square().sum().backward()
        out = (xs.grad, a.grad.clone(), b.grad.clone())
        a.grad = b.grad = None
        return out

    for g0, g1 in zip(grads(False), grads(True), strict=True):
        # The same kernels on the same inputs and mask: equal up to atomics' summation order.
        assert rel_err(g1, g0) < 1e-6


def _recorded_seeds(monkeypatch, module_name: str) -> list[torch.Tensor]:
    """Every seed tensor ``module_name``'s ops draw from now on (the module, not the function of the same
    name that ``fastlora.ops`` exports)."""
    module = sys.modules[module_name]
    draw_seed, seeds = module.draw_seed, []

    def recording_draw_seed(call_site, device):
        seeds.append(draw_seed(call_site, device))
        return seeds[-1]

    monkeypatch.setattr(module, "draw_seed", recording_draw_seed)
    return seeds


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_graph_replays_draw_fresh_dropout_masks(backend, seed, monkeypatch):
    """The seed is a tensor drawn on the GPU (graph-safe ``torch.randint``) and read by the kernels at run time:
    every replay of a captured graph draws a new seed, and its output is bit for bit the eager call's output for
    that seed; none is baked in at capture."""
    if backend not in _gpu_backends():
        pytest.skip(f"{backend} backend not available on this GPU")
    weight = make_weight("nf4-dq", 256, 128, torch.bfloat16).to(GPU)
    a, b = (t.detach().to(GPU) for t in make_adapters(16, 256, 128))
    x = torch.randn(8, 128, device=GPU).to(torch.bfloat16)  # M = 8: the CUDA backend's small-M kernel
    seeds = _recorded_seeds(monkeypatch, "fastlora.ops.lora_linear")

    def run():
        return lora_linear(x, weight, a, b, 2.0, dropout_p=0.5, backend=backend)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up outside capture (Triton compiles, allocator settles)
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = run()
    seed_t = seeds[-1]  # the captured draw writes each replay's seed into this tensor
    outs, drawn = [], []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        outs.append(y.clone())
        drawn.append(int(seed_t))
    assert len(set(drawn)) == 3 and not torch.equal(outs[0], outs[1])
    module = sys.modules["fastlora.ops.lora_linear"]
    for out, value in zip(outs, drawn, strict=True):
        monkeypatch.setattr(module, "draw_seed", lambda call_site, device, v=value: torch.tensor(v, device=device))
        assert torch.equal(out.view(torch.int16), run().view(torch.int16))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("mode", ["padded", "per_sequence"])
def test_cuda_graph_captures_neftune(backend, mode, seed, monkeypatch):
    """fastlora.ops.neftune_embedding captured in a CUDA graph: no host read inside (the ids range check is
    skipped while capturing, the magnitudes are built on the device), a fresh seed drawn on the GPU at every
    replay, and each replay's output the reference for the seed it drew, bit for bit."""
    if backend not in _gpu_backends():
        pytest.skip(f"{backend} backend not available on this GPU")
    from fastlora import reference_neftune

    neftune_module = sys.modules["fastlora.ops.neftune_embedding"]
    seeds = _recorded_seeds(monkeypatch, "fastlora.ops.neftune_embedding")
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(50, 96, generator=g).to(GPU, torch.bfloat16)
    ids = torch.randint(0, 50, (3, 11), generator=g).to(GPU)
    mask = torch.ones(3, 11, dtype=torch.int64, device=GPU)
    mask[1, 7:] = 0

    def run():
        extra = {"attention_mask": mask} if mode == "per_sequence" else {}
        return neftune_module.neftune_embedding(ids, weight, 5.0, mode=mode, backend=backend, **extra)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    seed_t = seeds[-1]  # the captured draw writes each replay's seed into this tensor
    extra = {"attention_mask": mask} if mode == "per_sequence" else {}
    mag = reference_neftune.noise_magnitudes(ids, 96, 5.0, mode=mode, **extra)
    outs = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        expected = reference_neftune.neftune_embedding(ids.reshape(-1), weight, mag, int(seed_t)).reshape(out.shape)
        assert torch.equal(out.view(torch.int16), expected.view(torch.int16))
        outs.append(out.clone())
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])


def test_crossover_sweep_and_saved_default_on_gpu(monkeypatch, tmp_path):
    """The kernels suite's crossover on the real paths (CUDA small-M kernel vs workspace + cuBLAS), saved as this
    GPU's tuned default and followed by backend="auto"."""
    if "cuda" not in _gpu_backends() or "triton" not in _gpu_backends():
        pytest.skip("needs the CUDA and Triton backends")
    import importlib

    from fastlora import tuning
    from fastlora.bench import crossover

    monkeypatch.setenv("FASTLORA_TUNED_DIR", str(tmp_path))
    tuning.clear_cache()
    rows, found = crossover.sweep([(256, 512)], "bf16", GPU, budget_s=0.05, max_runs=5, rows=(1, 16),
                                  progress=lambda line: None)
    assert found["256x512"] in (0, 1, 16) and all(r["value"] > 0 for r in rows if r["unit"] == "ms")
    crossover.save({"256x512": 0}, torch.cuda.get_device_name(), torch.cuda.get_device_capability(), ["bf16"])
    mod = importlib.import_module("fastlora.ops.lora_linear")
    x = torch.randn(4, 256, device=GPU, dtype=torch.bfloat16)
    assert mod._backends("auto", x, True, 512) == ("triton", "triton")  # saved: never the small-M kernel here
    assert mod._backends("auto", x, True, 1024)[0] == "triton"  # the saved default (0) for other shapes too
    tuning.clear_cache()
