"""Seeds of LoRA dropout and NEFTune noise: drawn per forward call, survive activation checkpointing.

Masks and noise are never stored: forward draws a 63-bit seed, the op's kernels generate the
randomness from it with Philox, and backward regenerates the same randomness from the saved seed.

The seed is a tensor (int64, 0-dim, on the input's device), never a Python int: the ops take it as a
``Tensor seed`` argument, so ``torch.compile`` traces them without a graph break, and GPU kernels read
it from device memory at run time, so a captured CUDA graph draws (``torch.randint`` on the device's
generator is graph-safe) and reads a fresh seed on every replay instead of a constant baked in at
capture. Nothing here reads a seed's value on the host.

Eager mode, under ``torch.utils.checkpoint`` the forward runs twice and the recomputed forward must
use the seed of the original one:
* The seed is drawn from torch's generator of the input's device, so ``torch.manual_seed``
  reproduces runs and, with ``preserve_rng_state=True`` (torch's and Hugging Face's default), the
  restored generator hands the recomputation the same seed. Drawing also on recompute keeps the
  generator in step for the random ops that follow in the same checkpointed region.
* With ``preserve_rng_state=False`` the generator is not restored, so a Python counter or the
  generator alone would silently give the recomputation another mask (DESIGN.md §5). Therefore each
  original forward also records its seed tensor per call site (keyed by the ``lora_A`` tensor, or
  the embedding weight); a forward that runs inside a backward pass is a recomputation and takes the
  newest seed recorded for its call site that no backward has consumed yet. The op's backward
  consumes it (by identity: the autograd node keeps the seed tensor object it was given).

Limitation: if one adapter is called twice inside the same checkpointed region with
``preserve_rng_state=False``, the two recomputations cannot be told apart (both take the newest
seed). Calls of one adapter in different regions, or with the RNG state preserved, are exact.

Under ``torch.compile`` the draw is part of the graph (no stash: compiled code cannot keep Python
state per call); the compiler's own rules for random ops in checkpointed regions then apply.
"""

from __future__ import annotations

import collections
import threading

import torch
from torch.utils.weak import WeakIdKeyDictionary

SEED_HIGH = 2**63 - 1  # seeds are drawn in [0, 2^63 - 1)
_MAX_PENDING = 64  # per call site; forwards that never see a backward (inference) drop off here
_lock = threading.Lock()
_pending: WeakIdKeyDictionary = WeakIdKeyDictionary()


def in_backward() -> bool:
    """True while the autograd engine runs a backward pass on this thread (checkpoint recompute)."""
    return torch._C._current_graph_task_id() != -1


def no_seed(device: torch.device) -> torch.Tensor:
    """The seed argument of a call without randomness (dropout 0): an int64 zero on ``device``."""
    return torch.zeros((), dtype=torch.int64, device=device)


def draw_seed(call_site: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """The seed of one forward call of ``call_site`` (its lora_A, or the embedding weight): an int64
    0-dim tensor on ``device``. ``call_site`` None (what the ops pass under torch.compile) skips the
    checkpoint stash."""
    seed = torch.randint(0, SEED_HIGH, (), dtype=torch.int64, device=device)
    if call_site is None or torch.compiler.is_compiling():
        return seed
    with _lock:
        queue = _pending.get(call_site)
        if in_backward():
            if queue:
                return queue[-1]
            return seed
        if queue is None:
            queue = collections.deque(maxlen=_MAX_PENDING)
            _pending[call_site] = queue
        queue.append(seed)
    return seed


def call_site_of(tensor: torch.Tensor) -> torch.Tensor | None:
    """The key under which a call's seed is stashed: ``tensor`` in eager mode, None under torch.compile
    (no stash there; also keeps the same tensor from entering an autograd.Function twice)."""
    return None if torch.compiler.is_compiling() else tensor


def consume_seed(call_site: torch.Tensor | None, seed: torch.Tensor) -> None:
    """Backward of the call that used ``seed`` (the tensor object draw_seed returned) is done: forget it."""
    if call_site is None:
        return
    with _lock:
        queue = _pending.get(call_site)
        if not queue:
            return
        for i in range(len(queue) - 1, -1, -1):
            if queue[i] is seed:
                del queue[i]
                return


def pending_count(call_site: torch.Tensor) -> int:
    """Recorded seeds of ``call_site`` not consumed by a backward yet (for tests and diagnostics)."""
    with _lock:
        queue = _pending.get(call_site)
        return 0 if queue is None else len(queue)
