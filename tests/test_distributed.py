"""fastlora under torch.distributed on CPU (gloo), 2 processes launched by torchrun (tests/dist_worker.py):
a patched QLoRA tiny Llama (nf4 via quantize=, LoRA r=16 on every linear, gradient checkpointing) under DDP and
FSDP2 equals a single process over the same global batch; with dropout + NEFTune each rank draws its own noise
and a run repeats bitwise from one seed; rank 0's saved adapter loads in one process with the same logits;
ranks patched differently fail with a clear error (fastlora.distributed.check_consistent), no hang; patching a
wrapped model is refused when it would add parameters and works for a wrapped PEFT model."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

import dist_worker  # noqa: E402
from model_zoo import tiny_model  # noqa: E402

import fastlora  # noqa: E402
from fastlora import distributed as fl_dist  # noqa: E402
from fastlora import nf4  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# fp32, 4 SGD steps (lr 10, so the adapters move well away from their init): DDP averages two per-rank mean
# gradients where one process takes the mean over the global batch, so sums run in another order. Measured
# max over adapter tensors of max|got - want| / max|want|: 7.2e-6 (DDP and FSDP2 alike); bound with 4x headroom.
RTOL = 3e-5


def launch(tmp_path, *scenarios, timeout=240, expect_ok=True):
    """torchrun 2 workers on a free port (--standalone); returns (process, {rank: results})."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "tests", "dist_worker.py"), str(tmp_path), *scenarios]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    try:
        proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun {scenarios} did not finish in {timeout} s (hang?)\nstderr:\n{e.stderr}")
    if expect_ok and proc.returncode != 0:
        pytest.fail(f"torchrun {scenarios} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\n"
                    f"stderr:\n{proc.stderr[-8000:]}")
    results = {}
    for rank in (0, 1):
        path = tmp_path / f"rank{rank}.pt"
        if path.exists():
            results[rank] = torch.load(path, weights_only=False)
    return proc, results


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    # "mismatch" and "auto_absent" leave the ranks' check counters unequal (rank 0 checks once more): last
    _, results = launch(out, "ddp_equal", "ddp_reentrant", "fsdp_equal", "ddp_noise", "same_seed", "check_ok",
                        "wrapped", "auto_mismatch", "mismatch", "auto_absent")
    return results


@pytest.fixture(scope="module")
def reference():
    """One process, the whole global batch, dropout 0, NEFTune off."""
    return dist_worker.single_process_run()


_max_rel = dist_worker.max_rel


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_ddp_matches_single_process(run, reference):
    got = run[0]["ddp_equal"]["adapter"]
    _assert_same(got, run[1]["ddp_equal"]["adapter"])  # DDP keeps the replicas identical
    assert len(got) == 2 * 2 * 7 and all(tuple(t.shape)[int("lora_B" in k)] == 16 for k, t in got.items())
    assert min(got[k].abs().max().item() for k in got if "lora_B" in k) > 1e-4  # B left zero: training happened
    diff = _max_rel(got, reference["adapter"])
    print(f"DDP vs single process: max relative adapter difference = {diff:.3g}")
    assert diff <= RTOL
    # the mean of the two ranks' mean losses is the global mean loss
    ranks = [run[r]["ddp_equal"]["losses"] for r in (0, 1)]
    assert torch.allclose(torch.tensor(ranks).mean(0), torch.tensor(reference["losses"]), rtol=1e-6, atol=0)


def test_ddp_with_reentrant_checkpointing_matches(run, reference):
    got = run[0]["ddp_reentrant"]["adapter"]
    _assert_same(got, run[1]["ddp_reentrant"]["adapter"])
    assert _max_rel(got, reference["adapter"]) <= RTOL


def test_fsdp2_shards_lora_keeps_4bit_replicated_and_matches(run, reference):
    """FSDP2 on CPU / gloo: LoRA parameters are DTensors with half the rows on each rank; the 4-bit codes are
    plain buffers, whole on each rank (FSDP2 shards parameters only); training equals DDP and one process."""
    fsdp = [run[r]["fsdp_equal"] for r in (0, 1)]
    for info in fsdp:
        assert info["lora_A_type"] == "DTensor"
        assert info["lora_A_global"] == (16, 64) and info["lora_A_local"] == (8, 64)
        assert info["codes_type"] == "Tensor" and info["codes_numel"] == 64 * 64 // 2  # q_proj 64x64, 2 codes/byte
    _assert_same(fsdp[0]["adapter"], fsdp[1]["adapter"])
    diff = _max_rel(fsdp[0]["adapter"], reference["adapter"])
    print(f"FSDP2 vs single process: max relative adapter difference = {diff:.3g}; per rank: "
          f"{fsdp[0]['param_bytes_local']} B of parameter shards ({fsdp[0]['lora_bytes_local']} B LoRA), "
          f"{fsdp[0]['buffer_bytes']} B of replicated buffers (4-bit codes and statistics, rotary)")
    assert diff <= RTOL
    assert torch.allclose(torch.tensor(fsdp[0]["losses"]), torch.tensor(run[0]["ddp_equal"]["losses"]),
                          rtol=1e-6, atol=0)


def test_each_rank_draws_its_own_noise_and_a_run_repeats(run):
    first = [run[r]["ddp_noise"]["first"] for r in (0, 1)]
    # same ids, same weights on both ranks: the difference is each rank's NEFTune noise (and dropout masks)
    bound = 5.0 / (9 * 64) ** 0.5  # alpha / sqrt(L * d)
    for f in first:
        assert f["noise"].abs().max().item() <= bound * (1 + 1e-5) and f["noise"].abs().max().item() > bound / 2
    assert (first[0]["noise"] - first[1]["noise"]).abs().max().item() > bound / 2
    assert first[0]["probe_loss"] != first[1]["probe_loss"]
    for r in (0, 1):
        second = run[r]["ddp_noise"]["second"]
        _assert_same(first[r]["adapter"], second["adapter"])  # the same seed: the same run, bitwise
        assert first[r]["losses"] == second["losses"]
    _assert_same(first[0]["adapter"], first[1]["adapter"])
    # one seed on every rank (what the Trainer does): the ranks draw the same noise, as torch's dropout would
    assert torch.equal(run[0]["same_seed"]["noise"], run[1]["same_seed"]["noise"])


def test_adapter_saved_by_rank_0_loads_in_one_process(run):
    saved = run[0]["ddp_noise"]
    path = saved["saved_to"]
    assert os.path.isfile(os.path.join(path, "adapter_model.safetensors"))
    ids = dist_worker.probe_ids()
    model = tiny_model("llama")
    fastlora.patch(model, quantize="nf4")
    fastlora.load_adapter(model, path)
    with torch.no_grad():
        got = model.eval()(input_ids=ids).logits
    assert torch.equal(got, saved["saved_logits"])
    # PEFT reads the folder. Its base: dense fp32 linears holding the dequantized nf4 weights (the exact values
    # fastlora computes with; bitsandbytes 0.50's CPU 4-bit matmul differs from them by ~4e-3 relative here).
    base = tiny_model("llama")
    for name, module in base.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            module.weight.data = nf4.dequantize(nf4.quantize(module.weight.data, 64, "nf4", True), torch.float32)
    pm = peft.PeftModel.from_pretrained(base, path).eval()
    assert sum("lora_A" in n for n, _ in pm.named_parameters()) == 14
    with torch.no_grad():
        want = pm(input_ids=ids).logits
    rel = ((want - saved["saved_logits"]).abs().max() / want.abs().max()).item()
    assert rel < 2e-6, rel


def test_check_consistent_passes_on_equal_ranks(run):
    prints = [run[r]["check_ok"]["fingerprint"] for r in (0, 1)]
    assert prints[0] == prints[1]
    fp = prints[0]
    assert fp["patched"] and fp["options"]["lora"]["r"] == 16 and fp["options"]["neftune_alpha"] == 5.0
    assert fp["options"]["quantize"] == "nf4" and len(fp["lora"]) == 14 and len(fp["trainable"]) == 28
    assert fp["unsynced"] == []


def test_ranks_patched_differently_fail_on_every_rank(run):
    for r in (0, 1):
        m = run[r]["mismatch"]
        assert m["r"].startswith("ValueError") and "rank 1 vs rank 0: options.lora.r: 8 vs 16" in m["r"]
        assert "options.neftune_alpha: None vs 5.0" in m["neftune"]
        assert "rank 1 vs rank 0: patched: False vs True" in m["unpatched"]
    assert run[0]["mismatch"]["absent"].startswith("TimeoutError") and "rank(s) [1]" in run[0]["mismatch"]["absent"]


def test_first_forward_checks_ranks_automatically(run):
    """patch under a 2-rank process group installs the check at the first forward: different r fails every rank
    there, once; a rank that did not patch makes the patched rank fail naming it, not hang."""
    for r in (0, 1):
        a = run[r]["auto_mismatch"]
        assert a["hooked"] and a["first"].startswith("ValueError"), a
        assert "ranks patched the model differently" in a["first"] and "options.lora.r: 8 vs 16" in a["first"]
        assert a["second"] is None  # one check only: the second forward runs
    absent = run[0]["auto_absent"]["first"]
    assert absent.startswith("TimeoutError") and "rank(s) [1]" in absent, absent
    assert run[1]["auto_absent"]["first"] is None


def test_patch_after_wrapping(run):
    w = run[0]["wrapped"]
    assert w["refused"].startswith("ValueError: model is wrapped by DistributedDataParallel")
    assert "patch the model first, then wrap it" in w["refused"]
    assert w["refused_fsdp"].startswith("ValueError: model is wrapped by fully_shard"), w["refused_fsdp"]
    # the inner model patched after wrapping: DDP raises nothing and the replicas drift apart; the check sees it
    assert w["inner_replicas_differ_by"] > 1e-3
    assert "are not synchronized by DistributedDataParallel" in w["inner_check"], w["inner_check"]
    # a wrapped PEFT model: patch finds the LoRA layers through the wrapper, no fallback, same training
    assert w["after_patched"] > 0 and w["fallback_calls"] == {}
    _assert_same(w["after"]["adapter"], w["before"]["adapter"])
    assert w["after"]["losses"] == w["before"]["losses"]


def test_check_consistent_error_ends_the_job(tmp_path):
    """Uncaught, the check fails every rank at once: torchrun exits non-zero, no hang."""
    proc, _ = launch(tmp_path, "raise_check_r", timeout=120, expect_ok=False)
    assert proc.returncode != 0
    assert "check_consistent: ranks patched the model differently" in proc.stderr, proc.stderr[-4000:]


@pytest.mark.slow
def test_ddp_alone_detects_a_different_r(tmp_path):
    """Without the check, DDP's own parameter-shape verification fails rank 1 at construction (rank 0 waits in
    the next collective until torchrun stops it)."""
    proc, _ = launch(tmp_path, "raise_ddp_r", timeout=120, expect_ok=False)
    assert proc.returncode != 0
    assert "appears not to match sizes of the same param in process 0" in proc.stderr, proc.stderr[-4000:]


def test_check_consistent_without_process_group():
    model = tiny_model("llama")
    assert fl_dist.check_consistent(model)["patched"] is False
    fastlora.patch(model, lora={"r": 4})
    fp = fl_dist.check_consistent(model)
    assert fp["patched"] and fp["options"]["lora"]["r"] == 4 and fp["trainable"]
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        fl_dist.check_consistent(model, timeout=0)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fl_dist.check_consistent("model")
    assert fl_dist.wrapper_kind(model) is None


@pytest.mark.slow
def test_noisy_run_repeats_in_a_new_job(run, tmp_path):
    """The dropout + NEFTune run of the module's job, launched again in fresh processes: bitwise the same."""
    _, again = launch(tmp_path, "ddp_noise")
    for r in (0, 1):
        _assert_same(again[r]["ddp_noise"]["first"]["adapter"], run[r]["ddp_noise"]["first"]["adapter"])
        assert torch.equal(again[r]["ddp_noise"]["first"]["noise"], run[r]["ddp_noise"]["first"]["noise"])
