"""fastlora under ``accelerate launch`` with 2 CPU processes: the torchrun worker of tests/test_distributed.py
(tests/dist_worker.py, gloo), launched unchanged by accelerate, trains the patched QLoRA tiny Llama under DDP and
FSDP2 to the adapter weights of one process over the same global batch, within the torchrun test's tolerance.

Which launch path: accelerate 1.15's ``--multi_gpu`` (or a config file with ``distributed_type: MULTI_GPU``)
hands the script to ``torch.distributed.run`` (commands/launch.py: multi_gpu_launcher), which needs no GPU: the
processes get RANK / WORLD_SIZE / MASTER_* and the worker picks gloo itself. ``--cpu`` and ``distributed_type:
MULTI_CPU`` instead go through simple_launcher, which starts one process and leaves spawning the ranks to mpirun
(``--mpirun_hostfile``); without MPI that one process has no RANK and ``init_process_group`` fails.
ACCELERATE_USE_CPU=true is what a script built on accelerate.Accelerator (the Trainer) needs on this path to take
the multi-CPU gloo state instead of a single-process one; it is set here as a user would, the worker ignores it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("accelerate", reason="accelerate is not installed: `accelerate launch` cannot be tested")
pytest.importorskip("transformers")
pytest.importorskip("peft")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

import dist_worker  # noqa: E402
from test_distributed import RTOL  # noqa: E402 - the torchrun tests' bound, measured there

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def accelerate_launch(tmp_path, *scenarios, timeout=180):
    """``accelerate launch`` (the CLI's own entry point, this interpreter) of dist_worker.py on 2 CPU processes;
    returns {rank: results}. Every launcher setting is on the command line and HF_HOME points into tmp_path, so
    no accelerate config file of the machine is read; port 0 makes accelerate pick a free port."""
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch",
           "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--main_process_port", "0",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
           os.path.join(ROOT, "tests", "dist_worker.py"), str(tmp_path), *scenarios]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=ROOT, HF_HOME=str(tmp_path / "hf_home"), ACCELERATE_USE_CPU="true")
    try:
        proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"accelerate launch {scenarios} did not finish in {timeout} s (hang?)\nstderr:\n{e.stderr}")
    if proc.returncode != 0:
        pytest.fail(f"accelerate launch {scenarios} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\n"
                    f"stderr:\n{proc.stderr[-8000:]}")
    return {rank: torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return accelerate_launch(tmp_path_factory.mktemp("accelerate"), "ddp_equal", "fsdp_equal")


@pytest.fixture(scope="module")
def reference():
    """One process, the whole global batch (as test_distributed's reference)."""
    return dist_worker.single_process_run()


_max_rel = dist_worker.max_rel


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["ddp_equal", "fsdp_equal"])
def test_accelerate_launch_matches_single_process(run, reference, scenario):
    ranks = [run[r][scenario] for r in (0, 1)]
    for k, t in ranks[0]["adapter"].items():
        assert torch.equal(t, ranks[1]["adapter"][k]), k  # the replicas stay identical
    got = ranks[0]["adapter"]
    assert len(got) == 2 * 2 * 7
    assert min(got[k].abs().max().item() for k in got if "lora_B" in k) > 1e-4  # B left zero: training happened
    diff = _max_rel(got, reference["adapter"])
    print(f"accelerate launch {scenario} vs single process: max relative adapter difference = {diff:.3g}")
    assert diff <= RTOL
    # two real ranks, each on its half of the batch: different losses whose mean is the global mean loss
    assert ranks[0]["losses"] != ranks[1]["losses"]
    mean = torch.tensor([ranks[0]["losses"], ranks[1]["losses"]]).mean(0)
    assert torch.allclose(mean, torch.tensor(reference["losses"]), rtol=1e-6, atol=0)
    if scenario == "fsdp_equal":  # FSDP2 really sharded the LoRA rows over the two processes
        assert ranks[0]["lora_A_global"] == (16, 64) and ranks[0]["lora_A_local"] == (8, 64)
