"""Seeds of LoRA dropout that survive activation checkpointing in every mode.

The dropout mask is never stored: forward draws a 63-bit seed, saves it (a CPU int64 tensor, via
``ctx.save_for_backward``) and backward regenerates the mask from it with Philox.

Under ``torch.utils.checkpoint`` the forward runs twice, and the recomputed forward must use the
seed of the original one:
* The seed is always drawn from torch's CPU generator, so ``torch.manual_seed`` reproduces runs and,
  with ``preserve_rng_state=True`` (torch's and Hugging Face's default), the restored generator
  hands the recomputation the same seed. Drawing also on recompute keeps the generator in step for
  the random ops that follow in the same checkpointed region.
* With ``preserve_rng_state=False`` the generator is not restored, so a Python counter or the
  generator alone would silently give the recomputation another mask (DESIGN.md §5). Therefore each
  original forward also records its seed per call site (keyed by the ``lora_A`` tensor); a forward
  that runs inside a backward pass is a recomputation and takes the newest seed recorded for its
  call site that no backward has consumed yet. The op's backward consumes it.

Limitation: if one adapter is called twice inside the same checkpointed region with
``preserve_rng_state=False``, the two recomputations cannot be told apart (both take the newest
seed). Calls of one adapter in different regions, or with the RNG state preserved, are exact.
"""

from __future__ import annotations

import collections
import threading

import torch
from torch.utils.weak import WeakIdKeyDictionary

_MAX_PENDING = 64  # per call site; forwards that never see a backward (inference) drop off here
_lock = threading.Lock()
_pending: WeakIdKeyDictionary = WeakIdKeyDictionary()


def in_backward() -> bool:
    """True while the autograd engine runs a backward pass on this thread (checkpoint recompute)."""
    return torch._C._current_graph_task_id() != -1


@torch.compiler.disable  # eager draw: under torch.compile the same generator gives the same masks as eager
def draw_seed(call_site: torch.Tensor) -> int:
    """The dropout seed of one forward call of the adapter ``call_site`` (its lora_A)."""
    seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64).item())
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


def consume_seed(call_site: torch.Tensor, seed: int) -> None:
    """Backward of the call that used ``seed`` is done: forget it."""
    with _lock:
        queue = _pending.get(call_site)
        if not queue:
            return
        for i in range(len(queue) - 1, -1, -1):
            if queue[i] == seed:
                del queue[i]
                return


def pending_count(call_site: torch.Tensor) -> int:
    """Recorded seeds of ``call_site`` not consumed by a backward yet (for tests and diagnostics)."""
    with _lock:
        queue = _pending.get(call_site)
        return 0 if queue is None else len(queue)
