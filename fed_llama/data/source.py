"""A site's data, from config to encoded training and held-out sets."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from fed_llama.config.train import ICD10_PREFIX, DataConfig
from fed_llama.data import icd10
from fed_llama.data.records import Example, read_jsonl, with_system
from fed_llama.data.tokenize import Encoded, encode, encode_all
from fed_llama.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class SiteExamples:
    """A site's raw examples, before tokenization."""

    train: list[Example]
    heldout: list[Example]
    summary: dict[str, Any]


@dataclass(frozen=True)
class SiteData:
    """A site's encoded examples and a summary for manifests and metrics."""

    train: list[Encoded]
    heldout: list[Encoded]
    heldout_examples: list[Example]
    summary: dict[str, Any]


def seeded_split(items: list[Example], fraction: float, seed: int
                 ) -> tuple[list[Example], list[Example]]:
    """Split off a seeded ``fraction`` (at least one item) as validation; keep file order."""
    if len(items) < 2:
        raise DataError(f"need at least 2 records to split off validation data; got {len(items)}")
    rng = random.Random(seed)
    k = max(1, round(len(items) * fraction))
    held = set(rng.sample(range(len(items)), k))
    return ([x for i, x in enumerate(items) if i not in held],
            [x for i, x in enumerate(items) if i in held])


def sample(items: list[T], limit: int, seed: int) -> list[T]:
    """A seeded sample of at most ``limit`` items (0: all), in their original order."""
    if not limit or len(items) <= limit:
        return items
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]


def load_examples(cfg: DataConfig, seed: int) -> SiteExamples:
    """Read the configured source and held-out data (before tokenization)."""
    summary: dict[str, Any] = {"source": cfg.source}
    if cfg.source.startswith(ICD10_PREFIX):
        split = icd10.site_split(cfg.source[len(ICD10_PREFIX):], seed=seed,
                                 answer=cfg.icd10_answers)
        train = [ex for ex in split.train if ex.meta["task"] in cfg.icd10_train_tasks]
        heldout = split.heldout
        summary.update(site=split.site, codes=split.num_codes,
                       heldout_codes=split.num_heldout_codes, skipped_lines=0)
    else:
        result = read_jsonl(Path(cfg.source), skip_bad=cfg.skip_bad_lines)
        summary["skipped_lines"] = result.skipped
        train, heldout = result.examples, []
        if not cfg.heldout:
            train, heldout = seeded_split(train, cfg.val_fraction, seed)
    if cfg.heldout:
        held = read_jsonl(Path(cfg.heldout), skip_bad=cfg.skip_bad_lines)
        heldout = held.examples
        summary["heldout"] = cfg.heldout
        summary["skipped_lines"] += held.skipped
    train = sample(train, cfg.max_train_records, seed)
    heldout = sample(heldout, cfg.max_heldout_records, seed)
    train = with_system(train, cfg.trained_system_prompt)
    heldout = with_system(heldout, cfg.trained_system_prompt)
    summary.update(train_records=len(train), heldout_records=len(heldout))
    return SiteExamples(train=train, heldout=heldout, summary=summary)


def load_site_data(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> SiteData:
    """Read, split and encode a site's data as ``cfg`` says."""
    return encode_site(load_examples(cfg, seed), cfg, tokenizer)


def encode_site(raw: SiteExamples, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase
                ) -> SiteData:
    """Encode a site's examples (``cfg.max_length``); refuse a site left with nothing."""
    train, dropped_train = encode_all(tokenizer, raw.train, cfg.max_length)
    encoded = [(ex, encode(tokenizer, ex, cfg.max_length)) for ex in raw.heldout]
    heldout_pairs = [(ex, enc) for ex, enc in encoded if enc.num_answer_tokens]
    dropped_held = len(raw.heldout) - len(heldout_pairs)
    if dropped_train or dropped_held:
        log.warning("%d training and %d held-out record(s) dropped: their answer starts beyond "
                    "data.max_length=%d tokens", dropped_train, dropped_held, cfg.max_length)
    if not train:
        raise DataError(f"data.source {cfg.source!r}: no training record fits in "
                        f"data.max_length={cfg.max_length} tokens: raise max_length")
    if not heldout_pairs:
        raise DataError(f"data {cfg.source!r}: no held-out record left to evaluate on: "
                        "give data.heldout or raise data.max_length")
    summary = dict(raw.summary, dropped_too_long=dropped_train + dropped_held,
                   train_tokens=sum(len(x.input_ids) for x in train),
                   train_answer_tokens=sum(x.num_answer_tokens for x in train))
    return SiteData(train=train, heldout=[enc for _, enc in heldout_pairs],
                    heldout_examples=[ex for ex, _ in heldout_pairs], summary=summary)
