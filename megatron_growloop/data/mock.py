"""Random-token dataset for throughput runs (``--mock-data``); deterministic per index."""

from __future__ import annotations

import numpy as np
import torch


class MockDataset:
    def __init__(self, vocab_size: int, seq_length: int, seed: int = 0, length: int = 1 << 30):
        self.vocab_size = int(vocab_size)
        self.seq_length = int(seq_length)
        self.seed = int(seed)
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, idx: int):
        rng = np.random.default_rng((self.seed, int(idx)))
        text = torch.from_numpy(rng.integers(0, self.vocab_size, self.seq_length + 1, dtype=np.int64))
        return {
            "tokens": text[:-1],
            "labels": text[1:],
            "loss_mask": torch.ones(self.seq_length, dtype=torch.float32),
            "position_ids": torch.arange(self.seq_length, dtype=torch.int64),
        }
