"""Shared set-up of the LoRA linear benchmarks (bench_lora_linear.py, lora_memory.py).

One QLoRA projection built three ways over the SAME NF4 weight (blocksize 64, double quant):
  * fastlora: ``fastlora.ops.lora_linear`` on a ``fastlora.nf4.QuantizedWeight``;
  * PEFT:     ``peft.tuners.lora.bnb.Linear4bit`` over a bitsandbytes ``Linear4bit`` whose
              ``Params4bit`` shares the packed bytes and statistics (``fastlora.nf4.to_bnb``);
  * floor:    bare dense GEMMs of the same shape, x·Wᵀ and dY·W (torch.mm, no LoRA, no dequant).
One step is one forward + backward with gradients for x, lora_A and lora_B (the base weight is frozen).

Settings come from the environment so that pytest runs and the fresh memory processes agree:
  FASTLORA_BENCH_BACKEND  fastlora backend (default "auto"; "reference" works before the kernels exist)
  FASTLORA_BENCH_QUICK    "1": small shapes and 128 tokens, for checking the benchmark itself (env_quick: read
                          by every benchmark file's quick mode)
Importing this module is cheap: peft and bitsandbytes are imported only when a PEFT layer is built.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable

import torch

from fastlora import nf4
from fastlora.ops import lora_linear

RANK = 16
LORA_ALPHA = 32
SCALING = LORA_ALPHA / RANK  # 2.0, PEFT's scaling without rsLoRA
BLOCKSIZE = 64
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FULL = (1024, [(4096, 4096), (4096, 14336)])  # tokens, [(in_features, out_features)] (Llama-3-8B q/o and gate/up)
QUICK = (128, [(512, 512), (512, 1792)])
KV_GROUPS = 4  # query heads per key / value head in grouped-query attention (Llama-3-8B: 32 / 8)


def env_backend() -> str:
    return os.environ.get("FASTLORA_BENCH_BACKEND", "auto") or "auto"


def env_quick() -> bool:
    return os.environ.get("FASTLORA_BENCH_QUICK", "") not in ("", "0")


def tokens_and_shapes() -> tuple[int, list[tuple[int, int]]]:
    return QUICK if env_quick() else FULL


def shape_id(shape: tuple[int, int]) -> str:
    return f"{shape[0]}to{shape[1]}"


def resolved_backend(backend: str) -> str:
    """What ``backend`` means for a 4-bit lora_linear on CPU tensors here (e.g. "auto" -> "cpp")."""
    from fastlora import backends

    try:
        return backends.resolve(backend, torch.device("cpu"), ("reference", "cpp", "triton"))
    except ValueError as exc:
        return f"unavailable ({exc})"


def fastlora_unavailable(backend: str) -> str | None:
    """None when a tiny 4-bit lora_linear fwd+bwd runs on ``backend``, else the reason it does not."""
    try:
        q = nf4.quantize(torch.randn(32, 64) * 0.02, BLOCKSIZE, "nf4", True)
        x = torch.randn(4, 64, requires_grad=True)
        a = torch.randn(4, 64, requires_grad=True)
        b = torch.randn(32, 4, requires_grad=True)
        lora_linear(x, q, a, b, SCALING, dropout_p=0.1, backend=backend).sum().backward()
    except (NotImplementedError, RuntimeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0][:200]
        return (f"fastlora backend {backend!r} (-> {resolved_backend(backend)}) cannot run lora_linear here: {first}; "
                f"set FASTLORA_BENCH_BACKEND=reference to check the benchmark itself")
    return None


def peft_unavailable() -> str | None:
    """None when PEFT's bitsandbytes 4-bit LoRA layer can be built, else why not."""
    try:
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
    except ImportError as exc:
        return f"PEFT baseline needs peft and bitsandbytes: {exc}"
    try:
        from peft.tuners.lora.bnb import Linear4bit  # noqa: F401
    except ImportError as exc:
        return f"peft.tuners.lora.bnb.Linear4bit is unavailable (bitsandbytes 4-bit support missing?): {exc}"
    return None


@dataclasses.dataclass
class Problem:
    """Weights and inputs of one shape; x and dY are made per activation dtype by ``inputs``."""

    tokens: int
    in_features: int
    out_features: int
    qweight: nf4.QuantizedWeight
    lora_A: torch.Tensor  # (r, K) fp32
    lora_B: torch.Tensor  # (N, r) fp32
    dense: torch.Tensor | None = None  # (N, K) fp32, only for the floor

    def inputs(self, dtype: torch.dtype, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(self.tokens, self.in_features, generator=g).to(dtype)
        dy = (torch.randn(self.tokens, self.out_features, generator=g) * 0.01).to(dtype)
        return x, dy


def qkv_out_features(hidden: int) -> tuple[int, int, int]:
    """Out features of attention's q, k, v projections of hidden size ``hidden``, Llama-style GQA: q is
    hidden -> hidden, k and v hidden -> hidden / KV_GROUPS (Llama-3-8B: 4096 -> 4096, 1024, 1024)."""
    return hidden, hidden // KV_GROUPS, hidden // KV_GROUPS


def make_problem(tokens: int, in_features: int, out_features: int, keep_dense: bool = False, seed: int = 0) -> Problem:
    """An NF4 (double quant) weight quantized from N(0, 0.02²) values and non-zero fp32 adapters
    (B is random, not PEFT's zero init, so the LoRA branch carries real values). The dense
    weight (the floor's W) is dropped unless ``keep_dense``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g) * 0.02
    q = nf4.quantize(w, BLOCKSIZE, "nf4", True)
    a = torch.randn(RANK, in_features, generator=g) / math.sqrt(in_features)
    b = torch.randn(out_features, RANK, generator=g) * 0.01
    return Problem(tokens, in_features, out_features, q, a, b, w if keep_dense else None)


def grad_leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_(True) for t in tensors]


class Step:
    """One forward + backward: ``forward()`` builds y, ``y.backward(dy)``; gradients of the leaves
    are reset first, so they are written, not accumulated. ``exclude`` lists the tensors that are
    the layer's own (weights, adapters): saved references to them are not new memory."""

    def __init__(self, forward: Callable[[], torch.Tensor], dy: torch.Tensor, leaves: list[torch.Tensor],
                 exclude: list[torch.Tensor], names: dict[int, str]):
        self.forward, self.dy, self.leaves, self.exclude, self.names = forward, dy, leaves, exclude, names

    def __call__(self) -> None:
        for t in self.leaves:
            t.grad = None
        self.forward().backward(self.dy)


def qweight_tensors(q: nf4.QuantizedWeight) -> list[torch.Tensor]:
    out = [q.packed, q.absmax, q.code]
    if q.nested is not None:
        out += [q.nested.absmax2, q.nested.code, q.nested.offset]
    return out


def fastlora_step(p: Problem, dtype: torch.dtype, dropout_p: float, backend: str) -> Step:
    x, dy = p.inputs(dtype)
    x, a, b = grad_leaves(x, p.lora_A, p.lora_B)
    q = p.qweight
    fwd = lambda: lora_linear(x, q, a, b, SCALING, dropout_p=dropout_p, training=True, backend=backend)
    return Step(fwd, dy, [x, a, b], [a, b, *qweight_tensors(q)], {_ptr(x): "x"})


def bnb_layer(p: Problem, dtype: torch.dtype):
    """A bitsandbytes ``Linear4bit`` (no bias, compute dtype = activation dtype) holding ``p.qweight``'s very
    tensors (``fastlora.nf4.to_bnb``). The quant state's dtype is set to the activation dtype, as for a model
    loaded with ``bnb_4bit_compute_dtype`` = that dtype; the decoded values do not depend on it."""
    import bitsandbytes as bnb

    base = bnb.nn.Linear4bit(p.in_features, p.out_features, bias=False, compute_dtype=dtype,
                             compress_statistics=True, quant_type="nf4", device="meta")
    base.weight = nf4.to_bnb(dataclasses.replace(p.qweight, dtype=dtype))
    return base


def dora_magnitude(p: Problem) -> torch.Tensor:
    """DoRA's magnitude vector for ``p``: the fp32 row norms ‖W + s·BA‖ (PEFT's initialisation, here of the
    problem's non-zero adapters)."""
    from fastlora.ops.dora_linear import dora_weight_norm

    return dora_weight_norm(p.qweight, p.lora_A, p.lora_B, SCALING, torch.float32)


def peft_layer(p: Problem, dtype: torch.dtype, dropout_p: float = 0.0, use_dora: bool = False):
    """``peft.tuners.lora.bnb.Linear4bit`` (adapter "default", r=16, alpha=32) over :func:`bnb_layer`.
    Adapters are fp32, PEFT's default. ``use_dora``: a DoRA layer (``LoraConfig(use_dora=True)``) with
    :func:`dora_magnitude` as its fp32 magnitude vector."""
    from peft import LoraConfig
    from peft.tuners.lora.bnb import Linear4bit

    base = bnb_layer(p, dtype)
    config = LoraConfig(r=RANK, lora_alpha=LORA_ALPHA, lora_dropout=dropout_p, use_dora=use_dora)
    layer = Linear4bit(base, "default", config=config, r=RANK, lora_alpha=LORA_ALPHA, use_dora=use_dora)
    # PEFT moves new adapters to the base layer's dtype; get_peft_model(autocast_adapter_dtype=True),
    # its default, then upcasts them to fp32. Do the same here.
    layer.lora_A.float()
    layer.lora_B.float()
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(p.lora_A)
        layer.lora_B["default"].weight.copy_(p.lora_B)
        if use_dora:
            layer.lora_magnitude_vector.float()
            layer.lora_magnitude_vector["default"].weight.copy_(dora_magnitude(p))
    assert layer.scaling["default"] == SCALING
    return layer.train()


def peft_step(p: Problem, dtype: torch.dtype, dropout_p: float = 0.0) -> Step:
    layer = peft_layer(p, dtype, dropout_p)
    x, dy = p.inputs(dtype)
    (x,) = grad_leaves(x)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    state = layer.base_layer.weight.quant_state
    exclude = [*layer.parameters(), *layer.buffers(), state.absmax, state.code]
    if state.nested:
        exclude += [state.state2.absmax, state.state2.code, state.offset]
    return Step(lambda: layer(x), dy, [x, a, b], [t for t in exclude if isinstance(t, torch.Tensor)],
                {_ptr(x): "x"})


def floor_fn(p: Problem, dtype: torch.dtype) -> Callable[[], None]:
    """x·Wᵀ then dY·W with torch.mm on a dense W of the activation dtype: the GEMMs alone."""
    assert p.dense is not None, "make_problem(keep_dense=True) for the floor"
    w = p.dense.to(dtype)
    x, dy = p.inputs(dtype)

    def run():
        torch.mm(x, w.t())
        torch.mm(dy, w)

    return run


def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _guess_name(t: torch.Tensor, step: Step) -> str:
    x = step.leaves[0]
    if t.dim() == 0 and t.dtype == torch.int64:
        return "seed"
    if tuple(t.shape) == tuple(x.shape):
        return f"x as {str(t.dtype).replace('torch.', '')} (a copy)"
    if t.dim() == 2 and t.shape[0] == x.shape[0] and t.shape[1] == RANK:
        return "S = x·Aᵀ"
    return "?"


def saved_for_backward(step: Step) -> list[dict]:
    """The storages the forward of ``step`` saves for backward (seen by saved_tensors_hooks), one
    entry per unique storage, without the layer's own weights/adapters. Tensors a Function keeps
    as ctx attributes instead of save_for_backward are invisible here (bitsandbytes keeps its
    packed weight and quant state that way: not new memory either)."""
    skip = {_ptr(t) for t in step.exclude}
    seen: dict[int, dict] = {}

    def pack(t: torch.Tensor):
        ptr = _ptr(t)
        if ptr not in skip and ptr not in seen:
            seen[ptr] = {"name": step.names.get(ptr) or _guess_name(t, step), "shape": tuple(t.shape),
                         "dtype": str(t.dtype).replace("torch.", ""), "bytes": t.untyped_storage().nbytes()}
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = step.forward()
    del y
    return list(seen.values())
