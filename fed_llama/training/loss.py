"""The answer-only language-model loss, and held-out loss and perplexity.

The LM head (576 x 49,152 on the default backbone) is applied only at the positions whose next
token is an answer token: the loss is the same as applying it everywhere and masking, at a
fraction of the cost, since most tokens of a chat example are template and question.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from fed_llama.data.batching import collate, fixed_batches
from fed_llama.data.tokenize import IGNORE, Encoded


def _parts(model: Any) -> tuple[Any, Any]:
    """The decoder body and the LM head of a (possibly peft-wrapped) causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model, base.lm_head


def answer_token_nll(model: Any, batch: dict[str, torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The negative log-likelihood of each answer token of a batch, and the batch row each
    belongs to (both flat, in row-major order)."""
    body, head = _parts(model)
    hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    logits = head(hidden[:, :-1][keep])
    nll = F.cross_entropy(logits.float(), targets[keep], reduction="none")
    return nll, keep.nonzero()[:, 0]


def answer_nll(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed negative log-likelihood of the answer tokens of a batch, and their count."""
    nll, _rows = answer_token_nll(model, batch)
    return nll.sum(), int(nll.numel())


def example_mean_nll(nll: torch.Tensor, rows: torch.Tensor, batch_rows: int) -> torch.Tensor:
    """Per example of the batch, the mean of its answer tokens' ``nll``, summed over the
    examples that have answer tokens (each counts once, however long its answer)."""
    counts = torch.bincount(rows, minlength=batch_rows)
    sums = torch.zeros(batch_rows, dtype=nll.dtype, device=nll.device).index_add_(0, rows, nll)
    has = counts > 0
    return (sums[has] / counts[has]).sum()


@dataclass(frozen=True)
class HeldoutLoss:
    """Mean answer-token loss on held-out data and its perplexity."""

    loss: float
    perplexity: float
    tokens: int
    examples: int

    def as_dict(self) -> dict[str, float | int]:
        return {"loss": self.loss, "perplexity": self.perplexity, "tokens": self.tokens,
                "examples": self.examples}


@torch.no_grad()
def heldout_loss(model: Any, items: list[Encoded], batch_size: int, pad_id: int) -> HeldoutLoss:
    """Token-weighted mean answer loss over ``items`` (model in eval mode: no dropout)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for chunk in fixed_batches(items, batch_size):
            nll, n = answer_nll(model, collate(chunk, pad_id))
            total += float(nll)
            count += n
    finally:
        model.train(was_training)
    loss = total / max(count, 1)
    return HeldoutLoss(loss=loss, perplexity=math.exp(min(loss, 50.0)), tokens=count,
                       examples=len(items))
