"""Builders shared by the training-step benchmark (bench/bench_train_step.py) and the convergence tests
(tests/test_convergence.py): a random-init tiny Llama (nothing downloaded), its seven projections turned
into bitsandbytes nf4 double-quant ``Linear4bit`` layers, PEFT LoRA on top, a token batch, one AdamW
training step, and the accounting of what a forward saves for backward.

Everything here is provider-neutral: a "fastlora" model is the PEFT model deep-copied and passed to
:func:`fastlora.patch` with whatever options the caller gives (:func:`patched_copy`), so new fusions
that ``patch`` learns are picked up without changes here.
"""

from __future__ import annotations

import copy
import ctypes
import dataclasses
import gc
from collections.abc import Callable

import torch

from fastlora import nf4

from .memory_model import BLOCKSIZE, Shape
from .memory_model import PROJECTIONS as TARGETS


@dataclasses.dataclass(frozen=True, kw_only=True)
class Spec(Shape):
    """A model shape (memory_model.Shape: the Llama architecture's sizes) and a batch of ``batch`` x ``seq`` tokens.
    Every projection's in_features must be a multiple of the blocksize 64 (bitsandbytes 0.50's CPU dequantization
    is wrong otherwise, see README "Known differences")."""

    batch: int
    seq: int

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    def describe(self) -> str:
        return (f"hidden {self.hidden}, intermediate {self.intermediate}, {self.layers} layers, GQA "
                f"{self.heads}/{self.kv_heads} heads, vocab {self.vocab}, {self.batch}x{self.seq} tokens")


# The sizes: "full" for the fp32 target, "small" for bf16 (PEFT's bf16 GEMMs are very slow on
# CPUs without native bf16), "tiny" to check the benchmark itself in seconds.
# The two sides of the training-step comparison: the PEFT model, and a deep copy passed to fastlora.patch.
PROVIDERS = ("peft+bnb", "fastlora")
# Timed beside them: the same model's own work at torch's speed (floor_model), the bound on any speed-up.
FLOOR = "floor"

PRESETS = {
    "full": Spec(hidden=1024, intermediate=2816, layers=4, heads=16, kv_heads=4, vocab=2048, batch=2, seq=512),
    "small": Spec(hidden=256, intermediate=704, layers=2, heads=4, kv_heads=1, vocab=2048, batch=2, seq=128),
    "tiny": Spec(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=96, batch=2, seq=32),
}


def base_model(spec: Spec, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A random-init ``LlamaForCausalLM`` of ``spec`` in ``dtype`` (train mode)."""
    import transformers

    if spec.hidden % spec.heads or spec.heads % spec.kv_heads:
        raise ValueError(f"spec: hidden ({spec.hidden}) must divide by heads ({spec.heads}) and heads by "
                         f"kv_heads ({spec.kv_heads})")
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(spec.config(torch.float32))  # initialised in fp32, then cast
    return model.to(dtype).train()


def to_4bit(model, compute_dtype: torch.dtype):
    """Replace every targeted ``nn.Linear`` by a bitsandbytes ``Linear4bit`` holding its weight as nf4
    with double quant (blocksize 64), decoded to ``compute_dtype``, the way
    ``from_pretrained(load_in_4bit=True, bnb_4bit_compute_dtype=compute_dtype)`` would hold it; sets
    ``model.is_loaded_in_4bit`` so PEFT builds ``lora.bnb.Linear4bit`` layers. In place; returns model."""
    import bitsandbytes as bnb

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name not in TARGETS or type(child) is not torch.nn.Linear:
                continue
            if child.in_features % BLOCKSIZE:
                raise ValueError(f"{name}: in_features {child.in_features} is not a multiple of {BLOCKSIZE}")
            q = nf4.quantize(child.weight.detach().to(compute_dtype), BLOCKSIZE, "nf4", True)
            new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                    compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True,
                                    device="meta")
            new.weight = nf4.to_bnb(q)
            if child.bias is not None:
                new.bias = torch.nn.Parameter(child.bias.detach().to(compute_dtype), requires_grad=False)
            setattr(module, name, new)
    model.is_loaded_in_4bit = True
    return model


def peft_model(spec: Spec, *, dtype: torch.dtype = torch.float32, four_bit: bool = True, rank: int = 16,
               alpha: int = 16, dropout: float = 0.0, seed: int = 0, b_std: float = 0.0):
    """PEFT LoRA (all seven projections, fp32 adapters: PEFT's default) over a random tiny Llama whose
    norms, embeddings and lm_head are in ``dtype``; with ``four_bit`` the projections are bitsandbytes
    nf4 double quant decoded to ``dtype``. In fp32 this is what ``prepare_model_for_kbit_training``
    leaves (norms / embeddings fp32). ``b_std`` > 0 draws lora_B from N(0, b_std²) instead of PEFT's
    zeros (so a single step already exercises every LoRA term)."""
    model = base_model(spec, dtype, seed)
    if four_bit:
        to_4bit(model, dtype)
    return add_lora(model, rank=rank, alpha=alpha, dropout=dropout, b_std=b_std, seed=seed + 1)


def add_lora(model, *, rank: int = 16, alpha: int = 16, dropout: float = 0.0, b_std: float = 0.0, seed: int = 1):
    """PEFT LoRA (fp32 adapters) on ``model``'s seven projections, in train mode. ``b_std`` > 0 draws lora_B
    from N(0, b_std²) with a CPU generator seeded ``seed`` instead of PEFT's zeros (so a single step already
    exercises every LoRA term), the same values on every device."""
    import peft

    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(TARGETS))
    pm = peft.get_peft_model(model, config)
    if b_std:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * b_std)
    return pm.train()


def qlora_from_pretrained(path, device, *, checkpointing: bool = False, **lora):
    """The QLoRA model as users build it: the checkpoint at ``path`` loaded on ``device`` with transformers'
    ``BitsAndBytesConfig`` (nf4, double quant, bf16 compute: bitsandbytes quantizes it there), passed through
    ``peft.prepare_model_for_kbit_training`` (gradient checkpointing as ``checkpointing``), then
    :func:`add_lora` with ``lora``'s options."""
    import peft
    import transformers

    quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_use_double_quant=True,
                                                   bnb_4bit_compute_dtype=torch.bfloat16)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization,
                                                              device_map={"": device}, dtype=torch.bfloat16)
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    return add_lora(model, **lora)


def floor_model(spec: Spec, dtype: torch.dtype = torch.float32, seed: int = 0):
    """The training step's floor at torch's speed: the same Llama, dense and frozen, no adapters, with one
    trainable 0-d parameter (``gradient_tap``, zero) added to the first layer's q/k/v outputs. Its backward
    runs exactly what LoRA on all seven projections makes any implementation run besides the adapters:
    attention, norms, the loss, and every frozen projection's dX = dY·W except the first layer's q/k/v
    (whose input needs no gradient), with torch's GEMMs on weights already dense. No 4-bit decoding, no
    adapter or dropout work. So (PEFT step time) / (floor step time) bounds the speed-up over PEFT of any
    implementation that leaves the model's own GEMMs, attention and norms to torch."""
    model = base_model(spec, dtype, seed)
    model.requires_grad_(False)
    tap = torch.nn.Parameter(torch.zeros((), dtype=dtype))
    model.register_parameter("gradient_tap", tap)
    attention = model.model.layers[0].self_attn
    for name in ("q_proj", "k_proj", "v_proj"):
        getattr(attention, name).register_forward_hook(lambda module, args, out: out + tap)
    return model


def patched_copy(model, **patch_options):
    """(deep copy of ``model`` passed through ``fastlora.patch(copy, **patch_options)``, its handle)."""
    import fastlora

    twin = copy.deepcopy(model)
    return twin, fastlora.patch(twin, **patch_options)


def token_batch(spec: Spec, seed: int = 0) -> torch.Tensor:
    """(batch, seq) int64 token ids, uniform over the vocabulary."""
    return torch.randint(0, spec.vocab, (spec.batch, spec.seq), generator=torch.Generator().manual_seed(seed))


class TrainStep:
    """One training step on ``model``: forward, causal-LM loss (labels = ids), backward, AdamW step on the
    trainable parameters (the adapters). ``step(ids)`` returns the loss (a detached 0-d tensor)."""

    def __init__(self, model, lr: float = 1e-4, weight_decay: float = 0.0):
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("model has no trainable parameters")
        # foreach=False: the same per-tensor update on both providers; fused paths are not what is compared.
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay, foreach=False)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.model(input_ids=ids, labels=ids).loss
        loss.backward()
        self.optimizer.step()
        return loss.detach()


def lora_weights(model) -> dict[str, torch.Tensor]:
    """{name: detached copy} of every lora_A / lora_B weight."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def _storage_ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def model_storages(model) -> set[int]:
    """Storage pointers of the model's own tensors: parameters, buffers and the tensors of every
    bitsandbytes quant state (absmax, code, nested statistics). Saved references to them are no new memory."""
    ptrs: set[int] = set()
    for t in (*model.parameters(), *model.buffers()):
        ptrs.add(_storage_ptr(t))
        state = getattr(t, "quant_state", None)
        while state is not None:
            for attr in ("absmax", "code", "offset"):
                value = getattr(state, attr, None)
                if isinstance(value, torch.Tensor):
                    ptrs.add(_storage_ptr(value))
            state = getattr(state, "state2", None)
    return ptrs


def saved_for_backward(model, ids: torch.Tensor) -> dict:
    """What one forward + loss of ``model`` on ``ids`` saves for backward, seen by
    ``saved_tensors_hooks``: unique storages (by untyped storage pointer), without the model's own
    tensors (:func:`model_storages`). Returns {"bytes", "storages", "by_dtype": {dtype: bytes}}.
    Tensors a Function keeps as ctx attributes instead of ``save_for_backward`` are invisible here."""
    skip = model_storages(model)
    seen: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor):
        ptr = _storage_ptr(t)
        if ptr not in skip and ptr not in seen and t.device.type != "meta":
            seen[ptr] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    by_dtype: dict[str, int] = {}
    for t in seen.values():
        key = str(t.dtype).replace("torch.", "")
        by_dtype[key] = by_dtype.get(key, 0) + t.untyped_storage().nbytes()
    out = {"bytes": sum(by_dtype.values()), "storages": len(seen), "by_dtype": by_dtype}
    del loss
    model.zero_grad(set_to_none=True)
    return out


def _vm(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def peak_rss_delta(fn: Callable[[], object]) -> int | None:
    """VmHWM after ``fn()`` minus VmRSS before it, in this process (Linux only, else None). The
    high-water mark is reset first (``/proc/self/clear_refs``); freed memory is trimmed back to the OS
    (glibc malloc_trim) so the baseline is the live memory. Other allocations of the process count too."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    before = _vm("VmRSS")
    fn()
    peak = _vm("VmHWM")
    return None if before is None or peak is None else peak - before
