"""The demo's training loop: AdamW on the trainable (LoRA) parameters, the same batches in the same order
for every run, a progress bar with loss and tokens/s, and the measurements of :mod:`fastlora.demo.measure`
taken on one step."""

from __future__ import annotations

import contextlib
import math
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

from .corpus import Batches
from .measure import PeakTensorMemory, SavedTensorBytes, resident_bytes, resident_storages

MEASURED_STEP = 1  # measured after step 0 so that the optimizer state exists; left out of the step time


@dataclass
class RunResult:
    name: str
    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)  # every step but step 0 and MEASURED_STEP
    tokens_per_step: int = 0
    saved_bytes: int = 0
    peak_step_bytes: int = 0
    resident_bytes: int = 0
    eval_loss_start: float = math.nan
    eval_loss_end: float = math.nan

    @property
    def step_time(self) -> float:
        """Median seconds per step (step 0, which warms up, and the measured step left out)."""
        return statistics.median(self.step_seconds) if self.step_seconds else math.nan

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_per_step / self.step_time

    @property
    def final_loss(self) -> float:
        """Mean training loss of the last tenth of the steps (at least one)."""
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return sum(tail) / len(tail)

    @property
    def first_loss(self) -> float:
        head = self.losses[:max(1, len(self.losses) // 10)]
        return sum(head) / len(head)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def without_noise(model: torch.nn.Module):
    """Evaluate ``model`` without NEFTune noise: its input embedding in eval mode, every other module in
    training mode (the demo's models have no dropout). Not ``model.eval()``: bitsandbytes 0.50's
    ``Linear4bit`` in eval mode on a CPU with AVX512-BF16 repacks its weight for good into an inference
    format that computes in bf16, which would change the PEFT run's numbers after its first evaluation."""
    modes = [(m, m.training) for m in model.modules()]
    model.train()
    model.get_input_embeddings().eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for m, mode in modes:
            m.training = mode


def eval_loss(model: torch.nn.Module, batches: Batches, device: torch.device) -> float:
    """Mean loss on the held-out windows, without NEFTune noise."""
    with without_noise(model):
        losses = [model(input_ids=b.to(device), labels=b.to(device)).loss.item() for b in batches.eval_batches()]
    return sum(losses) / len(losses)


class _Progress:
    """tqdm when installed, else a line every tenth of the run."""

    def __init__(self, total: int, label: str, enabled: bool):
        self.total, self.label, self.enabled, self.bar = total, label, enabled, None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc=label, unit="step", dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                pass

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
            self.bar.update(1)
        elif (step + 1) % max(1, self.total // 10) == 0 or step + 1 == self.total:
            print(f"{self.label}: step {step + 1}/{self.total} loss {loss:.3f} {tokens_per_s:,.0f} tok/s",
                  file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train(name: str, model: torch.nn.Module, batches: Batches, *, steps: int, lr: float, device: torch.device,
          seed: int, progress: bool = True) -> RunResult:
    """Fine-tune ``model`` (already on ``device``) for ``steps`` AdamW steps on ``batches``; returns the
    loss per step, step times and the measurements of step :data:`MEASURED_STEP`."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    result = RunResult(name, tokens_per_step=batches.batch * batches.seq_len)
    result.eval_loss_start = eval_loss(model, batches, device)
    torch.manual_seed(seed)  # the NEFTune noise of each run starts from the same RNG state
    model.train()
    bar = _Progress(steps, name, progress)
    recent: list[float] = []
    try:
        for step in range(steps):
            ids = batches.batch_at(step).to(device)
            measured = step == MEASURED_STEP
            if measured:
                loss = _measured_step(model, optimizer, ids, result, device)
            else:
                _sync(device)
                start = time.perf_counter()
                loss = _step(model, optimizer, ids)
                _sync(device)
                seconds = time.perf_counter() - start
                if step > 0:
                    result.step_seconds.append(seconds)
                recent = (recent + [seconds])[-10:]
            result.losses.append(loss)
            bar.update(step, loss, result.tokens_per_step * len(recent) / sum(recent) if recent else 0.0)
    finally:
        bar.close()
    result.eval_loss_end = eval_loss(model, batches, device)
    return result


def _step(model, optimizer, ids) -> float:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def _measured_step(model, optimizer, ids, result: RunResult, device: torch.device) -> float:
    exclude = resident_storages(model, optimizer)
    result.resident_bytes = resident_bytes(model, optimizer)
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        with SavedTensorBytes(exclude) as saved:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        result.peak_step_bytes = torch.cuda.max_memory_allocated(device) - before
    else:
        tracker = PeakTensorMemory(exclude)
        with tracker:
            with SavedTensorBytes(exclude) as saved:
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        result.peak_step_bytes = tracker.peak
    result.saved_bytes = saved.nbytes
    return loss.item()
