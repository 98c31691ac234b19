"""``python -m fastlora bench --suite memory``: the peak memory of one QLoRA training step at real
model scale, estimated on this CPU without the hardware.

The step (:mod:`fastlora.bench.memory_model`: Llama shape, NF4 bitsandbytes projections, PEFT LoRA on
all seven projections, forward with labels, backward, AdamW step) runs under ``FakeTensorMode``:
every tensor is a fake one — shapes, dtypes, strides, no data — so nothing is allocated, and every
operator runs its fake implementation (fastlora's custom ops and bitsandbytes' ops have one). A
:class:`fastlora.bench.memory_tracker.MemoryTracker` counts the bytes of every storage from the op
that creates it until its last reference dies, and adds the modelled in-kernel workspaces of the
4-bit GEMMs on a GPU (:mod:`fastlora.bench.op_workspace`). Two providers run the same model bytes:
``peft+bnb`` (PEFT's lora.bnb.Linear4bit over bitsandbytes) and ``fastlora`` (the same model after
``fastlora.patch``).

Checked at small scale on this CPU (tests/test_memory_estimate.py): the fake run equals the same
tracker on real tensors, and, with the CPU kernels' workspace model, the CPU allocator's measured peak
within 10%.

What it does not model: allocator rounding and fragmentation (a CUDA caching allocator adds some
percent), the CUDA context and cuBLAS workspaces (the same for both), and kernels' internal memory
other than the modelled 4-bit GEMMs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import asdict, dataclass

import torch

from . import memory_model, results
from .arg_types import dropout_probability, positive_int
from .memory_tracker import CATEGORIES, MemoryTracker
from .op_workspace import gpu_workspace

PROVIDERS = ("peft+bnb", "fastlora")
GiB = 2**30
# issue 6's target: fastlora's peak <= 0.75x PEFT + bitsandbytes' in this configuration (the suite's defaults)
TARGET_CONFIG = {"model": "llama-3-8b", "seq": 2048, "batch": 1, "rank": 16, "lora_dropout": 0.0,
                 "checkpointing": False}
TARGET_RATIO = 0.75


@dataclass
class StepMemory:
    """The peak of one training step and its breakdown (bytes)."""

    provider: str
    peak: int
    breakdown: dict
    peak_op: str
    ops: int
    namespaces: dict
    fallback_calls: int
    seconds: float
    decoder_peak: int = 0  # the peak while a decoder layer runs (forward, backward or recompute)


def _warm_fusion_check(step: memory_model.StepConfig) -> None:
    """fastlora.patch verifies once per class, on two real tokens, that a gated MLP block computes
    down(act(gate(x)) * up(x)); fake tensors have no values to compare, so verify the class on a tiny
    real model of the same architecture first (the verdict is cached per class)."""
    import fastlora

    tiny = memory_model.Shape(hidden=64, intermediate=128, layers=1, heads=4, kv_heads=2, vocab=64)
    small = memory_model.StepConfig(seq=4, rank=4, alpha=8, dtype=step.dtype)
    with torch.random.fork_rng():
        model = memory_model.build_peft_model(tiny, small, fake=False)
    fastlora.patch(model).unpatch()


@contextlib.contextmanager
def _masks_as_in_eager():
    """transformers treats a fake tensor as tracing and then always builds the (seq, seq) causal mask,
    which also turns off SDPA's GQA path (k and v repeated per head). On real tensors without padding
    it passes no mask and ``is_causal=True`` (``_ignore_causal_mask_sdpa``). While the fake step runs,
    take that decision the way it is taken on real tensors for the no-padding case (the only one the
    step has); anything else goes to transformers' own test. Likewise the packed-sequence test (it
    cannot read fake position ids): the step's rows are single unpacked sequences."""
    from transformers import masking_utils

    original = masking_utils._ignore_causal_mask_sdpa
    original_packed = masking_utils.find_packed_sequence_indices

    def ignore_causal_mask(padding_mask, q_length, kv_length, q_offset, kv_offset, local_attention_size=None):
        if padding_mask is None and local_attention_size is None and not isinstance(q_offset, torch.Tensor) \
                and (q_length == 1 or q_length == kv_length):
            return True
        return original(padding_mask, q_length, kv_length, q_offset, kv_offset, local_attention_size)

    masking_utils._ignore_causal_mask_sdpa = ignore_causal_mask
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils._ignore_causal_mask_sdpa = original
        masking_utils.find_packed_sequence_indices = original_packed


def _register_weights(tracker: MemoryTracker, model: torch.nn.Module) -> None:
    for p in model.parameters():
        tracker.register(p, "adapters+optimizer" if p.requires_grad else "parameters")
    for b in model.buffers():
        tracker.register(b, "parameters")
    for module in model.modules():  # the 4-bit statistics live on the quant state, not as parameters
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is None:
            continue
        for t in (state.absmax, state.code, state.offset):
            if isinstance(t, torch.Tensor):
                tracker.register(t, "parameters")
        if state.state2 is not None:
            tracker.register(state.state2.absmax, "parameters")
            tracker.register(state.state2.code, "parameters")


def measure_step(shape: memory_model.Shape, step: memory_model.StepConfig, provider: str, *, fake: bool = True,
                 workspace=gpu_workspace) -> StepMemory:
    """Run one training step of ``provider`` ("peft+bnb" or "fastlora") and return its tracked peak.
    ``fake=True``: under FakeTensorMode (the estimate); ``fake=False``: on real CPU tensors (the check)."""
    from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
    from torch.distributed._tools.mod_tracker import ModTracker

    import fastlora

    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    if provider == "fastlora" and fake:
        _warm_fusion_check(step)
    start = time.perf_counter()
    mode = FakeTensorMode() if fake else contextlib.nullcontext()
    with mode:
        model = memory_model.build_peft_model(shape, step, fake=fake)
        handle = None
        if provider == "fastlora":
            # patch probes activations on small real tensors of its own: outside the fake mode (the
            # model's fake tensors still dispatch to the fake mode they belong to)
            with unset_fake_temporarily() if fake else contextlib.nullcontext():
                handle = fastlora.patch(model)
        params = memory_model.trainable(model)
        optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=False)
        ids = memory_model.inputs(shape, step)
        modules = ModTracker()

        def region() -> str | None:
            return "decoder" if any(".layers." in name for name in modules.parents) else None

        tracker = MemoryTracker(workspace, region)
        _register_weights(tracker, model)
        tracker.register(ids, "activations")
        hooks = [p.register_post_accumulate_grad_hook(lambda p: tracker.retag(p.grad, "adapters+optimizer"))
                 for p in params]
        with _masks_as_in_eager() if fake else contextlib.nullcontext(), modules, tracker:
            tracker.phase = "forward"
            loss = model(input_ids=ids, labels=ids).loss  # as Trainer: only the loss outlives the forward
            tracker.phase = "backward"
            loss.backward()
            del loss
            tracker.phase = "optimizer"
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        for h in hooks:
            h.remove()
        fallbacks = sum(handle.report()["fallback_calls"].values()) if handle is not None else 0
    return StepMemory(provider=provider, peak=tracker.peak, breakdown=dict(tracker.peak_breakdown),
                      peak_op=tracker.peak_op or "", ops=tracker.ops,
                      namespaces=dict(tracker.namespaces), fallback_calls=fallbacks,
                      seconds=time.perf_counter() - start, decoder_peak=tracker.region_peaks.get("decoder", 0))


def estimate(model: str, seqs=(2048, 8192), checkpointing=(False, True), *, batch: int = 1, rank: int = 16,
             alpha: int = 32, lora_dropout: float = 0.0, progress=None) -> list[dict]:
    """Estimated peaks of both providers for every (seq, checkpointing) of the preset ``model``; one
    row per configuration: config, peaks and breakdowns in bytes, ratio = fastlora / peft+bnb."""
    if model not in memory_model.PRESETS:
        raise ValueError(f"model must be one of {sorted(memory_model.PRESETS)}, got {model!r}")
    shape = memory_model.PRESETS[model]
    rows = []
    for ckpt in checkpointing:
        for seq in seqs:
            step = memory_model.StepConfig(seq=seq, batch=batch, rank=rank, alpha=alpha, lora_dropout=lora_dropout,
                                           checkpointing=ckpt)
            measured = {}
            for provider in PROVIDERS:
                if progress is not None:
                    progress(f"estimating {model} seq={seq} batch={batch} checkpointing={'on' if ckpt else 'off'} "
                             f"{provider} ...")
                measured[provider] = measure_step(shape, step, provider)
            rows.append({"model": model, "seq": seq, "batch": batch, "rank": rank, "alpha": alpha,
                         "lora_dropout": lora_dropout, "checkpointing": ckpt,
                         "providers": {p: asdict(r) for p, r in measured.items()},
                         "ratio": measured["fastlora"].peak / measured["peft+bnb"].peak})
    return rows


def format_rows(rows: list[dict]) -> str:
    head = (f"{'model':<13}{'seq':>6}{'ckpt':>5}  {'provider':<9}{'peak GiB':>9}{'ratio':>7}{'decoder GiB':>12}"
            f"{'ratio':>7}  " + "".join(f"{c:>19}" for c in CATEGORIES))
    lines = [head, "-" * len(head)]
    for row in rows:
        base = row["providers"]["peft+bnb"]
        for provider in PROVIDERS:
            r = row["providers"][provider]
            cells = "".join(f"{r['breakdown'][c] / GiB:>19.2f}" for c in CATEGORIES)
            ratio = f"{r['peak'] / base['peak']:>7.3f}" if provider != "peft+bnb" else " " * 7
            dratio = f"{r['decoder_peak'] / base['decoder_peak']:>7.3f}" if provider != "peft+bnb" else " " * 7
            ckpt = "on" if row["checkpointing"] else "off"
            lines.append(f"{row['model']:<13}{row['seq']:>6}{ckpt:>5}  {provider:<9}{r['peak'] / GiB:>9.2f}{ratio}"
                         f"{r['decoder_peak'] / GiB:>12.2f}{dratio}  {cells}")
    lines.append("peak: the step's peak (bytes live + modelled kernel workspace); ratio: fastlora / PEFT+bitsandbytes. "
                 "decoder: the peak while a decoder layer runs (its forward, backward or recomputation), i.e. "
                 "leaving out the LM head and the loss. Breakdown columns (GiB) at each provider's peak.")
    return "\n".join(lines)


def target_verdict(rows: list[dict]) -> str | None:
    """The line saying whether the target is met, from the row of :data:`TARGET_CONFIG`; None if not estimated."""
    for row in rows:
        if all(row[key] == value for key, value in TARGET_CONFIG.items()):
            verdict = "met" if row["ratio"] <= TARGET_RATIO else "MISSED"
            return (f"{row['model']} seq {row['seq']}, batch {row['batch']}, r={row['rank']}, no checkpointing: "
                    f"fastlora / PEFT+bitsandbytes peak {row['ratio']:.3f}x; target <= {TARGET_RATIO}x: {verdict}")
    return None


def to_rows(rows: list[dict]) -> list[dict]:
    """:func:`estimate`'s rows as result rows (:mod:`fastlora.bench.results`): one per provider and peak."""
    out = []
    for r in rows:
        shape = f"{r['model']} seq{r['seq']} b{r['batch']} r{r['rank']} ckpt {'on' if r['checkpointing'] else 'off'}"
        for provider, m in r["providers"].items():
            role = "fastlora" if provider == "fastlora" else "peer"
            for metric, key in (("step peak", "peak"), ("decoder peak", "decoder_peak")):
                out.append(results.row("train_step memory", provider, role, shape, "bf16", metric, m[key], "bytes",
                                       device="estimate (FakeTensorMode, CUDA workspaces)",
                                       breakdown=m["breakdown"] if key == "peak" else {}))
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="llama-3-8b", choices=sorted(memory_model.PRESETS),
                        help="model shape preset (Llama architecture, built from a config, nothing downloaded); "
                             "default llama-3-8b")
    parser.add_argument("--seq", type=positive_int, nargs="+", default=[2048, 8192],
                        help="sequence length(s) in tokens; default 2048 8192")
    parser.add_argument("--batch", type=positive_int, default=1, help="sequences per step; default 1")
    parser.add_argument("--rank", type=positive_int, default=16,
                        help="LoRA rank r on all seven projections; default 16")
    parser.add_argument("--alpha", type=positive_int, default=32, help="LoRA alpha; default 32")
    parser.add_argument("--lora-dropout", type=dropout_probability, default=0.0,
                        help="LoRA dropout p; default 0 (PEFT's)")
    parser.add_argument("--checkpointing", choices=("off", "on", "both"), default="both",
                        help="gradient checkpointing of the decoder layers; default both")


def run(args) -> int:
    """The memory suite of ``fastlora bench``: estimate, print the table and the target's verdict, append result
    rows to ``args.rows``; with ``--output``, also this run's estimates (breakdowns, peak ops) as JSON there."""
    ckpt = {"off": (False,), "on": (True,), "both": (False, True)}[args.checkpointing]

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    rows = estimate(args.model, tuple(args.seq), ckpt, batch=args.batch, rank=args.rank, alpha=args.alpha,
                    lora_dropout=args.lora_dropout, progress=progress)
    print(format_rows(rows))
    print("Estimated under FakeTensorMode on this CPU (nothing allocated); in-kernel workspaces of the 4-bit GEMMs "
          "modelled as on a CUDA GPU; bf16 model, fp32 adapters, AdamW, SDPA attention.")
    verdict = target_verdict(rows)
    if verdict is not None:
        print(verdict)
    args.rows.extend(to_rows(rows))
    if args.output is not None:
        payload = {"suite": "memory", "torch": torch.__version__, "rows": rows}
        args.output.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"results written to {args.output}")
    return 0
