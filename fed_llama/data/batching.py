"""Batches of encoded examples: length-grouped order and dynamic padding."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import TYPE_CHECKING

from fed_llama.data.tokenize import IGNORE, Encoded

if TYPE_CHECKING:
    import torch

MEGABATCH = 32  # batches pooled before sorting by length: enough to group, still shuffled


def batch_order(lengths: list[int], batch_size: int, seed: int,
                group_by_length: bool = True) -> Iterator[list[int]]:
    """Endless batches of indices, a fresh shuffle each epoch.

    With ``group_by_length``, examples are shuffled, cut into pools of ``MEGABATCH`` batches,
    each pool sorted by length and cut into batches, and the batches shuffled again: batches
    hold similar lengths (little padding) while the order stays random.
    """
    epoch = 0
    while True:
        rng = random.Random(seed * 1_000_003 + epoch)
        order = list(range(len(lengths)))
        rng.shuffle(order)
        if group_by_length:
            pool = batch_size * MEGABATCH
            chunks = [sorted(order[i:i + pool], key=lambda j: -lengths[j])
                      for i in range(0, len(order), pool)]
            batches = [c[i:i + batch_size] for c in chunks for i in range(0, len(c), batch_size)]
            rng.shuffle(batches)
        else:
            batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        yield from batches
        epoch += 1


def collate(items: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch on the right to its longest member."""
    import torch

    width = max(len(x.input_ids) for x in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item.input_ids)
        ids[row, :n] = torch.tensor(item.input_ids)
        labels[row, :n] = torch.tensor(item.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def fixed_batches(items: list[Encoded], batch_size: int) -> list[list[Encoded]]:
    """Deterministic batches for evaluation, sorted by length to minimise padding."""
    ordered = sorted(items, key=lambda x: len(x.input_ids))
    return [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]
