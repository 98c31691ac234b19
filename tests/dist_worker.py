"""The script tests/test_distributed.py runs under torchrun (2 CPU processes, gloo), and the model / data /
training loop both sides share (the test runs the single-process reference with the same functions).

``python -m torch.distributed.run --standalone --nproc_per_node 2 dist_worker.py OUT SCENARIO [SCENARIO ...]``
writes ``OUT/rank{r}.pt``: {scenario: result}. A scenario whose name starts with ``raise_`` lets its error
escape (the test checks the process exit and stderr); other expected errors are caught and recorded.
"""

from __future__ import annotations

import os
import sys

import torch

_TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(_TESTS), _TESTS]  # this checkout's fastlora, then model_zoo

from model_zoo import VOCAB, tiny_model, to_4bit  # noqa: E402

import fastlora  # noqa: E402
from fastlora import distributed as fl_dist  # noqa: E402

STEPS = 4
GLOBAL_BATCH, SEQ = 4, 12
LR = {"adamw": 1e-2, "sgd": 10.0}  # SGD: updates linear in the gradient, for the equality tests


def build(*, r=16, dropout=0.0, neftune=None, peft_model=False, checkpointing=True, reentrant=False):
    """The patched tiny Llama QLoRA model: nf4 base (double quant), LoRA on every linear, training mode.
    The base weights and the LoRA initialisation come from seed 0 (tiny_model), the same on every rank."""
    model = tiny_model("llama")
    if peft_model:
        import peft

        model = peft.get_peft_model(to_4bit(model), peft.LoraConfig(r=r, lora_alpha=16, lora_dropout=dropout,
                                                                    target_modules="all-linear"))
        handle = fastlora.patch(model, neftune_alpha=neftune)
    else:
        handle = fastlora.patch(model, lora=fastlora.LoraConfig(r=r, lora_alpha=16, lora_dropout=dropout,
                                                                target_modules="all-linear"),
                                quantize="nf4", neftune_alpha=neftune)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.config.use_cache = False
    return model.train(), handle


def batch(step: int) -> torch.Tensor:
    """The global batch of ``step`` (GLOBAL_BATCH, SEQ): the same on every rank, each takes its rows."""
    return torch.randint(3, VOCAB, (GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(100 + step))


def train(wrapped, params, rows: slice, optimizer: str = "adamw") -> list[float]:
    """STEPS optimizer steps on ``batch(step)[rows]`` (labels = ids: every row has the same token count, so the
    mean of per-rank mean losses is the global mean loss)."""
    opt = (torch.optim.AdamW if optimizer == "adamw" else torch.optim.SGD)(params, lr=LR[optimizer])
    losses = []
    for step in range(STEPS):
        ids = batch(step)[rows]
        loss = wrapped(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def adapter_state(model) -> dict[str, torch.Tensor]:
    """{name: full fp32 tensor} of the trainable parameters (DTensors gathered)."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            t = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[name.replace(".default", "")] = t.detach().clone()
    return out


def single_process_run() -> dict:
    """The reference of the multi-process runs: one process, the whole global batch, dropout 0, NEFTune off,
    one thread as each worker has."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(1000)
        model, _ = build()
        losses = train(model, [p for p in model.parameters() if p.requires_grad], slice(None), "sgd")
    finally:
        torch.set_num_threads(threads)
    return {"adapter": adapter_state(model), "losses": losses}


def max_rel(got: dict, want: dict) -> float:
    """The largest max-abs difference relative to the reference's max-abs, over the tensors of two states."""
    assert got.keys() == want.keys() and got
    return max(((got[k] - want[k]).abs().max() / want[k].abs().max()).item() for k in got)


def probe_ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(7))


def _rows(rank: int) -> slice:
    per = GLOBAL_BATCH // 2
    return slice(rank * per, (rank + 1) * per)


def _error(fn) -> str | None:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - recorded for the test to check
        return f"{type(e).__name__}: {e}"
    return None


def scenario_ddp_equal(rank):
    """Dropout 0, NEFTune off: DDP over 2 ranks vs a single process over the global batch (the test)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model, _ = build()
    torch.manual_seed(1000 + rank)
    ddp = DDP(model, broadcast_buffers=False)
    losses = train(ddp, [p for p in model.parameters() if p.requires_grad], _rows(rank), "sgd")
    return {"adapter": adapter_state(model), "losses": losses}


def scenario_ddp_reentrant(rank):
    """As ddp_equal with reentrant checkpointing (what the Trainer's gradient_checkpointing=True gives by default)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model, _ = build(reentrant=True)
    torch.manual_seed(1000 + rank)
    ddp = DDP(model, broadcast_buffers=False)
    losses = train(ddp, [p for p in model.parameters() if p.requires_grad], _rows(rank), "sgd")
    return {"adapter": adapter_state(model), "losses": losses}


def _noisy_run(rank, seed):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model, handle = build(dropout=0.1, neftune=5.0)
    torch.manual_seed(seed + rank)
    ddp = DDP(model, broadcast_buffers=False)
    ids = probe_ids()  # the same ids on both ranks: any difference is the rank's own noise
    emb = model.get_input_embeddings()
    with torch.no_grad():
        noise = emb(ids) - emb.weight[ids]
        probe_loss = model(input_ids=ids, labels=ids).loss.item()
    losses = train(ddp, [p for p in model.parameters() if p.requires_grad], _rows(rank))
    return model, handle, {"noise": noise, "probe_loss": probe_loss, "adapter": adapter_state(model),
                           "losses": losses}


def scenario_ddp_noise(rank):
    """Dropout 0.1 + NEFTune 5 with per-rank seeds, run twice from the same seed; rank 0 then saves."""
    _, _, first = _noisy_run(rank, 1234)
    model, handle, second = _noisy_run(rank, 1234)
    out = {"first": first, "second": second}
    if rank == 0:
        path = os.path.join(os.environ["FASTLORA_DIST_OUT"], "adapter")
        handle.save_adapter(path)
        model.eval()
        with torch.no_grad():
            out["saved_logits"] = model(input_ids=probe_ids()).logits
        out["saved_to"] = path
    torch.distributed.barrier()  # rank 1 must not end before the file is written
    return out


def scenario_same_seed(rank):
    """One seed on every rank (the Trainer's default): the ranks draw the same noise."""
    model, _ = build(dropout=0.1, neftune=5.0)
    torch.manual_seed(1234)
    emb = model.get_input_embeddings()
    with torch.no_grad():
        return {"noise": emb(probe_ids()) - emb.weight[probe_ids()]}


def scenario_fsdp_equal(rank):
    """FSDP2 (fully_shard per decoder layer + root) with the LoRA parameters sharded; 4-bit codes are buffers
    and stay whole on each rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model, _ = build()
    torch.manual_seed(1000 + rank)
    mesh = init_device_mesh("cpu", (2,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    q = model.model.layers[0].self_attn.q_proj
    info = {"lora_A_type": type(q.lora_A.weight).__name__, "lora_A_local": tuple(q.lora_A.weight.to_local().shape),
            "lora_A_global": tuple(q.lora_A.weight.shape),
            "codes_type": type(q.weight).__name__, "codes_numel": q.weight.numel(),
            "param_bytes_local": sum(p.to_local().nbytes for p in model.parameters()),
            "lora_bytes_local": sum(p.to_local().nbytes for p in model.parameters() if p.requires_grad),
            "buffer_bytes": sum(b.nbytes for b in model.buffers())}
    losses = train(model, [p for p in model.parameters() if p.requires_grad], _rows(rank), "sgd")
    return {"adapter": adapter_state(model), "losses": losses, **info}


def scenario_check_ok(rank):
    model, _ = build(dropout=0.1, neftune=5.0, checkpointing=False)
    return {"fingerprint": fl_dist.check_consistent(model, timeout=30)}


def scenario_wrapped(rank):
    """Patching after wrapping: lora= on a DDP model is refused; a DDP-wrapped PEFT model patched afterwards
    trains and equals the same PEFT model patched before wrapping."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(tiny_model("llama"))
    refused = _error(lambda: fastlora.patch(ddp, lora=fastlora.LoraConfig(r=16), quantize="nf4"))
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    sharded = fully_shard(tiny_model("llama"), mesh=init_device_mesh("cpu", (2,)))
    result = {"refused": refused, "refused_fsdp": _error(lambda: fastlora.patch(sharded, lora={"r": 16}))}
    inner = tiny_model("llama")  # the inner model patched after wrapping: DDP syncs nothing of the adapters
    ddp = DDP(inner, broadcast_buffers=False)
    fastlora.patch(inner, lora=fastlora.LoraConfig(r=16), quantize="nf4")
    result["inner_check"] = _error(lambda: fl_dist.check_consistent(ddp, timeout=30))
    torch.manual_seed(1000 + rank)
    train(ddp, [p for p in inner.parameters() if p.requires_grad], _rows(rank), "sgd")
    mine = inner.model.layers[0].self_attn.q_proj.lora_B.weight.detach().contiguous()
    both = [torch.empty_like(mine) for _ in range(2)]
    torch.distributed.all_gather(both, mine)
    result["inner_replicas_differ_by"] = (both[0] - both[1]).abs().max().item()
    for order in ("before", "after"):
        import peft

        model = peft.get_peft_model(to_4bit(tiny_model("llama")),
                                    peft.LoraConfig(r=16, lora_alpha=16, target_modules="all-linear"))
        if order == "before":
            fastlora.patch(model)
        ddp = DDP(model, broadcast_buffers=False)
        if order == "after":
            handle = fastlora.patch(ddp)
            result["after_patched"] = len(handle.patched)
        torch.manual_seed(1000 + rank)
        result[order] = {"losses": train(ddp, [p for p in model.parameters() if p.requires_grad], _rows(rank)),
                         "adapter": adapter_state(model)}
        if order == "after":
            result["fallback_calls"] = handle.report()["fallback_calls"]
    return result


def scenario_mismatch(rank):
    """check_consistent on ranks patched differently: every rank raises, nobody hangs."""
    out = {}
    model, _ = build(r=16 if rank == 0 else 8, checkpointing=False)
    out["r"] = _error(lambda: fl_dist.check_consistent(model, timeout=30))
    model, _ = build(neftune=5.0 if rank == 0 else None, checkpointing=False)
    out["neftune"] = _error(lambda: fl_dist.check_consistent(model, timeout=30))
    import peft

    model = peft.get_peft_model(to_4bit(tiny_model("llama")),
                                peft.LoraConfig(r=16, lora_alpha=16, target_modules="all-linear"))
    if rank == 0:
        fastlora.patch(model)
    out["unpatched"] = _error(lambda: fl_dist.check_consistent(model, timeout=30))
    if rank == 0:  # rank 1 never calls: rank 0 times out naming it
        out["absent"] = _error(lambda: fl_dist.check_consistent(model, timeout=3))
    return out


def scenario_auto_mismatch(rank):
    """No explicit check: ranks with different r fail at the first forward (patch's automatic check), every rank."""
    model, handle = build(r=16 if rank == 0 else 8, checkpointing=False)
    hooked = handle._first_step_check is not None
    first = _error(lambda: model(input_ids=batch(0)))
    second = _error(lambda: model(input_ids=batch(0)))  # the hook removed itself: no second exchange
    return {"hooked": hooked, "first": first, "second": second}


def scenario_auto_absent(rank):
    """Rank 1 does not patch: rank 0's first forward times out naming it; rank 1's forward runs."""
    fl_dist.FIRST_STEP_TIMEOUT = 3.0
    if rank == 0:
        model, _ = build(checkpointing=False)
    else:
        model = tiny_model("llama").train()
    return {"first": _error(lambda: model(input_ids=batch(0)))}


def scenario_raise_ddp_r(rank):
    """No check: DDP's own parameter-shape verification on ranks with different r (escapes)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model, _ = build(r=16 if rank == 0 else 8, checkpointing=False)
    DDP(model)
    return {}


def scenario_raise_check_r(rank):
    """check_consistent before DDP on ranks with different r (escapes on every rank)."""
    model, _ = build(r=16 if rank == 0 else 8, checkpointing=False)
    fl_dist.check_consistent(model, timeout=30)
    return {}


def main(argv):
    import torch.distributed as dist

    out_dir, scenarios = argv[0], argv[1:]
    os.environ["FASTLORA_DIST_OUT"] = out_dir
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = {}
    try:
        for name in scenarios:
            results[name] = globals()[f"scenario_{name}"](rank)
            torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
