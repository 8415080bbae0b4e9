"""Training/validation datasets through megatron-core's ``GPTDataset`` and
``BlendedMegatronDatasetBuilder``, and the deterministic micro-batch iterator.

``--data-path`` takes Megatron-LM's syntax: ``PREFIX`` or ``W1 PREFIX1 W2 PREFIX2 ...``.
The iterator is a pure function of ``consumed_samples``, which is what makes
resumption exact: a resumed run reads exactly the samples the uninterrupted run
would have read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import (
    BlendedMegatronDatasetBuilder,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from ..errors import UsageError
from .preprocess import dataset_exists
from .validate import SPLIT_NAMES, CheckedDataset, check_splits, sequence_lengths, validate_indexed_dataset


def parse_blend(data_path: Sequence[str]) -> Tuple[List[str], Optional[List[float]]]:
    """``["A"]`` -> ``(["A"], None)``; ``["0.8", "A", "0.2", "B"]`` -> ``(["A","B"], [0.8,0.2])``."""
    items = [str(x) for x in data_path]
    if not items:
        raise UsageError("--data-path is empty")
    if len(items) == 1:
        prefixes, weights = items, None
    else:
        if len(items) % 2:
            raise UsageError(
                f"--data-path {' '.join(items)!r}: expected one PREFIX or pairs 'WEIGHT PREFIX ...'"
            )
        try:
            weights = [float(w) for w in items[0::2]]
        except ValueError:
            raise UsageError(
                f"--data-path {' '.join(items)!r}: with several datasets every PREFIX needs a "
                "numeric WEIGHT before it"
            ) from None
        prefixes = items[1::2]
        if any(w <= 0 for w in weights):
            raise UsageError(f"--data-path weights must be positive, got {weights}")
    for p in prefixes:
        if p.endswith(".bin") or p.endswith(".idx"):
            raise UsageError(f"--data-path {p!r}: give the prefix without .bin/.idx")
        if not dataset_exists(p):
            raise UsageError(
                f"--data-path {p!r}: missing {p}.bin or {p}.idx (build it with tools/preprocess_data.py)"
            )
    return prefixes, weights


def build_gpt_datasets(
    blend: Tuple[List[str], Optional[List[float]]],
    tokenizer,
    seq_length: int,
    num_samples: Sequence[Optional[int]],
    split: str = "969,30,1",
    seed: int = 1234,
    cache_path: Optional[str] = None,
):
    """(train, valid, test) ``GPTDataset``/``BlendedDataset`` objects with at least the
    requested number of samples each (None: not built -- a split asked for 0 samples is not built).

    Every data set is validated first (:mod:`.validate`: index format, ``.bin`` size, token ids),
    and every split asked for samples must receive at least one sample's worth of tokens, or one
    line names the split, its documents and the minimum."""

    prefixes = list(blend[0])
    vocab = getattr(tokenizer, "vocab_size", None)
    infos = [validate_indexed_dataset(p, vocab) for p in prefixes]
    sizes = [int(n or 0) for n in num_samples]
    matrix = check_splits(prefixes, split, sizes, seq_length, [sequence_lengths(p) for p in prefixes])
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend,
        split=split,
        path_to_cache=cache_path,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mmap_bin_files=True,
    )
    # Splits nobody asked samples of are not built (an empty one looped forever in megatron-core).
    config.split_matrix = matrix
    builder = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config)
    built = builder.build()
    if vocab is None:
        return built
    names = ", ".join(i.prefix for i in infos)
    return [None if ds is None else CheckedDataset(ds, vocab, f"{split_name} split of {names}")
            for ds, split_name in zip(built, SPLIT_NAMES)]


@dataclass
class GlobalBatch:
    """How one global batch splits into micro-batches over data-parallel ranks (which samples a rank reads)."""

    micro_batch_size: int
    global_batch_size: int
    data_parallel_size: int
    data_parallel_rank: int

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.data_parallel_size)

    def microbatch_indices(self, consumed_samples: int, micro_step: int) -> range:
        """Megatron's pretraining sampler order: micro-step j of the global batch starting at
        ``consumed_samples`` covers samples ``[c + j*mbs*dp, c + (j+1)*mbs*dp)``, and DP rank r
        takes its ``mbs`` of them."""
        start = consumed_samples + micro_step * self.micro_batch_size * self.data_parallel_size
        start += self.data_parallel_rank * self.micro_batch_size
        return range(start, start + self.micro_batch_size)


BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")
OPTIONAL_BATCH_KEYS = ("segment_ids",)
"""``segment_ids``: packed fine-tuning sequences (:mod:`megatron_growloop.data.packing`)."""


def collate(samples: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    keys = BATCH_KEYS + tuple(k for k in OPTIONAL_BATCH_KEYS if k in samples[0])
    return {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in keys}


class MicroBatchSampler:
    """The index lists of this rank's micro-batches from ``consumed_samples`` on, forever
    (modulo the dataset's length): the batch sampler of the torch ``DataLoader``."""

    def __init__(self, batch: GlobalBatch, consumed_samples: int, length: int):
        self.batch = batch
        self.consumed_samples = int(consumed_samples)
        self.length = int(length)

    def __iter__(self):
        consumed = self.consumed_samples
        while True:
            for j in range(self.batch.num_microbatches):
                yield [i % self.length for i in self.batch.microbatch_indices(consumed, j)]
            consumed += self.batch.global_batch_size


class MicroBatchIterator:
    """Yields this rank's micro-batches in order; position = samples consumed globally.

    ``dataset`` is indexed modulo its length, so a short dataset cycles (with the
    dataset's own shuffling) rather than ending the run.

    With ``num_workers > 0`` the samples are read and collated by a torch ``DataLoader``
    with persistent workers, and ``pin_memory`` pins the batches for an asynchronous
    host-to-device copy, as Megatron-LM's loader does
    (``megatron/training/datasets/data_samplers.py``: ``--num-workers`` 2, ``pin_memory=True``,
    ``persistent_workers``; the trainer defaults to 0 workers on a CPU, where they would take
    cores from the training threads).  The workers read ahead from the same deterministic sampler,
    so the batches are the same as without them; the position counts what was *taken*,
    not what was prefetched, so resumption stays exact.
    """

    def __init__(self, dataset, batch: GlobalBatch, consumed_samples: int = 0, num_workers: int = 0,
                 pin_memory: bool = False):
        self.dataset = dataset
        self.batch = batch
        self.consumed_samples = int(consumed_samples)
        self._micro_step = 0
        self._loader = None
        if num_workers > 0 or pin_memory:
            self._loader = iter(torch.utils.data.DataLoader(
                dataset,
                batch_sampler=MicroBatchSampler(batch, consumed_samples, len(dataset)),
                num_workers=num_workers,
                collate_fn=collate,
                pin_memory=pin_memory,
                persistent_workers=num_workers > 0,
            ))

    def __iter__(self):
        return self

    def __next__(self) -> Dict[str, torch.Tensor]:
        if self._loader is not None:
            batch = next(self._loader)
        else:
            idx = self.batch.microbatch_indices(self.consumed_samples, self._micro_step)
            n = len(self.dataset)
            batch = collate([self.dataset[i % n] for i in idx])
        self._micro_step += 1
        if self._micro_step == self.batch.num_microbatches:
            self._micro_step = 0
            self.consumed_samples += self.batch.global_batch_size
        return batch
