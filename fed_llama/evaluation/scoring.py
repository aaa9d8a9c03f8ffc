"""Scoring generated answers against references (pure functions, no model).

* ICD-10 description -> code: exact match of the code; category match (the first three
  characters, e.g. ``I21``); chapter match (the first letter). The code is the first thing in
  the generation shaped like an ICD-10-CM code, so "The code is I21.4." scores as ``I21.4``.
* Code -> description (and any free-text answer): token-level F1 (SQuAD-style: lower case,
  punctuation and articles removed, bag of tokens).
* Generic answers: exact match after the same normalization, and token F1.

Empty or malformed generations score 0, never raise.
"""

from __future__ import annotations

import re
import string
from collections import Counter

CODE_RE = re.compile(r"\b([A-Z][0-9][0-9A-Z])(?:\.([0-9A-Z]{1,4}))?\b")
ARTICLES = re.compile(r"\b(a|an|the)\b")
PUNCT = str.maketrans("", "", string.punctuation)


def extract_code(text: str) -> str:
    """The first ICD-10-CM-shaped code in ``text`` (``I21.4``), or '' if there is none."""
    match = CODE_RE.search(text.upper())
    if not match:
        return ""
    return match.group(1) + (f".{match.group(2)}" if match.group(2) else "")


def code_scores(prediction: str, reference: str) -> dict[str, float]:
    """Exact, category (first 3 characters) and chapter (first letter) match of a code."""
    got, want = extract_code(prediction), extract_code(reference) or reference.strip().upper()
    if not got:
        return {"exact": 0.0, "category": 0.0, "chapter": 0.0}
    return {"exact": float(got == want), "category": float(got[:3] == want[:3]),
            "chapter": float(got[:1] == want[:1])}


def normalize(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces."""
    return " ".join(ARTICLES.sub(" ", text.lower().translate(PUNCT)).split())


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall after :func:`normalize`."""
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if not common:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact(prediction: str, reference: str) -> float:
    """1.0 if the normalized texts are equal."""
    return float(normalize(prediction) == normalize(reference))


def score(task: str, prediction: str, reference: str) -> dict[str, float]:
    """The metrics of one answer for its task (``desc2code`` or anything free-text)."""
    if task == "desc2code":
        return code_scores(prediction, reference)
    return {"exact": exact(prediction, reference), "f1": token_f1(prediction, reference)}
