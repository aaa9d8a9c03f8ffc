"""Check an exported ONNX model against the PyTorch merged model it came from.

On held-out data from each source: answer-token perplexity of both models, greedy next-token
(top-1) agreement and the largest logit difference; generated answers to held-out questions
scored by task; and speed (prefill latency, decode tokens/s with the KV cache). The export is
refused when perplexity or agreement is outside the profile's bounds.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fed_llama.config.export import ExportConfig, VerifyConfig
from fed_llama.data import icd10
from fed_llama.data.records import Example, read_jsonl, with_system
from fed_llama.data.source import sample
from fed_llama.data.tokenize import IGNORE, Encoded, encode_all
from fed_llama.errors import ConfigError
from fed_llama.evaluation.tasks import choose_questions, evaluate_tasks, score_answers
from fed_llama.export.host import export_host, host_label
from fed_llama.export.runtime import ArrayDecoding, Decoding, OnnxCausalLM

log = logging.getLogger(__name__)
ICD10 = "icd10:"


def verification_sources(cfg: VerifyConfig, adapter_manifest: dict[str, Any]) -> list[str]:
    """``verify.data``, else the adapter's own data: its source, or its federation's sites."""
    if cfg.data:
        return list(cfg.data)
    source = adapter_manifest.get("data", {}).get("source")
    if source:
        return [str(source)]
    sites = [s for s in adapter_manifest.get("sites", []) if s in icd10.SITES]
    if sites:
        return [f"{ICD10}{s}" for s in sites]
    raise ConfigError("no held-out data to verify the export on: the adapter's manifest names "
                      "none; pass --set verify.data=['icd10:cardiology'] or a JSONL file")


def heldout_examples(source: str, cfg: VerifyConfig, system: str | None = None
                     ) -> list[Example]:
    """A seeded sample of ``cfg.records`` held-out examples of ``source``, with the system
    message ``system`` (the adapter's; None: the chat template's)."""
    if source.startswith(ICD10):
        examples = icd10.site_split(source[len(ICD10):], seed=cfg.seed).heldout
    else:
        examples = read_jsonl(Path(source)).examples
    return with_system(sample(examples, cfg.records, cfg.seed), system)


def calibration_examples(source: str, cfg: ExportConfig, system: str | None = None
                         ) -> list[Example]:
    """``cfg.calibration_records`` seeded records of ``source`` that verification does not use:
    an ICD-10 site's training split, or a JSONL file's records outside the verification
    sample."""
    v = cfg.verify
    if source.startswith(ICD10):
        pool = icd10.site_split(source[len(ICD10):], seed=v.seed).train
    else:
        examples = read_jsonl(Path(source)).examples
        held = {id(ex) for ex in sample(examples, v.records, v.seed)}
        pool = [ex for ex in examples if id(ex) not in held]
        if not pool:
            raise ConfigError(f"{source}: all {len(examples)} records are used for verification "
                              f"(verify.records = {v.records}), none is left to calibrate "
                              "algorithm = 'gptq' on: lower verify.records or give more data")
    return with_system(sample(pool, cfg.calibration_records, v.seed + 1), system)


def calibration_set(sources: list[str], cfg: ExportConfig, system: str | None = None
                    ) -> list[Example]:
    """The calibration records of every source for ``algorithm = 'gptq'`` (none otherwise)."""
    if cfg.algorithm != "gptq":
        return []
    return [ex for source in sources for ex in calibration_examples(source, cfg, system)]


@dataclass
class Agreement:
    """Sums over answer tokens (perplexity) and all positions (agreement) of one source."""

    nll_torch: float = 0.0
    nll_onnx: float = 0.0
    answer_tokens: int = 0
    agree: int = 0
    positions: int = 0
    max_logit_diff: float = 0.0

    def add(self, item: Encoded, ref: np.ndarray, got: np.ndarray) -> None:
        ids = np.asarray(item.input_ids)
        labels = np.asarray(item.labels[1:])
        mask = labels != IGNORE
        targets = ids[1:][mask]
        for logits, attr in ((ref, "nll_torch"), (got, "nll_onnx")):
            rows = logits[:-1][mask].astype(np.float64)
            top = rows.max(axis=1, keepdims=True)
            logz = np.log(np.exp(rows - top).sum(axis=1)) + top[:, 0]
            nll = float((logz - rows[np.arange(len(targets)), targets]).sum())
            setattr(self, attr, getattr(self, attr) + nll)
        self.answer_tokens += int(mask.sum())
        self.agree += int((ref.argmax(axis=1) == got.argmax(axis=1)).sum())
        self.positions += len(ids)
        self.max_logit_diff = max(self.max_logit_diff, float(np.abs(ref - got).max()))

    def merge(self, other: Agreement) -> None:
        for name in ("nll_torch", "nll_onnx", "answer_tokens", "agree", "positions"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.max_logit_diff = max(self.max_logit_diff, other.max_logit_diff)

    def summary(self) -> dict[str, float]:
        n = max(self.answer_tokens, 1)
        return {"perplexity-pytorch": math.exp(self.nll_torch / n),
                "perplexity-onnx": math.exp(self.nll_onnx / n),
                "top1-agreement": self.agree / max(self.positions, 1),
                "max-logit-diff": self.max_logit_diff,
                "answer-tokens": self.answer_tokens}


def torch_logits(model: Any, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=False).logits[0]
    return out.float().numpy()


def onnx_answers(lm: OnnxCausalLM, questions: list[Example], max_new_tokens: int) -> list[str]:
    return [lm.answer(list(ex.prompt), max_new_tokens) for ex in questions]


def speed_onnx(lm: OnnxCausalLM, prompt: list[int], decode_tokens: int, *,
               array_cache: bool = False) -> dict[str, float]:
    """Prefill latency of ``prompt`` and greedy decode speed (KV cache) with onnxruntime:
    as ``generate`` decodes (in place where the graph can), or with ``array_cache`` the cache
    fed back as arrays every step (to measure what decoding in place buys)."""
    capacity = len(prompt) + decode_tokens

    def decoding() -> Decoding:
        return ArrayDecoding(lm, capacity) if array_cache else lm.decoding(capacity)

    decoding().step(prompt[:8])  # warm-up
    state = decoding()
    start = time.perf_counter()
    logits = state.step(prompt)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(decode_tokens):
        logits = state.step([int(np.argmax(logits[-1]))])
    decode = time.perf_counter() - start
    return {"prefill-ms": 1000 * prefill, "decode-tokens-per-s": decode_tokens / decode}


def speed_torch(model: Any, prompt: list[int], decode_tokens: int) -> dict[str, float]:
    """The same measurement for PyTorch eager with its KV cache."""
    import torch

    from fed_llama.backbone.kv_cache import cache_argument, returned_cache

    argument = cache_argument(model)
    with torch.no_grad():
        model(torch.tensor([prompt[:8]]))  # warm-up
        start = time.perf_counter()
        out = model(torch.tensor([prompt]), use_cache=True)
        prefill = time.perf_counter() - start
        cache, logits = returned_cache(out), out.logits
        start = time.perf_counter()
        for _ in range(decode_tokens):
            token = logits[0, -1].argmax().view(1, 1)
            out = model(token, use_cache=True, **{argument: cache})
            cache, logits = returned_cache(out), out.logits
        decode = time.perf_counter() - start
    return {"prefill-ms": 1000 * prefill, "decode-tokens-per-s": decode_tokens / decode}


def speed_prompt(items: list[Encoded], length: int) -> list[int]:
    """``length`` real held-out tokens (records concatenated, repeated if need be)."""
    tokens = [t for item in items for t in item.input_ids] or [0]
    return (tokens * (length // len(tokens) + 1))[:length]


def verify_export(merged: Any, tokenizer: Any, lm: OnnxCausalLM, cfg: ExportConfig,
                  sources: list[str], system: str | None = None) -> dict[str, Any]:
    """Compare ``lm`` with the PyTorch ``merged`` model; the report for the manifest."""
    from tqdm.auto import tqdm

    v = cfg.verify
    report: dict[str, Any] = {"sources": {}, "bounds": {
        "max-perplexity-increase": cfg.perplexity_bound(),
        "min-top1-agreement": v.min_top1_agreement}}
    pooled = Agreement()
    all_items: list[Encoded] = []
    for source in sources:
        examples = heldout_examples(source, v, system)
        items, _ = encode_all(tokenizer, examples, v.max_length)
        all_items += items
        agreement = Agreement()
        for item in tqdm(items, desc=f"verify {source}", leave=False, unit="record"):
            agreement.add(item, torch_logits(merged, item.input_ids),
                          lm.sequence_logits(item.input_ids))
        entry: dict[str, Any] = agreement.summary()
        if v.questions:
            questions = choose_questions(examples, v.questions, v.seed)
            entry["tasks-pytorch"] = evaluate_tasks(
                merged, tokenizer, questions, max_questions=v.questions, seed=v.seed,
                max_new_tokens=v.max_new_tokens).flat()
            entry["tasks-onnx"] = score_answers(
                questions, onnx_answers(lm, questions, v.max_new_tokens)).flat()
        report["sources"][source] = entry
        pooled.merge(agreement)
        log.info("%s: perplexity PyTorch %.3f, ONNX %.3f; top-1 agreement %.3f",
                 source, entry["perplexity-pytorch"], entry["perplexity-onnx"],
                 entry["top1-agreement"])
    report["pooled"] = pooled.summary()
    if v.questions:
        report["pooled-tasks"] = {kind: pool_tasks([entry[f"tasks-{kind}"] for entry in
                                                    report["sources"].values()])
                                  for kind in ("onnx", "pytorch")}
    prompt = speed_prompt(all_items, v.prefill_tokens)
    report["speed-onnx"] = speed_onnx(lm, prompt, v.decode_tokens)
    report["speed-pytorch"] = speed_torch(merged, prompt, v.decode_tokens)
    # the speeds describe this host at this moment (a busy host halves them), not the model
    host = export_host()
    report["speed-host"] = host
    for kind in ("speed-onnx", "speed-pytorch"):
        report[kind]["measured-on"] = host_label(host)
    return report


def pool_tasks(per_source: list[dict[str, float]]) -> dict[str, float]:
    """Task scores of several sources (``task/metric`` -> value, with ``task/n`` questions)
    pooled: each metric averaged over the sources weighted by their questions."""
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for scores in per_source:
        for key, value in scores.items():
            task, metric = key.rsplit("/", 1)
            if metric == "n":
                continue
            n = scores.get(f"{task}/n", 1.0)
            sums[key] = sums.get(key, 0.0) + n * value
            counts[key] = counts.get(key, 0.0) + n
    return {key: sums[key] / counts[key] for key in sorted(sums) if counts[key]}


def check_bounds(report: dict[str, Any], cfg: ExportConfig) -> list[str]:
    """What the export failed, as sentences naming the bound and the setting to change."""
    p = report["pooled"]
    increase = p["perplexity-onnx"] / p["perplexity-pytorch"] - 1
    failures = []
    if increase > cfg.perplexity_bound():
        fix = {"int4": "try algorithm = 'gptq', mixed_precision = ['last_matmul'] or int8",
               "int8": "try a smaller block_size or fp32",
               "fp32": "fp32 should match exactly: please report this"}[cfg.quant]
        failures.append(
            f"held-out perplexity rose {100 * increase:.1f}% ({p['perplexity-pytorch']:.3f} -> "
            f"{p['perplexity-onnx']:.3f}), above the {100 * cfg.perplexity_bound():.1f}% bound "
            f"(verify.max_perplexity_increase): {fix}, or allow more")
    if p["top1-agreement"] < cfg.verify.min_top1_agreement:
        failures.append(f"top-1 agreement {p['top1-agreement']:.3f} is below "
                        f"verify.min_top1_agreement = {cfg.verify.min_top1_agreement}")
    return failures

