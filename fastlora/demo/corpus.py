"""The demo's text and tokenizer: the shipped corpus (:mod:`fastlora.demo.make_corpus`), a byte-level
tokenizer and the fixed-order batches both runs of the demo train on."""

from __future__ import annotations

import torch

from .errors import DemoError
from .make_corpus import shipped_path


class ByteTokenizer:
    """Bytes 0..255 are their own ids; ``pad``, ``bos`` and ``eos`` follow (vocabulary 259). Nothing to
    download or train, and every string round-trips."""

    PAD, BOS, EOS = 256, 257, 258
    vocab_size = 259

    def encode(self, text: str) -> torch.Tensor:
        """(len(bytes),) int64 ids of ``text`` encoded as UTF-8."""
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).to(torch.int64)

    def decode(self, ids) -> str:
        """The text of the byte ids in ``ids``; special ids are dropped, invalid UTF-8 shows as U+FFFD."""
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")


def load_corpus() -> str:
    """The shipped corpus text (``fastlora/data/fables.txt``)."""
    path = shipped_path()
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise DemoError(f"the demo corpus {path} cannot be read ({e.strerror}); reinstall fastlora") from None


class Batches:
    """Training windows of ``seq_len`` tokens from the first 90% of the token stream, in an order fixed by
    ``seed`` (every run with the same seed sees the same batches); the last 10% is held out for the eval
    loss.

    ``batch(step)`` is (batch, seq_len) int64; ``eval_batches()`` are the held-out windows laid end to end
    (at most ``max_eval`` batches)."""

    def __init__(self, ids: torch.Tensor, *, batch: int, seq_len: int, seed: int, max_eval: int = 4):
        if ids.dim() != 1:
            raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}")
        split = int(len(ids) * 0.9)
        self.train_ids, self.eval_ids = ids[:split], ids[split:]
        self.batch, self.seq_len, self.seed, self.max_eval = batch, seq_len, seed, max_eval
        starts = len(self.train_ids) - seq_len + 1
        if starts < batch or len(self.eval_ids) < seq_len:
            need = max(seq_len + batch - 1, seq_len) * 10 // 9 + 1
            raise DemoError(f"--seq-len {seq_len} with --batch {batch} needs a corpus of at least ~{need} tokens "
                            f"(90% for training, 10% held out), the corpus has {len(ids)}; use a smaller --seq-len")
        self._starts = starts

    def batch_at(self, step: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, self._starts, (self.batch,), generator=generator)
        return torch.stack([self.train_ids[s:s + self.seq_len] for s in starts.tolist()])

    def eval_batches(self) -> list[torch.Tensor]:
        n = len(self.eval_ids) // self.seq_len
        windows = self.eval_ids[:n * self.seq_len].view(n, self.seq_len)
        return [windows[i:i + self.batch] for i in range(0, n, self.batch)][:self.max_eval]
