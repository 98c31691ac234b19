"""One QLoRA training step on a GPU, the way users train: a Llama loaded with transformers'
``BitsAndBytesConfig`` (nf4, double quant, bf16 compute; bitsandbytes quantizes it on the GPU), PEFT LoRA
r=16 on all seven projections (fp32 adapters), AdamW. Side by side in one run: PEFT + bitsandbytes, the
same model after ``fastlora.patch``, and the floor (the same Llama dense bf16 and frozen, no adapters:
``train_setup.floor_model``, what any implementation that leaves the GEMMs to cuBLAS must still run).
Reports the median step time, the ratios, the peak GPU memory of a step, and the loss of the first step
(both providers start from the same weights: the losses differ by bf16 rounding and their dropout masks).

    python bench/bench_train_gpu.py [--hidden 2048 --intermediate 5632 --layers 4 --batch 4 --seq 1024]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_setup  # noqa: E402

import fastlora  # noqa: E402


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(step, ids, device: str, warmup: int, steps: int) -> tuple[float, float, float]:
    """(median step ms, peak GPU MiB during a step or nan on CPU, first loss)."""
    first = float(step(ids))
    for _ in range(warmup):
        step(ids)
    sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        step(ids)
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device == "cuda" else float("nan")
    return statistics.median(times), peak, first


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048, help="hidden size (default: %(default)s)")
    parser.add_argument("--intermediate", type=int, default=5632, help="MLP width (default: %(default)s)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (default: %(default)s)")
    parser.add_argument("--heads", type=int, default=16, help="attention heads (default: %(default)s)")
    parser.add_argument("--kv-heads", type=int, default=4, help="key/value heads (default: %(default)s)")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step (default: %(default)s)")
    parser.add_argument("--seq", type=int, default=1024, help="tokens per sequence (default: %(default)s)")
    parser.add_argument("--dropout", type=float, default=0.05, help="lora_dropout (default: %(default)s)")
    parser.add_argument("--checkpointing", action="store_true",
                        help="gradient checkpointing on (prepare_model_for_kbit_training's default)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per provider (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per provider (default: %(default)s)")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu to check the script (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU here (use --device cpu to check the script)")

    spec = train_setup.Spec(hidden=args.hidden, intermediate=args.intermediate, layers=args.layers, heads=args.heads,
                            kv_heads=args.kv_heads, vocab=args.vocab, batch=args.batch, seq=args.seq)
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"QLoRA train step on {where}: {spec.describe()}, r=16 all seven projections, dropout {args.dropout}, "
          f"checkpointing {'on' if args.checkpointing else 'off'}, bf16", flush=True)
    ids = train_setup.token_batch(spec).to(args.device)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        train_setup.base_model(spec, torch.bfloat16).save_pretrained(tmp)
        for name in train_setup.PROVIDERS:
            model = train_setup.qlora_from_pretrained(tmp, args.device, checkpointing=args.checkpointing,
                                                      dropout=args.dropout, b_std=0.01)
            if name == "fastlora":
                handle = fastlora.patch(model)
                print(f"  {handle.summary()}", flush=True)
            rows[name] = time_steps(train_setup.TrainStep(model), ids, args.device, args.warmup, args.steps)
            if name == "fastlora":
                fallbacks = handle.report()["fallback_calls"]
                if fallbacks:
                    print(f"  fallback calls: {fallbacks}", flush=True)
            print(f"  {name}: {rows[name][0]:.1f} ms", flush=True)
            del model
        floor = train_setup.floor_model(spec, torch.bfloat16).to(args.device)
        if args.checkpointing:  # the same recomputation as the providers (non-reentrant: no input needs grad)
            floor.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        rows[train_setup.FLOOR] = time_steps(train_setup.TrainStep(floor), ids, args.device, args.warmup, args.steps)
    peft_ms = rows["peft+bnb"][0]
    print(f"\n{'provider':<10} {'step ms':>9} {'PEFT/this':>10} {'peak MiB':>9} {'first loss':>11}")
    for name, (ms, peak, loss) in rows.items():
        print(f"{name:<10} {ms:9.1f} {peft_ms / ms:9.2f}x {peak:9.0f} {loss:11.5f}")
    print(f"fastlora / floor: {rows['fastlora'][0] / rows[train_setup.FLOOR][0]:.2f}x; peak memory fastlora / PEFT: "
          f"{rows['fastlora'][1] / rows['peft+bnb'][1]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
