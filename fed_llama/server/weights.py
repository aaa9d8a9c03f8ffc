"""How much each site's update counts in a round: its reported example count, bounded.

A site reports how many examples it trained on, and FedAvg weighs its update by that count.
The count is the site's own word (signed, so it is that site's, but not checked), so one
enrolled site reporting a huge count would take the round over, and counts near the float
maximum would overflow the sum and zero the global adapter. Each count is therefore bounded
before it becomes a weight:

* ``max_examples``: an absolute cap on any count;
* ``max_weight_ratio`` (c): no count above c times the median of the round's counts.

With ``weighting = "equal"`` every admitted update counts the same.

**The bound.** Let k of the round's n admitted sites be hostile, with k < n / 2, and M the
median count. The median is then at most the largest honest count, so every hostile weight is
at most c·M, and the hostile sites' share of the aggregate is at most
``s = k·c·M / (k·c·M + H)``, H the honest sites' total (bounded) weight. The aggregate is
``(1 - s)·honest_mean + s·hostile_mean`` (FedAvg on factors), so it stays within
``s · max ||hostile update - honest mean||`` of the honest sites' weighted mean, and the
per-update checks (``security.max_update_norm``, ``norm_outlier_factor``) bound the second
factor. Equal weights give ``s = k / n``.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Sequence

log = logging.getLogger(__name__)


def bounded_weights(counts: Sequence[float], *, weighting: str = "examples",
                    max_ratio: float = 0.0, max_examples: float = 0.0,
                    names: Sequence[str] | None = None) -> list[float]:
    """The aggregation weight of each reported example count (``names``: for the log).

    Every count must be finite and positive (the strategy refuses others before this).
    ``max_ratio`` and ``max_examples`` of 0 switch that cap off.
    """
    if any(not math.isfinite(c) or c <= 0 for c in counts):
        raise ValueError(f"example counts must be finite and positive; got {list(counts)}")
    if weighting == "equal":
        return [1.0] * len(counts)
    if weighting != "examples":
        raise ValueError(f"weighting must be 'examples' or 'equal'; got {weighting!r}")
    caps = [math.inf]
    if max_examples:
        caps.append(max_examples)
    if max_ratio and counts:
        caps.append(max_ratio * statistics.median(counts))
    cap = min(caps)
    out = [min(float(c), cap) for c in counts]
    for i, (c, w) in enumerate(zip(counts, out, strict=True)):
        if w < c:
            who = names[i] if names is not None else f"update {i}"
            log.warning("%s reports %.4g examples; it counts as %.4g (the weight cap: "
                        "federation.max_weight_ratio x median, federation.max_examples)",
                        who, c, w)
    return out
