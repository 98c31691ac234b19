"""``python -m fastlora bench --suite offload``: the ledger's accounting on a hand-counted graph and against the
saved-tensor count of :func:`fastlora.bench.train_setup.saved_for_backward`, the suite on the tiny model (rows,
bytes kept with and without save_on_cpu / checkpointing, losses and gradients), and bad input."""

from __future__ import annotations

import pytest
import torch

from fastlora.__main__ import main
from fastlora.bench import offload
from fastlora.bench import train_setup as ts
from fastlora.ops import _dropout_seed

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

TINY = ts.PRESETS["tiny"]
LORA_PROJECTIONS = 7 * TINY.layers


def test_ledger_counts_a_hand_made_graph():
    # y = x * w saves w (x's gradient needs it; w needs none, so x is not saved); x and w exist before and are
    # never counted; z = sin(y) saves y; the sum saves no tensor.
    x = torch.randn(8, 16, requires_grad=True)
    w = torch.randn(8, 16)
    ledger = offload.StorageLedger([x, w], x.device)
    with ledger:
        y = x * w
        loss = y.sin().sum()
    del y  # only the graph holds y now
    live = ledger.live()
    assert (live["device"], live["host"], live["host weights"]) == (8 * 16 * 4 + 4, 0, 0)  # y and the loss

    ledger = offload.StorageLedger([x, w], x.device)
    with ledger, offload.CountingSaveOnCpu(ledger, pin_memory=False):
        y = x * w
        loss_offloaded = y.sin().sum()
    del y
    live = ledger.live()
    # y went to host memory, the copy of w is booked apart, only the loss stays
    assert (live["device"], live["host"], live["host weights"]) == (4, 8 * 16 * 4, 8 * 16 * 4)
    (g0,) = torch.autograd.grad(loss, x)
    (g1,) = torch.autograd.grad(loss_offloaded, x)
    assert torch.equal(g0, g1)


@pytest.mark.parametrize("provider", offload.PROVIDERS)
def test_plain_kept_bytes_are_the_saved_tensors_plus_the_loss(provider):
    # An independent count: the unique storages saved_tensors_hooks see in one forward (train_setup), plus the
    # 4-byte loss the ledger also sees alive.
    base = ts.peft_model(TINY, rank=16, alpha=16, b_std=offload.B_STD)
    ids = ts.token_batch(TINY, seed=1)
    fresh = (lambda: ts.patched_copy(base)[0]) if provider == "fastlora" else (lambda: offload.copy.deepcopy(base))
    saved = ts.saved_for_backward(fresh(), ids)
    r = offload.measure(fresh(), ids, "plain")
    assert r["kept"] == saved["bytes"] + 4
    assert r["storages"]["device"] == saved["storages"] + 1


@pytest.fixture(scope="module")
def suite_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("offload")
    out = tmp_path / "run.json"
    status = main(["bench", "--suite", "offload", "--quick", "--results", str(tmp_path / "res"),
                   "--output", str(out)])
    rows = offload.results.load_json(tmp_path / "res" / offload.results.JSON_NAME)
    return status, rows


def _metric(rows, provider, mode, metric):
    (r,) = [r for r in rows if r["provider"] == provider and r["extra"]["mode"] == mode and r["metric"] == metric]
    return r


def test_suite_rows(suite_run):
    status, rows = suite_run
    assert status == 0
    assert {r["suite"] for r in rows} == {"offload"}
    assert {(r["provider"], r["role"]) for r in rows} == {("peft+bnb", "peer"), ("fastlora", "fastlora")}
    assert {r["metric"] for r in rows} == {"kept on device", "moved to host", "weight copies on host"}
    assert {r["extra"]["mode"] for r in rows} == set(offload.MODES)
    assert len(rows) == 3 * len(offload.MODES) * len(offload.PROVIDERS)
    assert all(r["unit"] == "bytes" and r["value"] >= 0 for r in rows)
    assert all(_metric(rows, "fastlora", m, "kept on device")["extra"]["fallback_calls"] == 0 for m in offload.MODES)


@pytest.mark.parametrize("provider", offload.PROVIDERS)
def test_save_on_cpu_moves_all_activations(suite_run, provider):
    _, rows = suite_run
    plain = _metric(rows, provider, "plain", "kept on device")["value"]
    kept = _metric(rows, provider, "save_on_cpu", "kept on device")
    moved = _metric(rows, provider, "save_on_cpu", "moved to host")["value"]
    assert plain > 100_000  # the tiny model's activations: hundreds of KiB
    assert _metric(rows, provider, "plain", "moved to host")["value"] == 0
    # What may stay: the 4-byte fp32 loss, and for fastlora one int64 dropout seed per LoRA projection (the ops
    # keep the seed object as ctx state for the checkpoint stash, which saved-tensor hooks never see).
    bound = 4 + (8 * LORA_PROJECTIONS if provider == "fastlora" else 0)
    assert kept["value"] <= bound, kept["extra"]["largest_kept"]
    assert all(entry.split(":")[0].endswith("()") for entry in kept["extra"]["largest_kept"])  # scalars only
    # every activation the plain run keeps went to host memory (save_on_cpu copies a storage once per save: more)
    assert moved >= plain - bound


@pytest.mark.parametrize("provider", offload.PROVIDERS)
def test_checkpointing_and_offload_keep_less(suite_run, provider):
    _, rows = suite_run
    kept = {m: _metric(rows, provider, m, "kept on device")["value"] for m in offload.MODES}
    assert kept["checkpoint"] < kept["plain"] / 3
    assert kept["checkpoint+save_on_cpu"] < kept["checkpoint"]
    assert kept["checkpoint+offload"] < kept["checkpoint"]
    # transformers' offload moves the checkpointed layers' inputs: one (batch, seq, hidden) fp32 tensor per layer
    layer_input = TINY.batch * TINY.seq * TINY.hidden * 4
    assert _metric(rows, provider, "checkpoint+offload", "moved to host")["value"] == TINY.layers * layer_input


@pytest.mark.parametrize("provider", offload.PROVIDERS)
def test_losses_and_gradients_equal_plain(suite_run, provider):
    _, rows = suite_run
    losses = {m: _metric(rows, provider, m, "kept on device")["extra"]["loss"] for m in offload.MODES}
    assert len(set(losses.values())) == 1
    for mode in offload.MODES:
        extra = _metric(rows, provider, mode, "kept on device")["extra"]
        assert extra["bitwise_equal_to_plain"], (mode, extra["grad_max_abs_diff_vs_plain"])


@pytest.mark.parametrize("mode", ["save_on_cpu", "checkpoint+save_on_cpu"])
def test_patched_model_with_dropout_under_save_on_cpu_is_bitwise_plain(mode):
    # Dropout on: the seeds travel through save_on_cpu's copy (not the same tensor object in backward), yet
    # backward regenerates the same masks and every stashed seed is consumed.
    base = ts.peft_model(TINY, rank=16, alpha=16, dropout=0.1, b_std=offload.B_STD)
    ids = ts.token_batch(TINY, seed=1)
    runs = {}
    for m in ("plain", mode):
        model, handle = ts.patched_copy(base)
        runs[m] = offload.measure(model, ids, m, seed=5)
        assert sum(handle.report()["fallback_calls"].values()) == 0
        lora_a = [p for n, p in model.named_parameters() if "lora_A" in n]
        assert lora_a and all(_dropout_seed.pending_count(p) == 0 for p in lora_a)
    assert runs[mode]["kept"] < runs["plain"]["kept"]
    assert torch.equal(runs["plain"]["loss"], runs[mode]["loss"])
    assert runs["plain"]["grads"].keys() == runs[mode]["grads"].keys()
    for name, g in runs["plain"]["grads"].items():
        assert torch.equal(g, runs[mode]["grads"][name]), name


def test_torch_save_on_cpu_itself_gives_the_same_gradients():
    # The real torch context manager (not the bench's counting one) around a patched model's step.
    base = ts.peft_model(TINY, rank=16, alpha=16, dropout=0.1, b_std=offload.B_STD)
    ids = ts.token_batch(TINY, seed=1)
    model, _ = ts.patched_copy(base)
    out = []
    for context in (torch.enable_grad(), torch.autograd.graph.save_on_cpu(pin_memory=False)):
        torch.manual_seed(3)
        with context:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        out.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        model.zero_grad(set_to_none=True)
    (l0, g0), (l1, g1) = out
    assert torch.equal(l0, l1) and g0.keys() == g1.keys() and len(g0) == 2 * LORA_PROJECTIONS
    assert all(torch.equal(g0[n], g1[n]) for n in g0)


def test_help_lists_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--suite", "offload", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in ("--modes", "--providers", "--preset", "--dtype", "--dropout", "--backend", "--device", "--quick",
                   "save_on_cpu", "checkpoint+offload"):
        assert option in out, option


@pytest.mark.parametrize("args, message", [
    (["--modes", "plain,offload_all"], "unknown mode 'offload_all'"),
    (["--modes", ","], "unknown mode"),
    (["--providers", "unsloth"], "unknown provider 'unsloth'"),
    (["--preset", "huge"], "invalid choice"),
    (["--dropout", "1"], "expected a float in [0, 1)"),
    (["--pin-memory"], "unrecognized arguments: --pin-memory"),
])
def test_bad_options_exit_2(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--suite", "offload", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    if "mode" in message:
        assert all(mode in err for mode in offload.MODES)  # the message lists what is accepted


def test_unknown_mode_in_the_api_and_cuda_without_gpu(tmp_path, capsys):
    model = ts.peft_model(TINY, rank=4, alpha=4)
    with pytest.raises(ValueError, match="mode must be one of plain, save_on_cpu.*got 'offload'"):
        offload.measure(model, ts.token_batch(TINY), "offload")
    if not torch.cuda.is_available():
        assert main(["bench", "--suite", "offload", "--device", "cuda", "--results", str(tmp_path / "r")]) == 2
        assert "no CUDA GPU" in capsys.readouterr().err
