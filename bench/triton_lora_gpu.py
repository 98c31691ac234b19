"""GPU timings of the Triton LoRA kernels (needs CUDA): ``python bench/triton_lora_gpu.py [--quick]``.

* fused LoRA linear forward / backward, dense bf16 weight, M = 4096 tokens, 4096 x 4096, r = 16,
  adapters fp32 and bf16, dropout 0 and 0.1, against cuBLAS ``x @ W.T`` (fwd) and ``G @ W`` (bwd);
* NF4 forward for M in 1 .. 1024: the fused-decode GEMM (small-M path) against the workspace path
  (dequantize + dense GEMM), to place ``fastlora.kernels.lora_linear.SMALL_M``; cuBLAS on the dense
  bf16 weight for reference.

Times are medians of ``triton.testing.do_bench`` (ms), after autotuning (first call per shape).
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
import triton

from fastlora import nf4
from fastlora.kernels import lora_linear as LL


def bench(fn) -> float:
    fn()  # autotune / compile
    return triton.testing.do_bench(fn, warmup=25, rep=100)


def dense(m=4096, k=4096, n=4096, r=16):
    dev = "cuda"
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k**0.5
    g = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
    t_fwd_ref = bench(partial(torch.matmul, x, w.T))
    t_bwd_ref = bench(partial(torch.matmul, g, w))
    flops = 2 * m * n * k
    print(f"cuBLAS x@W.T {t_fwd_ref:.3f} ms ({flops / t_fwd_ref / 1e9:.0f} TFLOP/s), G@W {t_bwd_ref:.3f} ms")
    for adt in (torch.float32, torch.bfloat16):
        a = (torch.randn(r, k, device=dev) / k**0.5).to(adt)
        b = (torch.randn(n, r, device=dev) * 0.01).to(adt)
        seed = torch.tensor(1234, device=dev)  # the launchers take the seed as an int64 tensor on the device
        for p in (0.0, 0.1):
            fwd = partial(LL.lora_linear_fwd, x, w, None, 64, "nf4", n, a, b, 2.0, None, p, seed, "linear")
            t_f = bench(fwd)
            _, s = fwd()
            bwd = partial(LL.lora_linear_bwd, g, x, s, w, None, 64, "nf4", n, a, b, 2.0, p, seed)
            t_b = bench(partial(bwd, True, True, True))
            t_bx = bench(partial(bwd, True, False, False))
            print(f"dense A={str(adt)[6:]:8s} p={p}: fwd {t_f:.3f} ms ({t_f / t_fwd_ref:.2f}x cuBLAS)  "
                  f"bwd {t_b:.3f} ms ({t_b / t_bwd_ref:.2f}x)  bwd dx only {t_bx:.3f} ms ({t_bx / t_bwd_ref:.2f}x)")


def nf4_sweep(ms, k=4096, n=4096, r=16):
    dev = "cuda"
    w = torch.randn(n, k, device=dev) / k**0.5
    q = nf4.quantize(w.cpu(), 64, "nf4", True).to(dev)
    packed, absmax = q.packed_bytes(), q.absmax_float()
    wd = w.to(torch.bfloat16)
    a = torch.randn(r, k, device=dev) / k**0.5
    b = torch.randn(n, r, device=dev) * 0.01
    saved = LL.SMALL_M
    try:
        for m in ms:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            no_seed = torch.zeros((), dtype=torch.int64, device=dev)
            fwd = partial(LL.lora_linear_fwd, x, packed, absmax, 64, "nf4", n, a, b, 2.0, None, 0.0, no_seed,
                          "linear4bit")
            LL.SMALL_M = 1 << 30
            t_fused = bench(fwd)
            LL.SMALL_M = 0
            t_ws = bench(fwd)
            t_ref = bench(partial(torch.matmul, x, wd.T))
            print(f"nf4 M={m:5d}: fused-decode {t_fused:.3f} ms  workspace {t_ws:.3f} ms  "
                  f"(cuBLAS bf16 dense {t_ref:.3f} ms)  -> {'fused' if t_fused < t_ws else 'workspace'}")
    finally:
        LL.SMALL_M = saved


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer M values in the NF4 sweep")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), "triton", triton.__version__)
    dense()
    nf4_sweep([1, 16, 64, 256] if args.quick else [1, 16, 32, 64, 128, 256, 512, 1024])


if __name__ == "__main__":
    main()
