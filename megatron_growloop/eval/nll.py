"""Held-out negative log-likelihood on an indexed dataset (the paper's NLL column).

The samples are megatron-core ``GPTDataset`` samples of ``seq_length`` tokens from one
split (default: the validation split of ``--split 969,30,1``, the split pretraining
holds out), taken in the dataset's order; the NLL is the token-weighted mean of
megatron-core's per-token cross entropy (nats per token), i.e. the validation loss
pretraining reports, under the model's current loop / repeat-block schedule.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from ..data.datasets import build_gpt_datasets, parse_blend
from ..data.default_corpus import default_data_prefix
from ..errors import UsageError
from . import parallel
from .engine import LogProbEngine

SPLITS = {"train": 0, "valid": 1, "test": 2}


def build_eval_dataset(
    tokenizer,
    seq_length: int,
    num_samples: int,
    data_path: Optional[Sequence[str]] = None,
    split: str = "969,30,1",
    split_name: str = "valid",
    seed: int = 1234,
    cache_path: Optional[str] = None,
):
    """The ``split_name`` dataset of ``data_path`` (default: the embedded corpus)."""


    if split_name not in SPLITS:
        raise UsageError(f"--split-name {split_name!r}: choose one of {', '.join(SPLITS)}")
    if num_samples < 1:
        raise UsageError(f"--num-samples must be >= 1, got {num_samples}")
    if data_path:
        blend = parse_blend(data_path)
    else:

        if not dist.is_initialized() or dist.get_rank() == 0:
            default_data_prefix(tokenizer)
        if dist.is_initialized():
            dist.barrier()
        blend = ([default_data_prefix(tokenizer, build=False)], None)
    sizes: List[Optional[int]] = [None, None, None]
    sizes[SPLITS[split_name]] = num_samples
    datasets = build_gpt_datasets(blend, tokenizer, seq_length, sizes, split, seed, cache_path)
    ds = datasets[SPLITS[split_name]]
    if ds is None or len(ds) == 0:
        raise UsageError(f"--split {split!r} leaves no {split_name} data")
    return ds


def heldout_nll(
    engine: LogProbEngine,
    dataset,
    num_samples: int,
    micro_batch_size: int = 4,
) -> Dict[str, Any]:
    """Mean per-token NLL over the first ``num_samples`` samples of ``dataset``."""

    n = min(int(num_samples), len(dataset))
    starts = list(range(0, n, micro_batch_size))
    mine = parallel.shard(starts)  # data-parallel ranks take micro-batches round robin
    partial = []
    for k in mine:
        start = starts[k]
        idx = range(start, min(n, start + micro_batch_size))
        samples = [dataset[i] for i in idx]
        tokens = torch.stack([torch.as_tensor(s["tokens"]) for s in samples]).long()
        labels = torch.stack([torch.as_tensor(s["labels"]) for s in samples]).long()
        mask = torch.stack([torch.as_tensor(s["loss_mask"]) for s in samples]).float()
        if tokens.shape[1] > engine.max_length:
            raise UsageError(
                f"--seq-length {tokens.shape[1]} exceeds the model's context length of {engine.max_length} tokens"
            )
        partial.append(engine.token_nll(tokens, labels, mask))
    sums = parallel.gather_sharded(len(starts), mine, partial)
    total = sum(s for s, _ in sums)
    count = sum(c for _, c in sums)
    nll = total / max(count, 1.0)
    # standard error over micro-batches (held-out sampling error; the same samples for every model)
    per_batch = [s / c for s, c in sums if c > 0]
    se = (float(np.std(per_batch, ddof=1) / math.sqrt(len(per_batch))) if len(per_batch) > 1 else float("nan"))
    return {"nll": nll, "nll_stderr": se, "stderr_over": f"{len(per_batch)} micro-batches of {micro_batch_size}",
            "perplexity": math.exp(nll) if nll < 700 else float("inf"), "tokens": int(count), "samples": n}
