"""``python -m fastlora bench --suite offload``: activation bytes a QLoRA forward keeps on the device, with and
without moving saved tensors to host memory, for a ``fastlora.patch``-ed model and for PEFT + bitsandbytes.

The model is the train suite's (:mod:`fastlora.bench.train_setup`): a random-init Llama, its seven projections
bitsandbytes nf4 double quant, PEFT LoRA r=16 on all seven, lora_B ~ N(0, 0.02²). Every (provider, mode) runs on
a fresh deep copy of the same weights and the same token batch; a run is forward + causal-LM loss, the
measurement, then backward. Modes (:data:`MODES`):

* ``plain``: nothing moved.
* ``save_on_cpu``: the forward under ``torch.autograd.graph.save_on_cpu(pin_memory=False)``.
* ``checkpoint``: transformers' activation checkpointing of every decoder layer (non-reentrant).
* ``checkpoint+save_on_cpu``: both: the forward under save_on_cpu with checkpointing on.
* ``checkpoint+offload``: transformers' own option, ``activation_checkpointing_enable(offload=True)`` (what
  ``TrainingArguments(activation_checkpointing_kwargs={"offload": True})`` turns on): save_on_cpu around each
  checkpointed layer only, so the layers' inputs go to host memory and the embedding / norm / LM head / loss
  tensors stay.

Method (the same code on a CPU and a GPU). A ``TorchDispatchMode`` ledger records every tensor storage an operator
returns during the forward (views share their base's storage and are not counted twice; the model's weights,
buffers, 4-bit statistics and the token ids exist before and are never counted), with a weak reference that drops
it when its last reference dies, as a caching allocator would free it. save_on_cpu's pack hook is wrapped: the
host copy it returns is booked as host memory ("moved to host": copies of activations; "weight copies on host":
copies of frozen weights and adapters, which save_on_cpu also copies). After the forward, with only the loss held
(as Trainer holds it until backward) and after ``gc.collect()``, the storages still alive and not booked as host
copies are the bytes kept on the device: what the graph (saved tensors, and tensors a custom autograd Function
keeps as ctx attributes, which saved-tensor hooks never see) and anything else holds between forward and backward.

On this CPU the "device" is the CPU itself, where ``tensor.cpu()`` returns the tensor (no copy) and pinned memory
does not exist. So the wrapped pack hook makes the copy an accelerator run makes (``clone``, bitwise equal) when
save_on_cpu handed back the device tensor itself, and pins only where an accelerator exists (transformers asks for
pinned memory; on a CPU-only machine its offload option raises "pin_memory=True requires a CUDA or other
accelerator backend", so the ``checkpoint+offload`` mode substitutes the counting save_on_cpu, unpinned, for the
one transformers calls). Bytes do not depend on pinning. On a CUDA GPU (``--device cuda``) the host copies really
are on the CPU, and ``torch.cuda.memory_allocated()`` after the forward minus before it is reported too (metric
"cuda allocated kept": the allocator's own count, block rounding included).

What the offload modes leave on the device, seen here: the first decoder layer's input (transformers'
``enable_input_require_grads`` makes the embedding output a leaf that requires grad, and its AccumulateGrad node
holds it), the rotary cos / sin and the position ids (checkpointing holds a layer's keyword arguments in a closure,
not as saved tensors), the loss, and for fastlora one int64 dropout seed per LoRA call (kept as ctx state for the
checkpoint stash). save_on_cpu also copies the frozen weights backward needs (the 4-bit weights and their
statistics included) to host memory on every forward.

Gradients: after the measurement each run does backward; the loss and the gradients of the adapters are compared
with the ``plain`` run of the same provider (bitwise equal or the largest absolute difference), so a mode that
changes results shows up in the table and the rows.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import inspect
import sys
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from . import results
from . import train_setup as ts
from .arg_types import dropout_probability
from .memory_tracker import _storage

PROVIDERS = ("peft+bnb", "fastlora")
ROLES = {"peft+bnb": "peer", "fastlora": "fastlora"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
B_STD = 0.02
KiB = 1024


@dataclasses.dataclass(frozen=True)
class Mode:
    checkpoint: bool  # transformers' activation checkpointing of the decoder layers
    save_on_cpu: bool  # the whole forward under save_on_cpu
    hf_offload: bool  # transformers' activation_checkpointing_enable(offload=True)


MODES = {
    "plain": Mode(False, False, False),
    "save_on_cpu": Mode(False, True, False),
    "checkpoint": Mode(True, False, False),
    "checkpoint+save_on_cpu": Mode(True, True, False),
    "checkpoint+offload": Mode(True, False, True),
}


def _key(st) -> int:
    return st._cdata


class StorageLedger(TorchDispatchMode):
    """The storages operators return while the mode is active, until their last reference dies.

    ``model_tensors``: tensors that exist before (weights, buffers, inputs); their storages are never counted, and a
    host copy of one is booked as "host weights". Each live entry: [nbytes, where, weakref, "dtype shape"] with
    where in "device", "host", "host weights"."""

    def __init__(self, model_tensors, device: torch.device):
        super().__init__()
        self.device_type = torch.device(device).type
        self._model = {_key(st) for t in model_tensors if (st := _storage(t)) is not None}
        self._live: dict[int, list] = {}

    def is_model(self, t: torch.Tensor) -> bool:
        st = _storage(t)
        return st is not None and _key(st) in self._model

    def _add(self, t: torch.Tensor, where: str | None = None) -> None:
        st = _storage(t)
        if st is None or t.device.type == "meta":
            return
        key = _key(st)
        if key in self._model:
            return
        if key in self._live:
            if where is not None:
                self._live[key][1] = where
            return
        if where is None:  # a storage off the model's device (a CPU tensor of a CUDA run) is host memory
            where = "device" if t.device.type == self.device_type else "host"
        entry = [st.nbytes(), where, None, f"{str(t.dtype).replace('torch.', '')} {tuple(t.shape)}"]

        def release(_ref, key=key, entry=entry):
            if self._live.get(key) is entry:
                del self._live[key]

        entry[2] = weakref.ref(st, release)
        self._live[key] = entry

    def mark_host(self, packed: torch.Tensor, original: torch.Tensor) -> None:
        """Book ``packed`` (save_on_cpu's host copy of ``original``) as host memory."""
        self._add(packed, "host weights" if self.is_model(original) else "host")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t)
        return out

    def live(self) -> dict:
        """{where: bytes} of the live storages, "storages": {where: count}, "largest_kept": the five largest
        device storages as "dtype shape: bytes"."""
        gc.collect()
        out = {"device": 0, "host": 0, "host weights": 0}
        counts = dict.fromkeys(out, 0)
        for nbytes, where, _, _ in self._live.values():
            out[where] += nbytes
            counts[where] += 1
        kept = sorted((e for e in self._live.values() if e[1] == "device"), key=lambda e: -e[0])[:5]
        return {**out, "storages": counts, "largest_kept": [f"{e[3]}: {e[0]} B" for e in kept]}


def _can_pin() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


class CountingSaveOnCpu(torch.autograd.graph.save_on_cpu):
    """``torch.autograd.graph.save_on_cpu`` whose host copies are booked in ``ledger`` (see the module docstring:
    where the "device" is the CPU, the copy save_on_cpu would make off an accelerator is made by ``clone``;
    pinning only where an accelerator exists)."""

    def __init__(self, ledger: StorageLedger, pin_memory: bool = False, device_type: str = "cuda"):
        self.pinned = bool(pin_memory and _can_pin())
        super().__init__(pin_memory=self.pinned, device_type=device_type)
        inner = self.pack_hook

        def pack(t: torch.Tensor):
            device, packed = inner(t)
            if packed.device.type == "cpu" and _same_storage(packed, t):
                packed = packed.clone()  # the device-to-host copy: t's storage is now free to go
            ledger.mark_host(packed, t)
            return device, packed

        self.pack_hook = pack


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    sa, sb = _storage(a), _storage(b)
    return sa is not None and sb is not None and _key(sa) == _key(sb)


def _hf_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _enable_checkpointing(model, offload: bool) -> None:
    hf = _hf_model(model)
    enable = getattr(hf, "activation_checkpointing_enable", None)
    kwargs = {"use_reentrant": False}
    if enable is None:  # transformers < 5: only the older name, and no offload option
        if offload:
            raise ValueError("mode 'checkpoint+offload' needs transformers' activation_checkpointing_enable("
                             "offload=True) (transformers >= 5); this transformers has none")
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        return
    if offload and "offload" not in inspect.signature(enable).parameters:
        raise ValueError("mode 'checkpoint+offload': this transformers' activation_checkpointing_enable has no "
                         "offload option")
    enable(activation_checkpointing_kwargs=kwargs, **({"offload": True} if offload else {}))


@contextlib.contextmanager
def _counted_hf_offload(ledger: StorageLedger):
    """transformers' offload option, with the save_on_cpu it calls replaced by the counting one."""
    from transformers import modeling_utils

    if not hasattr(modeling_utils, "save_on_cpu"):
        raise ValueError("mode 'checkpoint+offload': transformers.modeling_utils calls no save_on_cpu to count")
    original = modeling_utils.save_on_cpu

    def counting(pin_memory: bool = False, device_type: str = "cuda"):
        return CountingSaveOnCpu(ledger, pin_memory=pin_memory, device_type=device_type)

    modeling_utils.save_on_cpu = counting
    try:
        yield
    finally:
        modeling_utils.save_on_cpu = original


def _model_tensors(model) -> list[torch.Tensor]:
    out = [*model.parameters(), *model.buffers()]
    for t in list(out):
        state = getattr(t, "quant_state", None)
        while state is not None:
            out += [v for v in (getattr(state, a, None) for a in ("absmax", "code", "offset"))
                    if isinstance(v, torch.Tensor)]
            state = getattr(state, "state2", None)
    return out


def measure(model, ids: torch.Tensor, mode: str, seed: int = 0) -> dict:
    """One run of ``model`` (fresh, not yet configured for ``mode``) on ``ids`` (batch, seq) int64 token ids on the
    model's device: forward + loss under ``mode``, the ledger's count, backward. Returns {"kept", "host",
    "host_weights" (bytes), "storages", "largest_kept", "cuda_kept" (bytes or None), "loss" (0-d fp32 tensor),
    "grads" {name: tensor}, "pinned" (bool or None)}. Configures the model for ``mode`` (checkpointing stays on)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    m = MODES[mode]
    if m.checkpoint:
        _enable_checkpointing(model, offload=m.hf_offload)
    ledger = StorageLedger([*_model_tensors(model), ids], ids.device)
    outer = CountingSaveOnCpu(ledger, pin_memory=False) if m.save_on_cpu else contextlib.nullcontext()
    hf = _counted_hf_offload(ledger) if m.hf_offload else contextlib.nullcontext()
    cuda = ids.device.type == "cuda"
    model.zero_grad(set_to_none=True)
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
    torch.manual_seed(seed)
    with hf, ledger, outer:
        out = model(input_ids=ids, labels=ids)
        loss = out.loss
        del out  # as Trainer: only the loss outlives the forward
    live = ledger.live()
    cuda_kept = None
    if cuda:
        torch.cuda.synchronize()
        cuda_kept = torch.cuda.memory_allocated() - before
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return {"kept": live["device"], "host": live["host"], "host_weights": live["host weights"],
            "storages": live["storages"], "largest_kept": live["largest_kept"], "cuda_kept": cuda_kept,
            "loss": loss.detach().float(), "grads": grads,
            "pinned": getattr(outer, "pinned", None) if m.save_on_cpu else (_can_pin() if m.hf_offload else None)}


def _compare(run: dict, ref: dict) -> dict:
    if run["grads"].keys() != ref["grads"].keys():
        raise RuntimeError("runs of one provider have different trainable parameters")
    diff = max((float((run["grads"][n].float() - ref["grads"][n].float()).abs().max()) for n in ref["grads"]),
               default=0.0)
    equal = torch.equal(run["loss"], ref["loss"]) and all(torch.equal(run["grads"][n], ref["grads"][n])
                                                           for n in ref["grads"])
    return {"bitwise_equal_to_plain": equal, "grad_max_abs_diff_vs_plain": diff,
            "loss_diff_vs_plain": float((run["loss"] - ref["loss"]).abs())}


def run_config(spec: ts.Spec, dtype: str, modes, providers=PROVIDERS, *, backend: str = "auto",
               device: str = "cpu", dropout: float = 0.0, progress=None) -> dict:
    """Every (provider, mode): {provider: {mode: measure(...) + comparison with plain}} (plain is run first, as
    the reference, also when not asked for; it is then left out of the result)."""
    base = ts.peft_model(spec, dtype=DTYPES[dtype], rank=16, alpha=16, dropout=dropout, b_std=B_STD).to(device)
    ids = ts.token_batch(spec, seed=1).to(device)
    out: dict[str, dict] = {}
    for provider in providers:
        if provider not in PROVIDERS:
            raise ValueError(f"provider must be one of {', '.join(PROVIDERS)}, got {provider!r}")
        runs: dict[str, dict] = {}
        for mode in ("plain", *(m for m in modes if m != "plain")):
            if progress is not None:
                progress(f"offload suite: {provider}, {mode}")
            if provider == "fastlora":
                model, handle = ts.patched_copy(base, backend=backend)
            else:
                model, handle = copy.deepcopy(base), None
            r = measure(model, ids, mode)
            r["fallback_calls"] = sum(handle.report()["fallback_calls"].values()) if handle is not None else 0
            r.update(_compare(r, runs["plain"]) if mode != "plain" else _compare(r, r))
            runs[mode] = r
            del model
        out[provider] = {m: runs[m] for m in modes}
    return out


def shape_label(spec: ts.Spec) -> str:
    return f"h{spec.hidden} i{spec.intermediate} L{spec.layers} {spec.batch}x{spec.seq}"


def to_rows(spec: ts.Spec, dtype: str, device: str, measured: dict) -> list[dict]:
    rows = []
    dev = None if device == "cpu" else torch.cuda.get_device_name()
    for provider, runs in measured.items():
        for mode, r in runs.items():
            op = f"forward+loss {mode}"
            common = (op, provider, ROLES[provider], shape_label(spec), dtype)
            extra = {"mode": mode, "loss": float(r["loss"]), "storages": r["storages"],
                     "largest_kept": r["largest_kept"], "bitwise_equal_to_plain": r["bitwise_equal_to_plain"],
                     "grad_max_abs_diff_vs_plain": r["grad_max_abs_diff_vs_plain"], "pinned": r["pinned"],
                     "fallback_calls": r["fallback_calls"], "model": spec.describe()}
            rows.append(results.row(*common, "kept on device", r["kept"], "bytes", device=dev, **extra))
            rows.append(results.row(*common, "moved to host", r["host"], "bytes", device=dev, mode=mode))
            rows.append(results.row(*common, "weight copies on host", r["host_weights"], "bytes", device=dev,
                                    mode=mode))
            if r["cuda_kept"] is not None:
                rows.append(results.row(*common, "cuda allocated kept", r["cuda_kept"], "bytes", device=dev,
                                        mode=mode))
    return rows


def format_table(measured: dict) -> str:
    head = (f"{'provider':<10}{'mode':<24}{'kept KiB':>10}{'host KiB':>10}{'weights KiB':>12}{'kept/plain':>11}"
            f"{'cuda KiB':>10}  {'loss':>10}  same as plain")
    lines = [head, "-" * len(head)]
    for provider, runs in measured.items():
        plain = runs.get("plain")
        for mode, r in runs.items():
            ratio = f"{r['kept'] / plain['kept']:>11.3f}" if plain and plain["kept"] else " " * 11
            cuda = f"{r['cuda_kept'] / KiB:>10.1f}" if r["cuda_kept"] is not None else f"{'-':>10}"
            same = "bitwise" if r["bitwise_equal_to_plain"] else f"max |dgrad| {r['grad_max_abs_diff_vs_plain']:.2e}"
            lines.append(f"{provider:<10}{mode:<24}{r['kept'] / KiB:>10.1f}{r['host'] / KiB:>10.1f}"
                         f"{r['host_weights'] / KiB:>12.1f}{ratio}{cuda}  {float(r['loss']):>10.5f}  {same}")
    lines.append("kept: activation bytes alive on the device after forward + loss (only the loss held); host: "
                 "save_on_cpu's copies of activations; weights: its copies of weights and adapters; cuda: "
                 "torch.cuda.memory_allocated() growth over the forward (GPU only); same as plain: loss and adapter "
                 "gradients vs the plain run.")
    return "\n".join(lines)


def _choices(allowed, what: str):
    def parse(text: str) -> list[str]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        bad = [s for s in items if s not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(map(repr, bad)) or repr(text)}; "
                                             f"choose from {', '.join(allowed)} (comma separated)")
        return list(dict.fromkeys(items))

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--modes", type=_choices(tuple(MODES), "mode"), default=list(MODES),
                        help="comma separated, default all: plain (nothing moved); save_on_cpu (forward under "
                             "torch.autograd.graph.save_on_cpu(pin_memory=False)); checkpoint (transformers' "
                             "activation checkpointing, non-reentrant); checkpoint+save_on_cpu (both); "
                             "checkpoint+offload (transformers' activation_checkpointing_enable(offload=True))")
    parser.add_argument("--providers", type=_choices(PROVIDERS, "provider"), default=list(PROVIDERS),
                        help="comma separated: peft+bnb, fastlora; default both")
    parser.add_argument("--preset", choices=sorted(ts.PRESETS), default=None,
                        help="model and batch size (train suite presets); default small (tiny with --quick)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="model and activation dtype (adapters fp32); default fp32")
    parser.add_argument("--dropout", type=dropout_probability, default=0.0, help="lora_dropout; default 0")
    parser.add_argument("--backend", default="auto", help="fastlora.patch backend; default auto")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the model runs; default cpu (on cuda also torch.cuda.memory_allocated())")
    parser.add_argument("--quick", action="store_true", help="the tiny preset: checks the suite in seconds")


def run(args) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        print("fastlora bench: --device cuda: no CUDA GPU is available here", file=sys.stderr)
        return 2
    spec = ts.PRESETS[args.preset or ("tiny" if args.quick else "small")]

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    progress(f"offload suite: {args.dtype}, {spec.describe()}, {args.device}")
    try:
        measured = run_config(spec, args.dtype, args.modes, args.providers, backend=args.backend, device=args.device,
                              dropout=args.dropout, progress=progress)
    except ValueError as exc:  # a backend that cannot run here, a transformers without the offload option
        print(f"fastlora bench: {exc}", file=sys.stderr)
        return 2
    print(format_table(measured))
    args.rows.extend(to_rows(spec, args.dtype, args.device, measured))
    return 0
