"""bf16 activations on the CPU: fastlora's bf16 GEMM mode vs its fp32 GEMM mode vs the bf16 dense floor
vs PEFT + bitsandbytes, one QLoRA projection forward + backward (gradients for x, lora_A, lora_B).

    python bench/bench_lora_cpu_bf16.py [--rounds 5] [--quick] [--no-peft]

Problem (bench/lora_setup.py): 1024 tokens, 4096->4096 and 4096->14336, r=16, NF4 double quant
(blocksize 64), bf16 x, fp32 adapters, lora_dropout 0. The modes are switched with
FASTLORA_CPU_BF16_GEMM (read on every call). The machine may be shared: each round runs every case
once, back to back, when the CPUs look idle; the table shows the minimum over rounds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lora_setup as ls  # noqa: E402
from bench_lora_cpu import busy_fraction  # noqa: E402


def with_mode(mode: str, fn):
    def run():
        old = os.environ.get("FASTLORA_CPU_BF16_GEMM")
        os.environ["FASTLORA_CPU_BF16_GEMM"] = mode
        try:
            fn()
        finally:
            if old is None:
                del os.environ["FASTLORA_CPU_BF16_GEMM"]
            else:
                os.environ["FASTLORA_CPU_BF16_GEMM"] = old
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="128 tokens, small shapes")
    ap.add_argument("--no-peft", action="store_true")
    ap.add_argument("--max-tries", type=int, default=600, help="give up waiting for quiet rounds after this many")
    ap.add_argument("--max-busy", type=float, default=0.06, help="run a round only below this CPU busy fraction")
    args = ap.parse_args()
    tokens, shapes = ls.QUICK if args.quick else ls.FULL
    bf16 = torch.bfloat16
    from fastlora import _extension
    ext = _extension.load()
    print("cpu features:", list(ext.cpu_features()) if ext is not None else "extension not built")
    for k, n in shapes:
        p = ls.make_problem(tokens, k, n, keep_dense=True)
        cases = {
            "floor bf16 (torch.mm)": ls.floor_fn(p, bf16),
            "floor fp32 (torch.mm)": ls.floor_fn(p, torch.float32),
            "fastlora bf16 GEMM mode": with_mode("1", ls.fastlora_step(p, bf16, 0.0, "cpp")),
            "fastlora fp32 GEMM mode": with_mode("0", ls.fastlora_step(p, bf16, 0.0, "cpp")),
        }
        if not args.no_peft and ls.peft_unavailable() is None:
            cases["peft lora.bnb.Linear4bit"] = ls.peft_step(p, bf16)
        for fn in cases.values():
            fn()
        best = {name: float("inf") for name in cases}
        done = tries = 0
        while done < args.rounds and tries < args.max_tries:
            tries += 1
            if busy_fraction() > args.max_busy:
                time.sleep(0.5)
                continue
            for name, fn in cases.items():
                t0 = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - t0)
            done += 1
        ref = best["floor bf16 (torch.mm)"]
        print(f"M={tokens} {k}->{n} r={ls.RANK}, {torch.get_num_threads()} threads, {done} quiet rounds of {tries}; "
              f"fwd+bwd ms (min)")
        for name, t in best.items():
            print(f"  {name:28s} {t * 1e3:8.1f}  ({t / ref:.2f}x the bf16 floor)")


if __name__ == "__main__":
    main()
