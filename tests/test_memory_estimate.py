"""The memory suite (fastlora/bench/memory.py): the FakeTensorMode estimate against real runs at small
scale on the CPU, the 8B estimate without allocating, the CLI's bad input.

"Real" has two meanings here, both checked:
  * the same storage tracker on real tensors (same step, same accounting): the fake implementations
    reproduce every output's size and lifetime — must agree exactly;
  * the CPU allocator itself: torch.profiler(profile_memory=True) reports every allocation and free
    of the CPU allocator during the step, inside kernels too (fastlora's C++ tiles, bitsandbytes'
    dequantized weights); the real peak is the weights' bytes plus the peak of that running sum.
    The estimate, with the workspace model of the CPU kernels (fastlora/bench/op_workspace.py), must be
    within 10% of it (measured on one thread: see the test).
"""

from __future__ import annotations

import gc
import json
import resource
import subprocess
import sys
import tempfile

import pytest
import torch

from fastlora.bench import memory, memory_model
from fastlora.bench.memory_tracker import CATEGORIES
from fastlora.bench.op_workspace import cpu_workspace

TINY = memory_model.Shape(hidden=128, intermediate=384, layers=2, heads=4, kv_heads=2, vocab=512)


def _allocator_peak(shape, step, provider) -> int:
    """Peak bytes on the CPU allocator during one real step, plus the weights that exist before it."""
    import contextlib

    from torch.profiler import ProfilerActivity, profile

    import fastlora

    model = memory_model.build_peft_model(shape, step, fake=False)
    if provider == "fastlora":
        fastlora.patch(model)
    params = memory_model.trainable(model)
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=False)
    ids = memory_model.inputs(shape, step)
    tracker = memory.MemoryTracker()
    memory._register_weights(tracker, model)
    tracker.register(ids, "activations")
    before = tracker.peak
    gc.collect()  # garbage of earlier tests must not be freed (or kept) inside the measured window
    with contextlib.ExitStack() as stack:
        prof = stack.enter_context(profile(activities=[ProfilerActivity.CPU], profile_memory=True))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        del loss
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return before + peak


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("provider", memory.PROVIDERS)
def test_fake_estimate_equals_tracked_real_run(provider, checkpointing):
    step = memory_model.StepConfig(seq=96, rank=8, alpha=16, checkpointing=checkpointing, dtype=torch.float32)
    fake = memory.measure_step(TINY, step, provider, fake=True, workspace=None)
    real = memory.measure_step(TINY, step, provider, fake=False, workspace=None)
    assert fake.fallback_calls == real.fallback_calls == 0
    # the real run also checks its position ids for packed sequences (a few KiB, freed at once); the
    # fake run is told there is no packing (fastlora/bench/memory.py, _masks_as_in_eager)
    assert abs(fake.peak - real.peak) <= 4096
    assert abs(fake.decoder_peak - real.decoder_peak) <= 4096 and 0 < real.decoder_peak <= real.peak
    for category, nbytes in real.breakdown.items():
        assert abs(fake.breakdown[category] - nbytes) <= 4096, category


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("provider", memory.PROVIDERS)
def test_estimate_within_10_percent_of_cpu_allocator(provider, checkpointing):
    step = memory_model.StepConfig(seq=256, rank=8, alpha=16, checkpointing=checkpointing, dtype=torch.float32)
    # One CPU thread: fastlora's C++ kernels allocate their tiles per thread inside the kernel; with two
    # threads on this shared 2-core machine the second thread sometimes starts after the first has freed
    # its tiles, so the real peak varies from run to run. The estimate uses the workspace model of the
    # kernels that run here (op_workspace.cpu_workspace), not the GPU one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        estimate = memory.measure_step(TINY, step, provider, fake=True, workspace=cpu_workspace).peak
        outputs_only = memory.measure_step(TINY, step, provider, fake=True, workspace=None).peak
        measured = _allocator_peak(TINY, step, provider)
    finally:
        torch.set_num_threads(threads)
    assert abs(estimate - measured) <= 0.10 * measured, (estimate, measured)
    if provider == "fastlora":  # the check sees the kernels' internal memory: without its model it fails
        assert outputs_only < 0.9 * measured, (outputs_only, measured)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _expected_weight_bytes(shape: memory_model.Shape, dtype_bytes: int = 2) -> int:
    """bitsandbytes' bytes for every projection (nf4, double quant, blocksize 64) plus the bf16
    embedding, lm_head and norms, written out independently of the model code."""
    h, i, kv = shape.hidden, shape.intermediate, shape.hidden // shape.heads * shape.kv_heads
    total = 0
    for n, k in [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]:
        blocks = -(-n * k // 64)
        total += (n * k + 1) // 2 + blocks + 4 * -(-blocks // 256) + 4 * 256 + 4 * 16 + 4
    total *= shape.layers
    total += shape.vocab * h * dtype_bytes * (1 if shape.tie_embeddings else 2)
    total += (2 * shape.layers + 1) * h * dtype_bytes
    return total


def test_8b_estimate_allocates_nothing_and_runs_fastlora_ops():
    shape = memory_model.PRESETS["llama-3-8b"]
    step = memory_model.StepConfig(seq=2048)
    gc.collect()
    rss = _rss()
    results = {p: memory.measure_step(shape, step, p) for p in memory.PROVIDERS}
    assert _rss() - rss < 1.5 * 2**30  # a real 8B step would need tens of GiB
    for r in results.values():
        # + the rotary inv_freq buffer (head_dim / 2 floats)
        expected = _expected_weight_bytes(shape)
        assert expected <= r.breakdown["parameters"] <= expected + 4096
        assert r.peak == sum(r.breakdown.values())
    fast, peft = results["fastlora"], results["peft+bnb"]
    assert fast.fallback_calls == 0 and fast.namespaces.get("fastlora", 0) >= 7 * shape.layers * 2
    assert peft.namespaces.get("fastlora", 0) == 0 and peft.namespaces.get("bitsandbytes", 0) >= 7 * shape.layers
    # LoRA r=16 on all projections, fp32: parameters and their gradients at least
    rank = step.rank
    h, i, kv = shape.hidden, shape.intermediate, shape.hidden // shape.heads * shape.kv_heads
    adapter = 4 * rank * shape.layers * sum(n + k for n, k in [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h),
                                                                   (h, i)])
    for r in results.values():
        assert adapter <= r.breakdown["adapters+optimizer"] <= 4 * adapter
    # issue 6's target in exactly its configuration (StepConfig's defaults are the target's)
    assert {k: getattr(step, k) for k in ("seq", "batch", "rank", "lora_dropout", "checkpointing")} == \
        {k: v for k, v in memory.TARGET_CONFIG.items() if k != "model"}
    assert fast.peak <= memory.TARGET_RATIO * peft.peak, fast.peak / peft.peak
    assert memory.target_verdict([{**memory.TARGET_CONFIG, "ratio": fast.peak / peft.peak}]).endswith(": met")
    assert 0 < fast.decoder_peak < peft.decoder_peak <= peft.peak


def test_gpu_workspace_model():
    pytest.importorskip("bitsandbytes")  # registers torch.ops.bitsandbytes
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastlora.bench.op_workspace import gpu_workspace

    m, n, k, r = 4096, 14336, 4096, 16
    with FakeTensorMode():
        x = torch.empty(m, k, dtype=torch.bfloat16)
        packed = torch.empty(n * k // 2, 1, dtype=torch.uint8)
        absmax8 = torch.empty(n * k // 64, dtype=torch.uint8)
        absmax2 = torch.empty(n * k // 64 // 256)
        y = torch.empty(m, n, dtype=torch.bfloat16)
        gemm = torch.ops.bitsandbytes.gemm_4bit.default
        got = gpu_workspace(gemm, (x, packed, [n, k], absmax2, 64, "nf4"), {"absmax_8bit": absmax8}, y)
        assert got == n * k * 2 + 2 * 4 * (n * k // 64)  # decoded weight + float32 absmax twice
        assert gpu_workspace(gemm, (x, packed, [n, k], absmax2, 64, "nf4"), {}, y) == n * k * 2
        fwd = torch.ops.fastlora.lora_linear_fwd.default
        a, b = torch.empty(r, k), torch.empty(n, r)
        absmax = torch.empty(n * k // 64)
        args = (x, packed, absmax, 64, "nf4", n, a, b, 2.0, None, 0.0, 0, "linear4bit")
        outs = (y, torch.empty(m, r))
        # bf16 x, fp32 adapters: the adapter GEMMs over bf16 pieces (kernels/adapter_gemms.py)
        assert gpu_workspace(fwd, args, {}, outs) == n * k * 2 + m * n * 2  # decoded weight + bf16 LoRA term
        linear = (*args[:12], "linear")
        assert gpu_workspace(fwd, linear, {}, outs) == n * k * 2  # the LoRA term is added in place
        dense = torch.empty(n, k, dtype=torch.bfloat16)
        dropout = (x, dense, None, *args[3:10], 0.1, 0, "linear")
        assert gpu_workspace(fwd, dropout, {}, outs) == m * k * 3 + m * 3 * r * 4  # keep mask, x·keep, x·A's pieces
        # 16-bit adapters: fp32 GEMMs on a widened x
        a16 = torch.empty(r, k, dtype=torch.bfloat16)
        no_copy = (x, dense, None, *args[3:6], a16, b.bfloat16(), *args[8:10], 0.0, *args[11:])
        assert gpu_workspace(fwd, no_copy, {}, outs) == m * k * 4  # x has the adapters' dtype: only the fp32 widening
        no_copy_dropout = (*no_copy[:10], 0.1, *no_copy[11:])
        assert gpu_workspace(fwd, no_copy_dropout, {}, outs) == m * k * 2 + m * k * 4  # dropout's output, widened
        bwd = torch.ops.fastlora.lora_linear_bwd.default
        s = torch.empty(m, r)
        grads = (torch.empty(m, k, dtype=torch.bfloat16), torch.empty(r, k), torch.empty(n, r))
        bwd_args = (y, x, s, packed, absmax, 64, "nf4", n, a, b, 2.0, 0.0, 0, True, True, True)
        ds = m * r * 4
        assert gpu_workspace(bwd, bwd_args, {}, grads) == ds + n * k * 2  # W; dS·A is added into G·W (dx)
        bwd_dropout = (*bwd_args[:11], 0.1, *bwd_args[12:])
        dx_phase = ds + n * k * 2 + m * k * 2 + 2 * m * k * 4  # W, G·W, dS·A fp32 and its dropout, their fp32 sum
        assert gpu_workspace(bwd, bwd_dropout, {}, grads) == dx_phase
        da_only = (*bwd_dropout[:13], False, True, False)
        assert gpu_workspace(bwd, da_only, {}, grads) == ds + m * k * 3 + 3 * r * k * 4 + r * k * 4
        s16, g16 = torch.empty(m, r, dtype=torch.bfloat16), (grads[0], torch.empty(r, k, dtype=torch.bfloat16))
        bwd16 = (y, x, s16, packed, absmax, 64, "nf4", n, a16, b.bfloat16(), 2.0, 0.1, 0, True, True, True)
        dx_phase = ds + n * k * 2 + 2 * m * k * 4 + m * k * 2 + m * k * 4  # W, dS·A and dropout, G·W, fp32 sum
        ds_db_phase, da_phase = m * n * 4 + ds + n * r * 4, ds + m * k * 2 + m * k * 4 + r * k * 4  # G fp32; x fp32
        assert gpu_workspace(bwd, bwd16, {}, (*g16, torch.empty(n, r))) == max(ds_db_phase, dx_phase, da_phase)
        assert gpu_workspace(torch.ops.aten.mm.default, (x, x.t()), {}, torch.empty(m, m)) == 0


def _cli(*args):
    # in a fresh folder: a run appends its rows to ./fastlora-bench-results
    return subprocess.run([sys.executable, "-m", "fastlora", "bench", *args], capture_output=True, text=True,
                          timeout=300, cwd=tempfile.mkdtemp(prefix="fastlora-bench-test-"))


def test_cli_bad_input(capsys):
    from fastlora.bench import main

    assert main(["--suite", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown suite 'nope'" in err and "memory" in err
    with pytest.raises(SystemExit) as exc:
        main(["--suite", "memory", "--model", "gpt-9"])
    assert exc.value.code == 2
    assert "invalid choice: 'gpt-9'" in capsys.readouterr().err
    for bad in (["--seq", "0"], ["--lora-dropout", "1.5"], ["--checkpointing", "maybe"]):
        with pytest.raises(SystemExit) as exc:
            main(["--suite", "memory", *bad])
        assert exc.value.code == 2
        assert "error" in capsys.readouterr().err
    assert main(["--suite", "memory", "--output", "/nonexistent/dir/out.json"]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--suite", "memory", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in ("--model", "--seq", "--batch", "--rank", "--alpha", "--lora-dropout", "--checkpointing",
                   "--output", "--suite"):
        assert option in out


def test_cli_runs_and_writes_json(tmp_path):
    out = tmp_path / "memory.json"
    proc = _cli("--suite", "memory", "--model", "llama-3.2-1b", "--seq", "128", "--checkpointing", "off",
                "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "estimating llama-3.2-1b seq=128" in proc.stderr  # progress
    # third-party noise (fastlora/_quiet.py): transformers' FutureWarnings, bitsandbytes' log about the hub kernels
    assert "Warning" not in proc.stderr and "kernels-community" not in proc.stderr, proc.stderr
    assert f"results written to {out}" in proc.stdout
    assert "peft+bnb" in proc.stdout and "fastlora" in proc.stdout and "ratio" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 1 and rows[0]["seq"] == 128 and rows[0]["checkpointing"] is False
    peaks = {p: rows[0]["providers"][p]["peak"] for p in memory.PROVIDERS}
    assert rows[0]["ratio"] == pytest.approx(peaks["fastlora"] / peaks["peft+bnb"])


def _estimated_row(ratio: float, model="llama-3-8b", seq=2048, checkpointing=False) -> dict:
    """A row as memory.estimate returns it, with fastlora's peak ``ratio`` x PEFT's."""
    def provider(peak):
        breakdown = dict.fromkeys(CATEGORIES, peak // len(CATEGORIES))
        return {"peak": sum(breakdown.values()), "decoder_peak": peak // 2, "breakdown": breakdown}

    providers = {"peft+bnb": provider(40 * 2**30), "fastlora": provider(int(ratio * 40 * 2**30))}
    return {"model": model, "seq": seq, "batch": 1, "rank": 16, "alpha": 32, "lora_dropout": 0.0,
            "checkpointing": checkpointing, "providers": providers,
            "ratio": providers["fastlora"]["peak"] / providers["peft+bnb"]["peak"]}


@pytest.mark.parametrize("rows, verdict", [
    ([_estimated_row(0.61), _estimated_row(0.5, seq=8192)], "0.610x; target <= 0.75x: met"),
    ([_estimated_row(0.75)], "0.750x; target <= 0.75x: met"),
    ([_estimated_row(0.5, checkpointing=True), _estimated_row(0.8)], "0.800x; target <= 0.75x: MISSED"),
    ([_estimated_row(0.5, seq=8192), _estimated_row(0.9, checkpointing=True)], None),  # not the target's config
    ([_estimated_row(0.9, model="llama-3.2-1b")], None),
])
def test_suite_prints_the_targets_verdict(rows, verdict, tmp_path, monkeypatch, capsys):
    from fastlora.bench import main

    monkeypatch.setattr(memory, "estimate", lambda *a, **k: rows)
    assert main(["--suite", "memory", "--results", str(tmp_path / "res")]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "target <=" in line]
    if verdict is None:
        assert lines == []
    else:
        assert lines == ["llama-3-8b seq 2048, batch 1, r=16, no checkpointing: fastlora / PEFT+bitsandbytes peak "
                         + verdict]


def test_suite_without_output_prints_only_paths_that_stay(tmp_path, monkeypatch, capsys):
    """Without --output the suite once printed "results written to /tmp/tmpXXXX/memory.json", a scratch file
    deleted right after. Now as the other suites: the results folder, and --output only when given."""
    from fastlora.bench import main
    from fastlora.bench import results as bench_results

    monkeypatch.setattr(memory, "estimate", lambda *a, **k: [_estimated_row(0.6)])
    res = tmp_path / "res"
    assert main(["--suite", "memory", "--results", str(res)]) == 0
    out = capsys.readouterr().out
    assert "results written to" not in out and "memory.json" not in out
    assert f"4 result rows appended to {res / bench_results.CSV_NAME}" in out
    rows = bench_results.load_json(res / bench_results.JSON_NAME)
    assert {(r["provider"], r["metric"]) for r in rows} == {(p, m) for p in memory.PROVIDERS
                                                             for m in ("step peak", "decoder peak")}
    own = tmp_path / "own.json"
    assert main(["--suite", "memory", "--results", str(res), "--output", str(own)]) == 0
    assert f"results written to {own}" in capsys.readouterr().out
    assert json.loads(own.read_text())["rows"][0]["ratio"] == pytest.approx(0.6)
    assert len(bench_results.load_json(res / bench_results.JSON_NAME)) == 8


def test_main_entry_dispatches_bench(capsys):
    from fastlora.__main__ import main

    assert main(["bench", "--suite", "kernelz"]) == 2
    assert "unknown suite 'kernelz'" in capsys.readouterr().err
