"""Dirichlet(alpha) partitioning of pooled data into N simulated sites (label skew).

Each category's examples are shared out among the N sites in proportions drawn from a
symmetric Dirichlet(alpha): small alpha gives each site a few dominant categories, large alpha
approaches an even (IID) split. The same proportions split the training and the held-out
examples, so every site is evaluated on data distributed like its own.

Flower's ``flwr-datasets`` has a DirichletPartitioner, but it works on Hugging Face
``datasets`` tables (pyarrow and the ``datasets`` stack); sites here hold plain example lists,
and the algorithm is a few lines.
"""

from __future__ import annotations

import numpy as np

from fed_llama.data.source import SiteExamples
from fed_llama.errors import ConfigError

MAX_DRAWS = 100


def dirichlet_proportions(categories: int, parts: int, alpha: float, seed: int) -> np.ndarray:
    """A (categories, parts) matrix whose rows are Dirichlet(alpha) shares of each category."""
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.full(parts, alpha), size=categories)


def split_by_proportions(labels: list[int], proportions: np.ndarray, seed: int
                         ) -> list[list[int]]:
    """Indices of ``labels`` per part: category ``c``'s items cut by ``proportions[c]``."""
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(proportions.shape[1])]
    for c in range(proportions.shape[0]):
        idx = np.flatnonzero(np.asarray(labels) == c)
        rng.shuffle(idx)
        cuts = (np.cumsum(proportions[c])[:-1] * len(idx)).round().astype(int)
        for part, chunk in enumerate(np.split(idx, cuts)):
            parts[part].extend(int(i) for i in chunk)
    return [sorted(p) for p in parts]


def dirichlet_partition(train_labels: list[int], heldout_labels: list[int], parts: int,
                        alpha: float, seed: int, min_train: int = 1, min_heldout: int = 1
                        ) -> tuple[list[list[int]], list[list[int]]]:
    """Train and held-out indices per part, redrawn until every part has enough of both."""
    categories = max(train_labels + heldout_labels) + 1
    for draw in range(MAX_DRAWS):
        props = dirichlet_proportions(categories, parts, alpha, seed + draw)
        train = split_by_proportions(train_labels, props, seed + draw)
        held = split_by_proportions(heldout_labels, props, seed + draw + 1)
        if min(map(len, train)) >= min_train and min(map(len, held)) >= min_heldout:
            return train, held
    raise ConfigError(f"federation.dirichlet_alpha = {alpha}: in {MAX_DRAWS} draws some of the "
                      f"{parts} sites got fewer than {min_train} training or {min_heldout} "
                      "held-out examples: raise dirichlet_alpha or lower num_partitions")


def partition_sites(pools: list[SiteExamples], parts: int, alpha: float, seed: int
                    ) -> list[SiteExamples]:
    """Pool the sources' examples (each source one category) and deal them out to ``parts``
    simulated sites by Dirichlet(alpha)."""
    train = [(c, ex) for c, pool in enumerate(pools) for ex in pool.train]
    held = [(c, ex) for c, pool in enumerate(pools) for ex in pool.heldout]
    train_idx, held_idx = dirichlet_partition([c for c, _ in train], [c for c, _ in held],
                                              parts, alpha, seed)
    sources = [p.summary.get("source") for p in pools]
    out = []
    for part, (ti, hi) in enumerate(zip(train_idx, held_idx, strict=True)):
        mix = np.bincount([train[i][0] for i in ti], minlength=len(pools))
        summary = {"source": f"dirichlet(alpha={alpha}) part {part} of {parts}",
                   "categories": {str(s): int(n) for s, n in zip(sources, mix, strict=True)},
                   "train_records": len(ti), "heldout_records": len(hi), "skipped_lines": 0}
        out.append(SiteExamples(train=[train[i][1] for i in ti],
                                heldout=[held[i][1] for i in hi], summary=summary))
    return out
